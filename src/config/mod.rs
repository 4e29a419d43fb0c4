//! Envoy's v3 configuration: loading it from files and reporting what is wrong with it.

pub mod duration;
pub mod error;
pub mod http2_options;
pub mod http_options;
pub mod load;
pub mod shape;

pub use error::{ConfigError, ConfigErrors, Errors};
pub use load::{load_bootstrap_file, parse_bootstrap};
