//! The `cosmopoints` command line: parse arguments, then hand over to the library.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cosmopoints::access::WithRequestId;
use cosmopoints::app::App;
use cosmopoints::auth::{SecretHash, DEFAULT_ITERATIONS};
use cosmopoints::clock::Clock;
use cosmopoints::config::{Config, LogFormat, StorageBackend};
use cosmopoints::export::ExportFormat;
use cosmopoints::log_queue;
use cosmopoints::store::{Limits, MigrateError, RestoreError, Store};

/// The allocator: about a sixth fewer instructions per bulk transaction on the request
/// side than glibc's, and fewer per GET (BENCHMARKS.md, "Round 11").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: cosmopoints <serve [--config PATH] | check [--config PATH] | \
                     hash-secret [--generate] [--iterations N] | backup --admin ADDR --out FILE | \
                     restore --from FILE --config PATH | migrate --from FILE --config PATH | export --config PATH --from S --to E \
                     [--format csv|jsonl] [--out FILE]> (--help for more)";

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
  cosmopoints backup --admin ADDR --out FILE
      Take a consistent backup from a running server's admin listener and write it
      to FILE (owner-only), after checking it as `check` does.
  cosmopoints restore --from FILE --config PATH
      With the server stopped: check the backup FILE, then put it in place of the
      database named in the config, in one atomic step.
  cosmopoints migrate --from FILE --config PATH
      Copy the redb database FILE (any schema this build reads; never changed) into
      the empty PostgreSQL database named in the config, keeping ids and keys.
  cosmopoints export --config PATH --from S --to E [--format csv|jsonl] [--out FILE]
      With the server stopped: every business's transactions created from S to E
      (epoch seconds, 10 digits) as CSV (default) or JSON Lines, to stdout or FILE.
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

const BACKUP_HELP: &str = "usage: cosmopoints backup --admin ADDR --out FILE

Fetches GET /backup from the admin listener of a running server at ADDR (host:port, as
in [admin] listen; http:// in front is allowed): a consistent snapshot of the whole
database from one read transaction, taken while the server goes on serving. The file is
written beside FILE under a temporary name (mode 0600), fsynced, checked as
`cosmopoints check` does, and only then renamed to FILE: FILE is a whole, checked backup
or is left as it was. Exit 0 done, 1 failed (nothing written), 2 bad usage.";

const RESTORE_HELP: &str = "usage: cosmopoints restore --from FILE --config PATH

Replaces the database named in the config with the backup FILE. The server must be
stopped: a database held by a running server is refused. FILE is checked first (as
`cosmopoints check` does); a damaged or unreadable FILE is refused. The backup is copied
beside the database under a temporary name (mode 0600), fsynced and renamed over it in
one step, so that the database is either the old one or the whole backup. Exit 0 done,
1 the backup is damaged or a copy failed, 2 bad usage, config, unreadable backup or a
running server (nothing changed in any of these).";

const MIGRATE_HELP: &str = "usage: cosmopoints migrate --from FILE --config PATH

Copies the redb database FILE into the PostgreSQL database named in the config
([storage] backend = \"postgres\"): every transaction, connection, reversal, merchant
event and delivery state, under the same ids and references, with the same times, and
the file's id key and token signing key, so that ids and unexpired tokens read the same.
FILE may be of any schema this build reads: it is copied to a private temp file and
migrated there; FILE itself is never changed (a server may even be running on it: the
copy is of the moment it was read). The PostgreSQL database must hold no rows (a fresh
database, or one a server has only started on) and no server may be connected to it
(refused otherwise); servers starting meanwhile wait until the copy is done. Everything
is written in one transaction: the database gets the whole file or no rows at all.
Exit 0 done, 1 failed (nothing written), 2 bad usage, config, an unreadable FILE, or a
database that is not empty, is in use or cannot be reached.";

const EXPORT_HELP: &str =
    "usage: cosmopoints export --config PATH --from S --to E [--format csv|jsonl] [--out FILE]

Writes the transactions created from S to E (epoch seconds, exactly 10 digits, as
startDate and endDate of the listing) of every business in the config, business by
business, each oldest first. csv (default): a header row, then the columns of the API's
CSV listing after a `business` column (RFC 4180 quoting, formula cells prefixed with
'). jsonl: one JSON object per line, the API's transaction with a `business` field.
To stdout, or to FILE (mode 0600, written whole or not at all). The server must be
stopped (it holds the database). Exit 0 done, 1 failed, 2 bad usage, config or database.";

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
        ["backup", "--help" | "-h"] => print_ok(BACKUP_HELP),
        ["backup", options @ ..] => match named(options, &["--admin", "--out"], &[]) {
            Ok(o) => backup(o["--admin"], Path::new(o["--out"])),
            Err(message) => usage_error(&message),
        },
        ["restore", "--help" | "-h"] => print_ok(RESTORE_HELP),
        ["restore", options @ ..] => match named(options, &["--from", "--config"], &[]) {
            Ok(o) => restore(Path::new(o["--from"]), Path::new(o["--config"])),
            Err(message) => usage_error(&message),
        },
        ["migrate", "--help" | "-h"] => print_ok(MIGRATE_HELP),
        ["migrate", options @ ..] => match named(options, &["--from", "--config"], &[]) {
            Ok(o) => migrate(Path::new(o["--from"]), Path::new(o["--config"])),
            Err(message) => usage_error(&message),
        },
        ["export", "--help" | "-h"] => print_ok(EXPORT_HELP),
        ["export", options @ ..] => {
            match named(
                options,
                &["--config", "--from", "--to"],
                &["--format", "--out"],
            )
            .and_then(export_options)
            {
                Ok(options) => export(options),
                Err(message) => usage_error(&message),
            }
        }
        ["hash-secret", options @ ..] => match hash_options(options) {
            Ok((generate, iterations)) => hash_secret(generate, iterations),
            Err(message) => usage_error(message),
        },
        _ => usage_error(USAGE),
    }
}

/// `--name value` options in any order: each of `required` exactly once, each of
/// `optional` at most once, nothing else.
fn named<'a>(
    options: &[&'a str],
    required: &[&'a str],
    optional: &[&'a str],
) -> Result<HashMap<&'a str, &'a str>, String> {
    let mut found = HashMap::new();
    let mut rest = options.iter();
    while let Some(&name) = rest.next() {
        if !required.contains(&name) && !optional.contains(&name) {
            return Err(format!("unknown option {name:?}\n{USAGE}"));
        }
        let Some(&value) = rest.next() else {
            return Err(format!("{name} needs a value\n{USAGE}"));
        };
        if found.insert(name, value).is_some() {
            return Err(format!("{name} is given twice"));
        }
    }
    if let Some(missing) = required.iter().find(|r| !found.contains_key(*r)) {
        return Err(format!("{missing} is required\n{USAGE}"));
    }
    Ok(found)
}

fn print_ok(text: &str) -> ExitCode {
    println!("{text}");
    ExitCode::SUCCESS
}

fn usage_error(text: &str) -> ExitCode {
    eprintln!("{}", text.replace('\n', "; "));
    ExitCode::from(2)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cosmopoints: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `cosmopoints backup`: see BACKUP_HELP.
fn backup(admin: &str, out: &Path) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let address = admin
        .strip_prefix("http://")
        .unwrap_or(admin)
        .trim_end_matches('/')
        .to_owned();
    let started = std::time::Instant::now();
    let mut report = None;
    let written = cosmopoints::files::write_atomically(
        out,
        |file| runtime.block_on(fetch_backup(&address, file)),
        |temp| match cosmopoints::store::check_file(temp) {
            Ok(r) if r.problems.is_empty() => {
                report = Some(r);
                Ok(())
            }
            Ok(r) => Err(format!(
                "the backup fails the check: {}",
                r.problems.first().map_or("", String::as_str)
            )),
            Err(e) => Err(format!("the backup does not open: {e}")),
        },
    );
    match (written, report) {
        (Ok(()), Some(report)) => {
            println!(
                "{}: {} transactions, {} connections, schema {}, checked; {:.1} s",
                out.display(),
                report.transactions,
                report.connections,
                report.schema,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!(
                "cosmopoints: backup failed, nothing written to {}: {e}",
                out.display()
            );
            ExitCode::FAILURE
        }
        (Ok(()), None) => ExitCode::FAILURE,
    }
}

/// GET /backup from `address` into `file`, all of it (the length the server announced).
async fn fetch_backup(address: &str, file: &mut std::fs::File) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    use std::io::Write;
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| format!("cannot connect to {address}: timed out"))?
    .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("cannot talk HTTP to {address}: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/backup")
        .header(hyper::header::HOST, address)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("bad admin address {address}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET /backup on {address} failed: {e}"))?;
    let status = response.status();
    let expected = response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(format!("the server answered {status}: {}", text.trim()));
    }
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the transfer broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .map_err(|e| format!("cannot write the backup: {e}"))?;
            received += data.len() as u64;
        }
    }
    if expected.is_some_and(|n| n != received) {
        return Err(format!(
            "the transfer ended after {received} of {} bytes",
            expected.unwrap_or(0)
        ));
    }
    Ok(())
}

/// `cosmopoints restore`: see RESTORE_HELP.
fn restore(from: &Path, config: &Path) -> ExitCode {
    let (_, config) = match load_config(Some(config)) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if !matches!(config.storage_backend, StorageBackend::Redb) {
        eprintln!(
            "cosmopoints: restore is for a redb database file; this config's database is \
             PostgreSQL: restore it with PostgreSQL's own tools (pg_restore or psql from a \
             pg_dump)"
        );
        return ExitCode::from(2);
    }
    let to = &config.storage_path;
    let started = std::time::Instant::now();
    match cosmopoints::store::restore_file(from, to) {
        Ok(report) => {
            println!(
                "{} restored from {}: {} transactions, {} connections, schema {}; {:.1} s",
                to.display(),
                from.display(),
                report.transactions,
                report.connections,
                report.schema,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "cosmopoints: restore refused, {} unchanged: {e}",
                to.display()
            );
            match e {
                RestoreError::Damaged(_) | RestoreError::Io(_) => ExitCode::FAILURE,
                RestoreError::Source(_) | RestoreError::InUse => ExitCode::from(2),
            }
        }
    }
}

/// `cosmopoints migrate`: see MIGRATE_HELP.
fn migrate(from: &Path, config: &Path) -> ExitCode {
    let (_, config) = match load_config(Some(config)) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let StorageBackend::Postgres(pg) = &config.storage_backend else {
        eprintln!(
            "cosmopoints: migrate copies into PostgreSQL; this config's storage is a redb \
             file (set [storage] backend = \"postgres\" and url)"
        );
        return ExitCode::from(2);
    };
    let started = std::time::Instant::now();
    match cosmopoints::store::migrate_file(from, pg) {
        Ok(counts) => {
            println!(
                "{} copied into the PostgreSQL database: {} transactions, {} connections, {} reversals, {} events, {} deliveries{}; {:.1} s",
                from.display(),
                counts.transactions,
                counts.connections,
                counts.reversals,
                counts.events,
                counts.deliveries,
                counts
                    .migrated_from
                    .map(|v| format!(" (read from schema {v})"))
                    .unwrap_or_default(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cosmopoints: migrate stopped, nothing copied: {e}");
            match e {
                MigrateError::Failed(_) => ExitCode::FAILURE,
                MigrateError::Source(_)
                | MigrateError::Database(_)
                | MigrateError::NotEmpty
                | MigrateError::InUse(_) => ExitCode::from(2),
            }
        }
    }
}

struct ExportOptions {
    config: PathBuf,
    start: u64,
    end: u64,
    format: ExportFormat,
    out: Option<PathBuf>,
}

fn export_options(o: HashMap<&str, &str>) -> Result<ExportOptions, String> {
    let epoch = |name: &str| -> Result<u64, String> {
        let text = o[name];
        if text.len() != 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{name} must be epoch seconds of exactly 10 digits, like 1795774500"
            ));
        }
        text.parse().map_err(|_| format!("{name} is not a number"))
    };
    let (start, end) = (epoch("--from")?, epoch("--to")?);
    if start > end {
        return Err("--from must not be after --to".into());
    }
    let format = match o.get("--format") {
        None => ExportFormat::Csv,
        Some(f) => ExportFormat::parse(f).ok_or("--format must be csv or jsonl")?,
    };
    Ok(ExportOptions {
        config: PathBuf::from(o["--config"]),
        start,
        end,
        format,
        out: o.get("--out").map(PathBuf::from),
    })
}

/// `cosmopoints export`: see EXPORT_HELP.
fn export(options: ExportOptions) -> ExitCode {
    let (_, config) = match load_config(Some(&options.config)) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let path = config.storage_path.clone();
    let limits = Limits {
        cache_bytes: config.storage_cache_bytes,
        ..Limits::new(1, 1)
    };
    let opened = match &config.storage_backend {
        StorageBackend::Redb => {
            // Opening would create a missing database: say so instead.
            if !path.exists() {
                eprintln!(
                    "cosmopoints: cannot export: {} does not exist",
                    path.display()
                );
                return ExitCode::from(2);
            }
            Store::open(&path, Clock::system(), limits)
                .map_err(|e| format!("cannot export from {}: {e}", path.display()))
        }
        StorageBackend::Postgres(pg) => Store::open_postgres(pg, Clock::system(), limits)
            .map_err(|e| format!("cannot export from the PostgreSQL database: {e}")),
    };
    let store = match opened {
        Ok(store) => store,
        Err(e) => {
            eprintln!("cosmopoints: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let run = |out: &mut dyn std::io::Write| -> Result<u64, String> {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
        runtime
            .block_on(cosmopoints::export::export(
                &store,
                &config,
                options.start,
                options.end,
                options.format,
                &mut out,
            ))
            .map_err(|e| e.to_string())
    };
    let mut rows = 0;
    let done = match &options.out {
        None => run(&mut std::io::stdout().lock()).map(|n| rows = n),
        Some(file) => {
            cosmopoints::files::write_atomically(file, |f| run(f).map(|n| rows = n), |_| Ok(()))
        }
    };
    runtime.block_on(async {
        store.shutdown().await;
        store.close().await;
    });
    match done {
        Ok(()) => {
            eprintln!("cosmopoints: exported {rows} transactions");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cosmopoints: export failed: {e}");
            ExitCode::FAILURE
        }
    }
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
    // The database as it is named in messages: the file, or (never the url, which may
    // hold a password) "the PostgreSQL database".
    let (checked, name) = match &config.storage_backend {
        StorageBackend::Redb => (
            cosmopoints::store::check_file(&config.storage_path),
            config.storage_path.display().to_string(),
        ),
        StorageBackend::Postgres(pg) => (
            cosmopoints::store::check_postgres(pg),
            "the PostgreSQL database".to_owned(),
        ),
    };
    match checked {
        Err(e) => {
            eprintln!("cosmopoints: cannot check {name}: {e}");
            ExitCode::from(2)
        }
        Ok(report) => {
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            println!(
                "{}: schema {}, {} transactions, {} references, {} program date entries, {} connections, {} deliveries, {} outbox entries, {} reversals, {} problems",
                name,
                report.schema,
                report.transactions,
                report.references,
                report.program_date_entries,
                report.connections,
                report.deliveries,
                report.outbox_entries,
                report.reversals,
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
    let cache_configured = config.storage_cache_bytes.is_some();
    let postgres = matches!(config.storage_backend, StorageBackend::Postgres(_));
    // Never the url: it may hold a password.
    let database = if postgres {
        "the PostgreSQL database".to_owned()
    } else {
        storage.display().to_string()
    };
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
            eprintln!("cosmopoints: cannot open {database}: {e}");
            return ExitCode::from(2);
        }
    };
    // Logging starts once start-up can no longer fail on config or database, so that a
    // failed start prints exactly one line.
    // Held to the end of `serve`: dropping it writes out the log lines still queued.
    let _log_flush = match init_tracing(format, &level) {
        Ok(flush) => flush,
        Err(e) => {
            eprintln!("cosmopoints: cannot start the log's writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        let admin = match app.config.admin.as_ref().map(|a| a.listen) {
            None => None,
            Some(admin_listen) => match tokio::net::TcpListener::bind(admin_listen).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    eprintln!("cosmopoints: cannot listen on {admin_listen} (admin.listen): {e}");
                    return ExitCode::from(2);
                }
            },
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
            database = %database,
            businesses = %businesses,
            "listening on {addr}"
        );
        if let Some(admin) = &admin {
            let addr = admin
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string());
            tracing::info!("admin listening at {addr} (GET /metrics, /readyz, /backup)");
        }
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        if let Some(bytes) = app.store.page_cache_bytes() {
            let how = if cache_configured {
                "storage.cache_mib".to_owned()
            } else {
                Store::page_cache_rule()
            };
            tracing::info!("database page cache {} MiB ({how})", bytes >> 20);
        }
        if let Some(from) = app.store.migrated_from() {
            tracing::info!(
                "database migrated from schema {from} to {}",
                cosmopoints::store::SCHEMA_VERSION
            );
        }
        // Files made by earlier versions were created 0644; new ones are 0600.
        if let (false, Ok(Some(mode))) = (postgres, cosmopoints::files::open_to_others(&storage)) {
            tracing::warn!(
                "{} has mode {mode:o}: other users of this machine can read the signing key \
                 in it; make it owner-only with `chmod 600`",
                storage.display()
            );
        }
        let mut service = cosmopoints::service::Service::new(app);
        if let Some(admin) = admin {
            service.admin(admin);
        }
        service.run(listener, shutdown).await;
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

/// Logs go to stderr through a queue and its writer thread ([`cosmopoints::log_queue`]): a
/// request formats its line and copies it into the queue, and never waits on stderr or
/// its lock (a slow journal or a full pipe held every worker thread up before). Not
/// lossy: when 32 MiB of lines (about 128k) are queued, loggers wait rather than drop
/// access-log lines. The thread writes everything queued with one `write`, then lingers
/// a millisecond, so a busy server writes many lines per system call and an idle one
/// holds none back. The guard returned writes out what is queued when it is dropped, at
/// the end of `serve`.
fn init_tracing(format: LogFormat, level: &str) -> std::io::Result<log_queue::Flush> {
    let (writer, guard) = log_queue::start(std::io::stderr(), "cosmopoints-log", log_queue::LIMIT)?;
    // The access log's `done` lines are formatted by `access` and queued on the same
    // writer, so that they stay in order with every other line.
    cosmopoints::access::install(format, writer.clone());
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // A request's lines other than its `done` line name its id (`WithRequestId`).
    let lines = tracing_subscriber::fmt::format();
    match format {
        // Colours only for a person at a terminal: never escape codes in a file or journal.
        LogFormat::Human => {
            let ansi = std::io::stderr().is_terminal();
            builder
                .with_ansi(ansi)
                .event_format(WithRequestId::new(format, lines.with_ansi(ansi)))
                .init()
        }
        LogFormat::Json => builder
            .json()
            .event_format(WithRequestId::new(
                format,
                lines.json().flatten_event(true).with_current_span(true),
            ))
            .init(),
    }
    Ok(guard)
}
