//! The `cosmopoints` command line: parse arguments, then hand over to the library.

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cosmopoints::app::App;
use cosmopoints::auth::{SecretHash, DEFAULT_ITERATIONS};
use cosmopoints::clock::Clock;
use cosmopoints::config::{Config, LogFormat};

const USAGE: &str =
    "usage: cosmopoints <serve [--config PATH] | hash-secret [--iterations N]> (--help for more)";

const HELP: &str = "cosmopoints: a self-contained loyalty-points server

usage:
  cosmopoints serve [--config PATH]
      Run the server. PATH defaults to cosmopoints.toml, then config.example.toml.
      The database file named in the config is created if missing.
  cosmopoints check [--config PATH]
      Verify the database named in the config (read-only): every record decodes
      and has exactly its index entries. Exit 0 whole, 1 problems found, 2 cannot
      open (for instance while a server holds the file).
  cosmopoints hash-secret [--iterations N]
      Read a client secret on stdin (one line) and print the secret_hash to put
      in the config (PBKDF2-HMAC-SHA256, PHC string).
  cosmopoints --help | --version

Exit codes: 0 done, 1 failure while running, 2 bad usage, config or database.";

const SERVE_HELP: &str = "usage: cosmopoints serve [--config PATH]

Runs the server on the configuration at PATH (default: cosmopoints.toml if it exists,
else config.example.toml). Stops gracefully on SIGTERM or SIGINT.";

const CHECK_HELP: &str = "usage: cosmopoints check [--config PATH]

Opens the database named in the config read-only and verifies it: every
transaction record decodes, every record has exactly its index entries
(reference, date, program and date), every index entry points to its record,
and no two records share a business and referenceNumber. Prints the counts and
exits 0, or prints each problem and exits 1. A file held by a running server
cannot be opened: stop the server (or copy the file) first; exit 2.";

const HASH_HELP: &str = "usage: cosmopoints hash-secret [--iterations N]

Reads a client secret from stdin (a trailing newline is dropped) and prints
$pbkdf2-sha256$i=N$SALT$HASH for the secret_hash key of a client. N defaults to 100000.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--help" | "-h" | "help"] => print_ok(HELP),
        ["--version" | "-V"] => print_ok(concat!("cosmopoints ", env!("CARGO_PKG_VERSION"))),
        ["serve", "--help" | "-h"] => print_ok(SERVE_HELP),
        ["serve"] => serve(None),
        ["serve", "--config", path] => serve(Some(Path::new(path))),
        ["check", "--help" | "-h"] => print_ok(CHECK_HELP),
        ["check"] => check(None),
        ["check", "--config", path] => check(Some(Path::new(path))),
        ["hash-secret", "--help" | "-h"] => print_ok(HASH_HELP),
        ["hash-secret"] => hash_secret(DEFAULT_ITERATIONS),
        ["hash-secret", "--iterations", n] => match n.parse::<u32>() {
            Ok(n) if (1..=10_000_000).contains(&n) => hash_secret(n),
            _ => usage_error("--iterations takes a whole number from 1 to 10000000"),
        },
        _ => usage_error(USAGE),
    }
}

fn print_ok(text: &str) -> ExitCode {
    println!("{text}");
    ExitCode::SUCCESS
}

fn usage_error(text: &str) -> ExitCode {
    eprintln!("{text}");
    ExitCode::from(2)
}

fn hash_secret(iterations: u32) -> ExitCode {
    let mut secret = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut secret) {
        eprintln!("cosmopoints: cannot read the secret from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let secret = secret.strip_suffix('\n').unwrap_or(&secret);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        eprintln!("cosmopoints: the secret on stdin is empty");
        return ExitCode::from(2);
    }
    let iterations = NonZeroU32::new(iterations).expect("checked to be at least 1");
    println!("{}", SecretHash::new(secret.as_bytes(), iterations));
    ExitCode::SUCCESS
}

fn default_config() -> PathBuf {
    let own = PathBuf::from("cosmopoints.toml");
    if own.exists() {
        own
    } else {
        PathBuf::from("config.example.toml")
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    let path = path.map(Path::to_path_buf).unwrap_or_else(default_config);
    Config::load(&path).map_err(|e| {
        eprintln!("cosmopoints: config error in {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn check(path: Option<&Path>) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let path = &config.storage_path;
    match cosmopoints::store::check_file(path) {
        Err(e) => {
            eprintln!("cosmopoints: cannot check {}: {e}", path.display());
            ExitCode::from(2)
        }
        Ok(report) => {
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            println!(
                "{}: schema {}, {} transactions, {} references, {} date entries, {} program date entries, {} connections, {} deliveries, {} outbox entries, {} problems",
                path.display(),
                report.schema,
                report.transactions,
                report.references,
                report.date_entries,
                report.program_date_entries,
                report.connections,
                report.deliveries,
                report.outbox_entries,
                report.problems.len()
            );
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn serve(path: Option<&Path>) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let storage = config.storage_path.clone();
    let listen = config.server.listen;
    let (format, level, warnings) = (
        config.server.log_format,
        config.server.log_level.clone(),
        config.warnings.clone(),
    );
    let app = match App::open(config, Clock::system()) {
        Ok(app) => Arc::new(app),
        Err(e) => {
            eprintln!("cosmopoints: cannot open {}: {e}", storage.display());
            return ExitCode::from(2);
        }
    };
    // Logging starts once start-up can no longer fail on config or database, so that a
    // failed start prints exactly one line.
    init_tracing(format, &level);
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    if let Some(from) = app.store.migrated_from() {
        tracing::info!(
            "database migrated from schema {from} to {}",
            cosmopoints::store::SCHEMA_VERSION
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cosmopoints: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("cosmopoints: cannot listen on {listen}: {e}");
                return ExitCode::from(2);
            }
        };
        match listener.local_addr() {
            Ok(addr) => tracing::info!("listening on {addr}"),
            Err(e) => tracing::warn!(error = %e, "listening, address unknown"),
        }
        cosmopoints::service::Service::new(app)
            .run(listener, shutdown_signal())
            .await;
        ExitCode::SUCCESS
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("signal received");
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
