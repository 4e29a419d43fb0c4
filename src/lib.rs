//! legate: an Envoy-compatible HTTP gateway on Pingora.

// Envoy users still write deprecated fields (exact_match, append, ...); accepting them is
// part of speaking Envoy's API.
#![allow(deprecated)]

pub mod access_log;
pub mod admin;
pub mod allocator;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod filter;
pub mod filters;
pub mod http1;
pub mod io;
pub mod listener;
pub mod path_normalization;
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

/// legate as a library: the same gateway and command line as the `legate` binary, with
/// extra HTTP filters registered by the embedding program.
///
/// ```no_run
/// # use std::sync::Arc;
/// # struct MyFilterFactory;
/// # impl legate::filter::HttpFilterFactory for MyFilterFactory {
/// #     fn config_type(&self) -> &str { "acme.MyFilter" }
/// #     fn create(&self, _: &serde_json::Value) -> Result<Box<dyn legate::filter::HttpFilter>, String> { Err("".into()) }
/// # }
/// fn main() -> std::process::ExitCode {
///     legate::Legate::new().http_filter(MyFilterFactory).main()
/// }
/// ```
#[derive(Default)]
pub struct Legate {
    filters: Vec<std::sync::Arc<dyn filter::HttpFilterFactory>>,
}

impl Legate {
    pub fn new() -> Self {
        Legate::default()
    }

    /// Makes a filter available to configs: an `http_filters` entry whose TypedStruct
    /// `type_url` ends in the factory's `config_type()` is built by it.
    pub fn http_filter(mut self, factory: impl filter::HttpFilterFactory + 'static) -> Self {
        self.filters.push(std::sync::Arc::new(factory));
        self
    }

    /// Runs the `legate` command line (`-c FILE`, `--validate`, ...) with these filters.
    pub fn main(self) -> std::process::ExitCode {
        if let Err(e) = filter::register(self.filters) {
            eprintln!("legate: {e}");
            return std::process::ExitCode::FAILURE;
        }
        cli::main()
    }
}
