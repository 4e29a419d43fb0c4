//! Envoy's HTTP filters that legate implements on its own filter API.

pub mod cors;
pub mod header_mutation;
pub mod local_ratelimit;
