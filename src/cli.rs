//! The `legate` command line, shared by the `legate` binary and by programs that embed
//! legate with their own filters (see [`crate::Legate`]).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{run, ConfigSource};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Run the gateway.
    Serve,
    /// Check the configuration and exit (like `envoy --mode validate`).
    Validate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Pingora,
    Native,
}

/// legate: an Envoy-compatible HTTP gateway on Pingora.
///
/// Give it an Envoy v3 bootstrap (YAML or JSON, the same file Envoy takes) with -c.
/// Without -c it runs a built-in config that answers on http://127.0.0.1:8080.
/// Send SIGHUP to reload the file; a file that fails validation is rejected and the last
/// good config keeps serving. Logging: --log-level, or RUST_LOG for per-module filters.
#[derive(Debug, Parser)]
#[command(name = "legate", version)]
struct Args {
    /// Envoy v3 bootstrap file (YAML or JSON).
    #[arg(short = 'c', long = "config-path", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Validate the configuration, print OK or every error with its field path, and exit
    /// (status 1 on errors). Same as --mode validate.
    #[arg(long)]
    validate: bool,

    /// serve (default) or validate.
    #[arg(long, value_enum, default_value_t = Mode::Serve)]
    mode: Mode,

    /// Log level: trace, debug, info, warn, error or off. RUST_LOG, when set, wins.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,

    /// Worker threads (Envoy's --concurrency); defaults to the number of CPUs.
    #[arg(long)]
    concurrency: Option<usize>,

    /// On SIGTERM or SIGINT, how long open connections may take to finish before the
    /// process exits (Envoy's --drain-time-s).
    #[arg(long = "drain-time-s", default_value_t = 600)]
    drain_time_s: u64,

    /// Graceful upgrade (Pingora's): take the listening sockets from the running legate,
    /// which hands them over and drains when it gets SIGQUIT.
    #[arg(short = 'u', long)]
    upgrade: bool,

    /// HTTP engine for plaintext HTTP/1 listeners: native (default), legate's own
    /// HTTP/1.1 engine, which serves requests with no body or a content-length one up to
    /// 64 KiB to plaintext HTTP/1.1 clusters and hands any other connection to Pingora;
    /// or pingora, Pingora's proxy for every connection.
    #[arg(long, value_enum, default_value_t = EngineArg::Native)]
    engine: EngineArg,

    /// The unix socket the listening sockets pass through during an upgrade.
    #[arg(long, value_name = "PATH", default_value = "/tmp/legate_upgrade.sock")]
    upgrade_sock: String,
}

fn install_logger(logger: env_logger::Logger) {
    if log::set_boxed_logger(Box::new(ClientFailuresAtDebug(logger))).is_err() {
        eprintln!("legate: a logger was already installed");
    }
}

/// Pingora logs every request that fails on the client's side (a client gone mid-request,
/// a slow client's 408) at ERROR; Envoy logs those at debug, and a front door sees them all
/// day. Only those records are lowered; everything else passes unchanged.
struct ClientFailuresAtDebug(env_logger::Logger);

impl log::Log for ClientFailuresAtDebug {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if record.level() == log::Level::Error && record.target() == "pingora_proxy" {
            let text = record.args().to_string();
            if text.starts_with("Fail to proxy: Downstream") {
                if log::max_level() >= log::LevelFilter::Debug {
                    self.0.log(
                        &log::Record::builder()
                            .level(log::Level::Debug)
                            .target(record.target())
                            .args(format_args!("{text}"))
                            .build(),
                    );
                }
                return;
            }
        }
        self.0.log(record);
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Parses the command line and runs (or validates) the gateway.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let plain_level: Option<log::LevelFilter> = args.log_level.parse().ok();
    match plain_level {
        // The logger passes everything and log's max level gates it, so the admin's
        // `POST /logging?level=` can raise or lower it at runtime.
        Some(level) if std::env::var_os("RUST_LOG").is_none() => {
            let logger = env_logger::Builder::new()
                .filter_level(log::LevelFilter::Trace)
                .build();
            install_logger(logger);
            log::set_max_level(level);
        }
        _ => {
            let env = env_logger::Env::default().default_filter_or(args.log_level.as_str());
            let logger = env_logger::Builder::from_env(env).build();
            let max = logger.filter();
            install_logger(logger);
            log::set_max_level(max);
        }
    }

    let source = match &args.config {
        Some(p) => ConfigSource::File(p.clone()),
        None => ConfigSource::BuiltIn(crate::DEFAULT_CONFIG),
    };
    if args.validate || args.mode == Mode::Validate {
        crate::cluster::SKIP_DNS.store(true, std::sync::atomic::Ordering::Relaxed);
        return match source.load() {
            Ok(_) => {
                println!("OK");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    println!("{e}");
                }
                println!("{}", errors.summary());
                ExitCode::FAILURE
            }
        };
    }
    let threads = args
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let life = crate::server::Lifecycle {
        drain_time: std::time::Duration::from_secs(args.drain_time_s),
        upgrade: args.upgrade,
        upgrade_sock: args.upgrade_sock.clone(),
        engine: match args.engine {
            EngineArg::Pingora => crate::server::Engine::Pingora,
            EngineArg::Native => crate::server::Engine::Native,
        },
    };
    match run(source, threads, life) {
        Ok(()) => ExitCode::SUCCESS,
        Err(errors) => {
            eprintln!("legate: configuration rejected:");
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            eprintln!("legate: {}", errors.summary());
            ExitCode::FAILURE
        }
    }
}
