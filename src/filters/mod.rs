//! Envoy's HTTP filters that legate implements on its own filter API.

pub mod local_ratelimit;
