//! legate: an Envoy-compatible HTTP gateway on Pingora.

// Envoy users still write deprecated fields (exact_match, append, ...); accepting them is
// part of speaking Envoy's API.
#![allow(deprecated)]

pub mod access_log;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod filter;
pub mod io;
pub mod listener;
pub mod proxy;
pub mod retry;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod xds;

/// This machine's hostname, for `%HOSTNAME%`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The configuration `legate` runs when no `-c` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../conf/default.yaml");
