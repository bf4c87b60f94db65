//! The `cosmopoints` command line: parse arguments, then hand over to the library.

use std::io::{IsTerminal, Read};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cosmopoints::app::App;
use cosmopoints::auth::{SecretHash, DEFAULT_ITERATIONS};
use cosmopoints::clock::Clock;
use cosmopoints::config::{Config, LogFormat};

const USAGE: &str = "usage: cosmopoints <serve [--config PATH] | check [--config PATH] | \
                     hash-secret [--generate] [--iterations N]> (--help for more)";

const HELP: &str = "cosmopoints: a self-contained loyalty-points server

usage:
  cosmopoints serve [--config PATH]
      Run the server. PATH defaults to cosmopoints.toml in the current folder;
      without it, exit 2 (the example config is used only when named).
      The database file named in the config is created if missing.
  cosmopoints check [--config PATH]
      Verify the database named in the config (read-only): every record decodes
      and has exactly its index entries. Exit 0 whole, 1 problems found, 2 cannot
      open (for instance while a server holds the file).
  cosmopoints hash-secret [--generate] [--iterations N]
      Read a client secret (one line; in a terminal, asked for without echo) and
      print the secret_hash to put in the config (PBKDF2-HMAC-SHA256, PHC string).
      --generate: make a strong random secret and print it with its hash.
  cosmopoints --help | --version

Exit codes: 0 done, 1 failure while running, 2 bad usage, config or database.";

const SERVE_HELP: &str = "usage: cosmopoints serve [--config PATH]

Runs the server on the configuration at PATH (default: cosmopoints.toml in the current
folder; if that is missing too, exits 2: config.example.toml is used only when named,
since its demo secret is public). Stops gracefully on SIGTERM or SIGINT.";

const CHECK_HELP: &str = "usage: cosmopoints check [--config PATH]

Opens the database named in the config read-only and verifies it: every
transaction record decodes, every record has exactly its index entries
(reference, date, program and date), every index entry points to its record,
and no two records share a business and referenceNumber. Prints the counts and
exits 0, or prints each problem and exits 1. A file held by a running server
cannot be opened: stop the server (or copy the file) first; exit 2.";

const HASH_HELP: &str = "usage: cosmopoints hash-secret [--generate] [--iterations N]

Reads a client secret and prints $pbkdf2-sha256$i=N$SALT$HASH for the secret_hash key
of a client. In a terminal it asks for the secret without echoing it; otherwise it
reads stdin (one line: a trailing newline is dropped). N defaults to 100000.

--generate makes a random secret (256 bits, base64url) instead of reading one and
prints two lines: `secret: SECRET` (give it to the client; it is not kept anywhere)
and `secret_hash = \"HASH\"` (put it in the client's entry of the config).";

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
        ["hash-secret", options @ ..] => match hash_options(options) {
            Ok((generate, iterations)) => hash_secret(generate, iterations),
            Err(message) => usage_error(message),
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

/// `[--generate] [--iterations N]` in any order → (generate, iterations).
fn hash_options(options: &[&str]) -> Result<(bool, NonZeroU32), &'static str> {
    let mut generate = false;
    let mut iterations = None;
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        match *option {
            "--generate" if !generate => generate = true,
            "--iterations" if iterations.is_none() => {
                let n = rest
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| (1..=10_000_000).contains(n))
                    .and_then(NonZeroU32::new)
                    .ok_or("--iterations takes a whole number from 1 to 10000000")?;
                iterations = Some(n);
            }
            _ => return Err(USAGE),
        }
    }
    let default = NonZeroU32::new(DEFAULT_ITERATIONS).expect("the default is not 0");
    Ok((generate, iterations.unwrap_or(default)))
}

fn hash_secret(generate: bool, iterations: NonZeroU32) -> ExitCode {
    if generate {
        let Some(secret) = random_secret() else {
            eprintln!("cosmopoints: the system's random number generator failed");
            return ExitCode::FAILURE;
        };
        println!("secret: {secret}");
        println!(
            "secret_hash = \"{}\"",
            SecretHash::new(secret.as_bytes(), iterations)
        );
        return ExitCode::SUCCESS;
    }
    let secret = match read_secret() {
        Ok(secret) => secret,
        Err(code) => return code,
    };
    if secret.is_empty() {
        eprintln!("cosmopoints: the secret is empty");
        return ExitCode::from(2);
    }
    println!("{}", SecretHash::new(secret.as_bytes(), iterations));
    ExitCode::SUCCESS
}

/// 256 random bits as 43 base64url characters: as strong as the HMAC key behind tokens,
/// and safe in JSON, shells and TOML without quoting trouble.
fn random_secret() -> Option<String> {
    use base64::Engine;
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// One line: from the terminal without echo when stdin is one (so that the secret shows
/// neither on screen nor in the scroll-back), else all of stdin as today, less one
/// trailing newline.
fn read_secret() -> Result<String, ExitCode> {
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("Client secret (not shown): ").map_err(|e| {
            eprintln!("cosmopoints: cannot read the secret from the terminal: {e}");
            ExitCode::FAILURE
        });
    }
    let mut secret = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut secret) {
        eprintln!("cosmopoints: cannot read the secret from stdin: {e}");
        return Err(ExitCode::FAILURE);
    }
    let trimmed = secret.strip_suffix('\n').unwrap_or(&secret);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Ok(trimmed.to_owned())
}

/// The config file used when `--config` is not given.
const DEFAULT_CONFIG: &str = "cosmopoints.toml";

/// `path`, or `cosmopoints.toml` if it exists. Never the example config: its demo secret
/// is public, so running it by accident would open the server to anyone.
fn config_path(path: Option<&Path>) -> Result<PathBuf, ExitCode> {
    if let Some(path) = path {
        return Ok(path.to_path_buf());
    }
    let own = PathBuf::from(DEFAULT_CONFIG);
    if own.exists() {
        return Ok(own);
    }
    let looked = std::path::absolute(&own).unwrap_or(own);
    eprintln!(
        "cosmopoints: no configuration: no --config given and {} does not exist; \
         give one with --config PATH (config.example.toml is used only when named)",
        looked.display()
    );
    Err(ExitCode::from(2))
}

fn load_config(path: Option<&Path>) -> Result<(PathBuf, Config), ExitCode> {
    let path = config_path(path)?;
    match Config::load(&path) {
        Ok(config) => Ok((path, config)),
        Err(e) => {
            eprintln!("cosmopoints: config error in {}: {e}", path.display());
            Err(ExitCode::from(2))
        }
    }
}

fn check(path: Option<&Path>) -> ExitCode {
    let (_, config) = match load_config(path) {
        Ok(loaded) => loaded,
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
    let (config_file, config) = match load_config(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let storage = config.storage_path.clone();
    let businesses = config
        .businesses
        .iter()
        .map(|b| b.id.as_str())
        .collect::<Vec<_>>()
        .join(", ");
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
        let shutdown = shutdown_signal();
        // The first log line: what this process serves, from which files.
        let addr = match listener.local_addr() {
            Ok(addr) => addr.to_string(),
            Err(_) => listen.to_string(),
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %config_file.display(),
            database = %storage.display(),
            businesses = %businesses,
            "listening on {addr}"
        );
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        if let Some(from) = app.store.migrated_from() {
            tracing::info!(
                "database migrated from schema {from} to {}",
                cosmopoints::store::SCHEMA_VERSION
            );
        }
        // Files made by earlier versions were created 0644; new ones are 0600.
        if let Ok(Some(mode)) = cosmopoints::files::open_to_others(&storage) {
            tracing::warn!(
                "{} has mode {mode:o}: other users of this machine can read the signing key \
                 in it; make it owner-only with `chmod 600`",
                storage.display()
            );
        }
        cosmopoints::service::Service::new(app)
            .run(listener, shutdown)
            .await;
        ExitCode::SUCCESS
    })
}

/// Registers the signal handlers at once and returns a future that completes on SIGTERM or
/// SIGINT. Registering before the server logs that it listens means that a signal sent
/// after that line never meets the default action, which for SIGHUP and SIGTERM is a
/// silent death. SIGHUP is logged and ignored: the configuration is read only at start,
/// so there is nothing to reload, and a closed terminal must not stop the server.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let register = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(stream) => Some(stream),
        Err(e) => {
            eprintln!("cosmopoints: cannot handle {name}: {e}");
            None
        }
    };
    let mut term = register(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = register(SignalKind::interrupt(), "SIGINT");
    let mut hangup = register(SignalKind::hangup(), "SIGHUP");
    // A signal that could not be registered never arrives.
    async fn next(stream: &mut Option<Signal>) {
        match stream {
            Some(stream) => {
                stream.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    async move {
        loop {
            tokio::select! {
                () = next(&mut term) => {
                    tracing::info!("SIGTERM received");
                    break;
                }
                () = next(&mut interrupt) => {
                    tracing::info!("SIGINT received");
                    break;
                }
                () = next(&mut hangup) => tracing::info!(
                    "SIGHUP received and ignored: the configuration is read only at start; \
                     restart the server to apply a change"
                ),
            }
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match format {
        // Colours only for a person at a terminal: never escape codes in a file or journal.
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
