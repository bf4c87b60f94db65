//! TOML → a validated [`Config`], once, at start-up.
//!
//! Invariant: nothing else in the crate reads files or the environment for settings, and
//! everything downstream receives checked values (decimals parsed, references resolved), so
//! a running server cannot meet an invalid configuration.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::auth::SecretHash;
use crate::decimal::{minor_unit_exponent, Decimal};
use crate::domain::{
    Business, BusinessId, Client, ClientSecret, Currency, Partner, PartnerTarget, PartnerUrl,
    Program, ProgramId, Webhook, WebhookSecret, WEBHOOK_EVENTS,
};

/// A configuration problem: `key` names the TOML key, `reason` says what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// The demo client's secret in `config.example.toml` and the README: public, so a config
/// that still accepts it lets anyone in. Start-up warns about it every time.
pub const DEMO_SECRET: &str = "cosmo-demo-secret";
/// The `secret_hash` of [`DEMO_SECRET`] as `config.example.toml` has it.
pub const DEMO_SECRET_HASH: &str =
    "$pbkdf2-sha256$i=100000$ceRnr2ug7SqSVUg1IbqDUw$5OoPXq9Jeb6ACpXaBg2E/0uIxj7bB16qL4ra85TSTac";

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Listening, limits and timeouts of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen; port 0 picks a free port (the address is logged).
    pub listen: SocketAddr,
    /// Largest accepted request body; larger gets 413.
    pub max_body_bytes: usize,
    /// Largest accepted body of `POST /v1/transactions/batch` (up to 1000 items).
    pub max_batch_body_bytes: usize,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body once its headers arrived.
    pub body_read_timeout: Duration,
    /// Time a client may take to accept more of any response (whole or streamed) once
    /// the socket is full; then the connection is closed.
    pub send_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before connections are cut.
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// A tracing filter: "info", "warn", "cosmopoints=debug", …
    pub log_level: String,
    /// Write requests that may wait for the writer; beyond it, 503 with `Retry-After`.
    pub write_queue: usize,
    /// Most write requests applied in one database commit.
    pub max_batch: usize,
    /// Proxies whose `X-Forwarded-For` is believed when counting failed logins per
    /// address; from anyone else the header is ignored.
    pub trusted_proxies: Vec<Cidr>,
}

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `address/prefix`, or a bare address (a block of one).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().ok()?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().ok().filter(|&p| p <= bits)?
            }
            Some(_) => return None,
        };
        Some(Cidr { network, prefix })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let masked = |a: u128, bits: u32| -> u128 {
            let host = bits - u32::from(self.prefix);
            if host >= 128 {
                0
            } else {
                a >> host
            }
        };
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), 32) == masked(u32::from(a).into(), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), 128) == masked(u128::from(a), 128)
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub token_ttl_seconds: u64,
    /// From the config; `None` means the key generated once and kept in the database.
    pub signing_key: Option<Vec<u8>>,
    /// Failed `/v1/auth` attempts allowed in the window before 429, per kind of key.
    pub failed_logins: LoginLimits,
}

/// Failed logins allowed per sliding window: per (client id, address) pair, low, against
/// guessing one client's secret from one place; per address, higher, so that one broken
/// till behind a NAT does not lock out the other clients there; per client id across all
/// addresses, much higher, against guessing from many places.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    pub per_client_and_address: u32,
    pub per_address: u32,
    pub per_client: u32,
    pub window: Duration,
}

/// The admin listener: metrics, readiness and online backups, for the operator only.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where to listen; never the API's address (port 0 picks a free port, logged).
    pub listen: SocketAddr,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// `[admin]`; `None` when absent (no admin listener).
    pub admin: Option<AdminConfig>,
    /// The database file; relative paths are resolved against the config file's folder.
    pub storage_path: PathBuf,
    /// The database's page cache, in bytes; `None` (no `cache_mib`): sized from the file
    /// when it is opened ([`crate::store::Limits::cache_bytes`]).
    pub storage_cache_bytes: Option<usize>,
    /// `[storage] backend`: redb (the file above) unless the config says postgres.
    pub storage_backend: StorageBackend,
    pub auth: AuthConfig,
    pub currencies: BTreeMap<String, Currency>,
    pub programs: BTreeMap<ProgramId, Program>,
    pub businesses: Vec<Business>,
    /// Things worth a warning in the log once tracing is up (plain-text secrets).
    pub warnings: Vec<String>,
    /// client id → index into `businesses`.
    clients: HashMap<String, usize>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base)
    }

    /// Validates TOML `text`; relative storage paths are taken against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        raw.validate(base)
    }

    pub fn business(&self, id: &str) -> Option<&Business> {
        self.businesses.iter().find(|b| b.id == *id)
    }

    /// The business and client that own `client_id`.
    pub fn client(&self, client_id: &str) -> Option<(&Business, &Client)> {
        let business = &self.businesses[*self.clients.get(client_id)?];
        let client = business.clients.iter().find(|c| c.client_id == client_id)?;
        Some((business, client))
    }

    pub fn currency(&self, code: &str) -> &Currency {
        self.currencies
            .get(code)
            .expect("validation made every business currency a configured currency")
    }
}

/// One line for a TOML syntax or type error: the line, its key as written, and what.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().replace('\n', " ").trim().to_owned();
    let Some(span) = e.span() else {
        return err("config", message);
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let written = text.lines().nth(line - 1).unwrap_or("").trim();
    // A url may hold a password: name its key, never its value.
    let written = if written.starts_with("url") {
        "url = …"
    } else {
        written
    };
    let written: String = written.chars().take(60).collect();
    err(format!("line {line} (`{written}`)"), message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    auth: RawAuth,
    /// Absent: no admin listener.
    admin: Option<RawAdmin>,
    /// `CODE = "units per USD"`, or `CODE = { units_per_usd = "…", exponent = N }`; read
    /// as TOML values so that each form's mistakes are reported under their own key.
    #[serde(default)]
    currencies: BTreeMap<String, toml::Value>,
    #[serde(default)]
    programs: Vec<RawProgram>,
    #[serde(default)]
    businesses: Vec<RawBusiness>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: u64,
    #[serde(default = "default_max_batch_body_bytes")]
    max_batch_body_bytes: u64,
    #[serde(default = "default_max_connections")]
    max_connections: u64,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout_seconds: u64,
    #[serde(default = "default_body_read_timeout")]
    body_read_timeout_seconds: u64,
    #[serde(default = "default_send_timeout")]
    send_timeout_seconds: u64,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace_seconds: u64,
    #[serde(default = "default_log_format")]
    log_format: String,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default = "default_write_queue")]
    write_queue: u64,
    #[serde(default = "default_max_batch")]
    max_batch: u64,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        toml::from_str("").expect("every server field has a default")
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_max_body_bytes() -> u64 {
    64 * 1024
}
fn default_max_batch_body_bytes() -> u64 {
    1 << 20
}
fn default_max_connections() -> u64 {
    1024
}
fn default_header_read_timeout() -> u64 {
    10
}
fn default_body_read_timeout() -> u64 {
    10
}
fn default_send_timeout() -> u64 {
    10
}
fn default_shutdown_grace() -> u64 {
    10
}
fn default_log_format() -> String {
    "human".to_owned()
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_write_queue() -> u64 {
    4096
}
fn default_max_batch() -> u64 {
    256
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
}

/// Which database holds the ledger: `[storage] backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// The embedded redb file at `Config::storage_path` (the default).
    Redb,
    /// A PostgreSQL database, shared by every process configured with it.
    Postgres(PostgresConfig),
}

/// `[storage] url` and `pool_size` for `backend = "postgres"`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host:port/db`: may hold a password, so it is never
    /// printed (`Debug` leaves it out) and never echoed in an error.
    pub url: String,
    /// Connections in the pool of each process.
    pub pool_size: usize,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &"<not shown>")
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    #[serde(default = "default_backend")]
    backend: String,
    #[serde(default = "default_storage_path")]
    path: String,
    #[serde(default)]
    cache_mib: Option<u64>,
    url: Option<String>,
    pool_size: Option<u64>,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            backend: default_backend(),
            path: default_storage_path(),
            cache_mib: None,
            url: None,
            pool_size: None,
        }
    }
}

fn default_backend() -> String {
    "redb".to_owned()
}

/// Connections per process when `pool_size` is absent.
const DEFAULT_POOL_SIZE: u64 = 8;

/// `[storage] backend`, `url`, `pool_size`. Errors name the key and never repeat the url.
fn storage_backend(raw: &RawStorage) -> Result<StorageBackend, ConfigError> {
    match raw.backend.as_str() {
        "redb" => {
            if raw.url.is_some() {
                return Err(err("storage.url", "only for backend = \"postgres\""));
            }
            if raw.pool_size.is_some() {
                return Err(err("storage.pool_size", "only for backend = \"postgres\""));
            }
            Ok(StorageBackend::Redb)
        }
        "postgres" => {
            let Some(url) = &raw.url else {
                return Err(err(
                    "storage.url",
                    "required for backend = \"postgres\" (postgres://user@host:port/db)",
                ));
            };
            let rest = url
                .strip_prefix("postgres://")
                .or_else(|| url.strip_prefix("postgresql://"));
            match rest {
                Some(rest) if !rest.is_empty() && !rest.chars().any(char::is_whitespace) => {}
                _ => {
                    return Err(err(
                        "storage.url",
                        "must be a postgres://user@host:port/db url (not shown: it may hold a password)",
                    ))
                }
            }
            let pool_size = positive(
                "storage.pool_size",
                raw.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
                1024,
            )? as usize;
            Ok(StorageBackend::Postgres(PostgresConfig {
                url: url.clone(),
                pool_size,
            }))
        }
        _ => Err(err("storage.backend", "must be \"redb\" or \"postgres\"")),
    }
}

fn default_storage_path() -> String {
    "data/cosmopoints.redb".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default = "default_ttl")]
    token_ttl_seconds: u64,
    signing_key: Option<String>,
    failed_logins_per_client_and_address: Option<u64>,
    failed_logins_per_address: Option<u64>,
    failed_logins_per_client: Option<u64>,
    failed_logins_window_seconds: Option<u64>,
    /// The older name of `failed_logins_per_client_and_address`; still accepted.
    max_failed_attempts: Option<u64>,
    /// The older name of `failed_logins_window_seconds`; still accepted.
    failed_attempts_window_seconds: Option<u64>,
}

impl Default for RawAuth {
    fn default() -> Self {
        toml::from_str("").expect("every auth field has a default")
    }
}

fn default_ttl() -> u64 {
    600
}

/// A setting that has an older name too: the one given (not both), else `default`.
fn renamed(
    key: &str,
    value: Option<u64>,
    old_key: &str,
    old_value: Option<u64>,
    default: u64,
) -> Result<u64, ConfigError> {
    match (value, old_value) {
        (Some(_), Some(_)) => Err(err(
            old_key,
            format!("is the older name of {key}; give only {key}"),
        )),
        (Some(v), None) | (None, Some(v)) => Ok(v),
        (None, None) => Ok(default),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    id: String,
    name: String,
    price_per_point_usd: String,
    min_points: Option<u64>,
    max_points: Option<u64>,
    partner: Option<RawPartner>,
}

/// `[programs.partner]` as written; [`partner`] checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartner {
    url: Option<String>,
    secret: Option<String>,
    timeout_seconds: Option<u64>,
    retry_schedule_seconds: Option<Vec<u64>>,
    concurrency: Option<u64>,
    ca_file: Option<String>,
    #[serde(default)]
    sandbox: bool,
}

const DEFAULT_PARTNER_TIMEOUT_SECONDS: u64 = 10;
/// About five seconds, five minutes, half an hour, two, five and twice ten hours: a
/// partner that is down for a day still receives everything.
const DEFAULT_RETRY_SCHEDULE: [u64; 7] = [5, 300, 1800, 7200, 18000, 36000, 36000];
/// The sandbox shows the whole lifecycle (pending, retried, completed) within seconds.
const SANDBOX_RETRY_SCHEDULE: [u64; 3] = [1, 2, 4];
const DEFAULT_PARTNER_CONCURRENCY: u64 = 16;

/// Checks one program's `[programs.partner]`; `key` makes `programs[i].partner.<field>`.
fn partner(
    raw: RawPartner,
    key: &dyn Fn(&str) -> String,
    base: &Path,
) -> Result<Partner, ConfigError> {
    let target = if raw.sandbox {
        for (field, given) in [("url", raw.url.is_some()), ("secret", raw.secret.is_some())] {
            if given {
                return Err(err(
                    key(field),
                    "must not be given with sandbox = true (the sandbox is in-process)",
                ));
            }
        }
        if raw.ca_file.is_some() {
            return Err(err(
                key("ca_file"),
                "must not be given with sandbox = true (the sandbox makes no connection)",
            ));
        }
        PartnerTarget::Sandbox
    } else {
        let url = raw
            .url
            .ok_or_else(|| err(key("url"), "is required (or sandbox = true)"))?;
        let base_url = partner_url(&url).map_err(|reason| err(key("url"), reason))?;
        let secret = raw
            .secret
            .ok_or_else(|| err(key("secret"), "is required with url"))?;
        let secret = webhook_secret(&secret).map_err(|reason| err(key("secret"), reason))?;
        if raw.ca_file.is_some() && !base_url.https {
            return Err(err(
                key("ca_file"),
                "is only used for an https url; this url is http",
            ));
        }
        PartnerTarget::Http { base_url, secret }
    };

    let timeout_seconds = raw
        .timeout_seconds
        .unwrap_or(DEFAULT_PARTNER_TIMEOUT_SECONDS);
    let timeout = Duration::from_secs(positive(&key("timeout_seconds"), timeout_seconds, 300)?);

    let retry_schedule = match raw.retry_schedule_seconds {
        Some(schedule) => schedule,
        None if target == PartnerTarget::Sandbox => SANDBOX_RETRY_SCHEDULE.to_vec(),
        None => DEFAULT_RETRY_SCHEDULE.to_vec(),
    };
    if retry_schedule.is_empty() {
        return Err(err(
            key("retry_schedule_seconds"),
            "must list at least one wait (seconds before the second attempt)",
        ));
    }
    for (j, wait) in retry_schedule.iter().enumerate() {
        positive(&key(&format!("retry_schedule_seconds[{j}]")), *wait, 86_400)?;
    }

    let concurrency = positive(
        &key("concurrency"),
        raw.concurrency.unwrap_or(DEFAULT_PARTNER_CONCURRENCY),
        1024,
    )? as usize;

    let (ca_file, ca_certificates) = match raw.ca_file {
        None => (None, Vec::new()),
        Some(name) => {
            if name.is_empty() {
                return Err(err(key("ca_file"), "must not be empty"));
            }
            let path = base.join(&name);
            let certificates =
                ca_certificates(&path).map_err(|reason| err(key("ca_file"), reason))?;
            (Some(path), certificates)
        }
    };

    Ok(Partner {
        target,
        timeout,
        retry_schedule,
        concurrency,
        ca_file,
        ca_certificates,
    })
}

/// Checks a partner base URL by hand (the config knows no HTTP library): `http://` or
/// `https://`, a host with an optional port, an optional path; no userinfo (credentials
/// belong in the signature, not in a URL that ends up in logs), no query or fragment
/// (endpoints are appended to the path). Only characters that need no escaping in a URI
/// are accepted, so every accepted URL is also a valid request URI.
fn partner_url(url: &str) -> Result<PartnerUrl, String> {
    let lower = url.to_ascii_lowercase();
    let (https, rest) = if lower.starts_with("https://") {
        (true, &url["https://".len()..])
    } else if lower.starts_with("http://") {
        (false, &url["http://".len()..])
    } else {
        return Err(format!("\"{url}\" must start with http:// or https://"));
    };
    if url.contains('?') || url.contains('#') {
        return Err("must not have a query (?…) or fragment (#…)".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("must not carry user information (user:password@)".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or("has an IPv6 host without its closing ]")?;
        let host = &v6[..end];
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("\"[{host}]\" is not an IPv6 address"));
        }
        (&authority[..end + 2], &v6[end + 1..])
    } else {
        match authority.find(':') {
            Some(colon) => (&authority[..colon], &authority[colon..]),
            None => (authority, ""),
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if !host.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "host \"{host}\" may hold only letters, digits, '-' and '.'"
        ));
    }
    if let Some(port) = port.strip_prefix(':') {
        match port.parse::<u16>() {
            Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return Err(format!("port \"{port}\" is not a number from 1 to 65535")),
        }
    } else if !port.is_empty() {
        return Err("has text after the host that is not a :port".into());
    }
    // RFC 3986 path characters: unreserved, sub-delims, ':', '@', '/', and %-escapes.
    let path_ok = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b));
    if !path_ok {
        return Err(
            "path may hold only letters, digits and -._~!$&'()*+,;=:@/% (escape others as %XX)"
                .into(),
        );
    }
    Ok(PartnerUrl {
        https,
        authority: authority.to_ascii_lowercase(),
        path: path.trim_end_matches('/').to_owned(),
    })
}

/// `whsec_` + standard base64 of 24..=64 bytes, as Standard Webhooks writes secrets.
fn webhook_secret(text: &str) -> Result<WebhookSecret, String> {
    // The reasons never quote the text: it is a secret.
    let encoded = text
        .strip_prefix("whsec_")
        .ok_or("must start with whsec_ (then the base64 of 24 to 64 random bytes)")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "is not whsec_ followed by standard base64")?;
    if !(24..=64).contains(&bytes.len()) {
        return Err(format!(
            "must decode to 24 to 64 bytes, not {}",
            bytes.len()
        ));
    }
    Ok(WebhookSecret::new(bytes))
}

/// Reads a PEM file of CA certificates and checks that each one can be a trust anchor,
/// so a bad file stops the start rather than every later delivery.
fn ca_certificates(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut certificates = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
        roots.add(cert.clone()).map_err(|e| {
            format!(
                "{} holds a certificate that cannot be a CA: {e}",
                path.display()
            )
        })?;
        certificates.push(cert.to_vec());
    }
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certificates)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBusiness {
    id: String,
    name: String,
    program_id: String,
    currency: String,
    #[serde(default)]
    programs: Vec<String>,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
}

/// `[[businesses.webhooks]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret: String,
    /// Absent: every event.
    events: Option<Vec<String>>,
}

/// Checks one merchant webhook; `key` makes `businesses[i].webhooks[j].<field>`.
fn webhook(raw: RawWebhook, key: &dyn Fn(&str) -> String) -> Result<Webhook, ConfigError> {
    let base_url = partner_url(&raw.url).map_err(|reason| err(key("url"), reason))?;
    let secret = webhook_secret(&raw.secret).map_err(|reason| err(key("secret"), reason))?;
    let events = match raw.events {
        None => WEBHOOK_EVENTS.to_vec(),
        Some(names) => {
            if names.is_empty() {
                return Err(err(
                    key("events"),
                    "must name at least one event (leave it out for all)",
                ));
            }
            let mut events = Vec::new();
            for (n, name) in names.iter().enumerate() {
                let known = WEBHOOK_EVENTS
                    .iter()
                    .find(|e| **e == name.as_str())
                    .ok_or_else(|| {
                        err(
                            key(&format!("events[{n}]")),
                            format!(
                                "\"{name}\" is not an event; the events are {}",
                                WEBHOOK_EVENTS.join(", ")
                            ),
                        )
                    })?;
                if !events.contains(known) {
                    events.push(*known);
                }
            }
            events
        }
    };
    Ok(Webhook {
        url: base_url.join(""),
        endpoint: Partner {
            target: PartnerTarget::Http { base_url, secret },
            timeout: Duration::from_secs(DEFAULT_PARTNER_TIMEOUT_SECONDS),
            retry_schedule: DEFAULT_RETRY_SCHEDULE.to_vec(),
            concurrency: DEFAULT_PARTNER_CONCURRENCY as usize,
            ca_file: None,
            ca_certificates: Vec::new(),
        },
        events,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    client_id: String,
    secret_hash: Option<String>,
    secret: Option<String>,
}

/// Largest minor-unit exponent a config may give: 8 (a satoshi is 10^-8 BTC). Beyond
/// it, the exact points formula could overflow 128 bits for the largest values.
pub const MAX_EXPONENT: u32 = 8;

/// One `[currencies]` entry: `"3.6725"` (the exponent from ISO 4217), or
/// `{ units_per_usd = "3.6725", exponent = 2 }` (the exponent given; required for a code
/// that ISO 4217 does not list with minor units).
fn currency_entry(
    key: &str,
    code: &str,
    entry: toml::Value,
) -> Result<(Decimal, u32), ConfigError> {
    let (rate, exponent) = match entry {
        toml::Value::String(rate) => (rate, None),
        toml::Value::Table(mut table) => {
            let rate = match table.remove("units_per_usd") {
                Some(toml::Value::String(rate)) => rate,
                Some(_) => {
                    return Err(err(
                        format!("{key}.units_per_usd"),
                        "must be a decimal string like \"3.6725\"",
                    ))
                }
                None => return Err(err(format!("{key}.units_per_usd"), "is required")),
            };
            let exponent = match table.remove("exponent") {
                None => None,
                Some(toml::Value::Integer(n)) if (0..=i64::from(MAX_EXPONENT)).contains(&n) => {
                    Some(n as u32)
                }
                Some(_) => {
                    return Err(err(
                        format!("{key}.exponent"),
                        format!("must be a whole number from 0 to {MAX_EXPONENT}"),
                    ))
                }
            };
            if let Some(unknown) = table.keys().next() {
                return Err(err(
                    format!("{key}.{unknown}"),
                    "unknown key (expected units_per_usd and exponent)",
                ));
            }
            (rate, exponent)
        }
        _ => {
            return Err(err(
                key,
                "must be \"units per USD\" or { units_per_usd = \"…\", exponent = N }",
            ))
        }
    };
    let units_per_usd = Decimal::parse(&rate).map_err(|reason| err(key, reason))?;
    if units_per_usd.is_zero() {
        return Err(err(key, "units per USD must be greater than 0"));
    }
    let exponent = match exponent.or_else(|| minor_unit_exponent(code)) {
        Some(exponent) => exponent,
        None => {
            return Err(err(
                key,
                format!(
                    "{code} is not an ISO 4217 currency with minor units: give its exponent, \
                     as {code} = {{ units_per_usd = \"{rate}\", exponent = N }}"
                ),
            ))
        }
    };
    Ok((units_per_usd, exponent))
}

/// Ids are used in URLs, tokens and database keys: 1..=128 characters, no control
/// characters, no surrounding spaces.
fn check_id(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.chars().count() > 128 {
        return Err(err(key, "must be 1 to 128 characters"));
    }
    // Ids travel in tokens, which give each id one length byte.
    if value.len() > 255 {
        return Err(err(key, "must be at most 255 bytes of UTF-8"));
    }
    if value.chars().any(char::is_control) || value.trim() != value {
        return Err(err(
            key,
            "must not contain control characters or surrounding spaces",
        ));
    }
    Ok(())
}

/// `[admin] listen`: an address:port that cannot be the API's. Both on port 0 get two
/// different free ports; otherwise the same port is refused when the addresses overlap
/// (equal, or either one all interfaces): the admin endpoints must never be reachable
/// where the API is.
fn admin_listen(text: &str, api: SocketAddr) -> Result<SocketAddr, ConfigError> {
    let key = "admin.listen";
    let admin: SocketAddr = text.parse().map_err(|_| {
        err(
            key,
            format!("\"{text}\" is not an address:port like 127.0.0.1:9090"),
        )
    })?;
    let overlap =
        admin.ip() == api.ip() || admin.ip().is_unspecified() || api.ip().is_unspecified();
    if admin.port() != 0 && admin.port() == api.port() && overlap {
        return Err(err(
            key,
            format!(
                "\"{text}\" is the API's address (server.listen = \"{api}\"); the admin \
                 endpoints (metrics, backups) need an address of their own"
            ),
        ));
    }
    Ok(admin)
}

fn positive(key: &str, value: u64, max: u64) -> Result<u64, ConfigError> {
    if value == 0 || value > max {
        return Err(err(key, format!("must be between 1 and {max}")));
    }
    Ok(value)
}

fn login_limits(a: &RawAuth) -> Result<LoginLimits, ConfigError> {
    let limit = |key: &str, value: u64| positive(key, value, 1_000_000).map(|v| v as u32);
    let pair_key = "auth.failed_logins_per_client_and_address";
    let window_key = "auth.failed_logins_window_seconds";
    let pair = renamed(
        pair_key,
        a.failed_logins_per_client_and_address,
        "auth.max_failed_attempts",
        a.max_failed_attempts,
        10,
    )?;
    let window = renamed(
        window_key,
        a.failed_logins_window_seconds,
        "auth.failed_attempts_window_seconds",
        a.failed_attempts_window_seconds,
        60,
    )?;
    // An old key's value is checked under the name the file used.
    let pair_key = if a.max_failed_attempts.is_some() {
        "auth.max_failed_attempts"
    } else {
        pair_key
    };
    let window_key = if a.failed_attempts_window_seconds.is_some() {
        "auth.failed_attempts_window_seconds"
    } else {
        window_key
    };
    Ok(LoginLimits {
        per_client_and_address: limit(pair_key, pair)?,
        per_address: limit(
            "auth.failed_logins_per_address",
            a.failed_logins_per_address.unwrap_or(100),
        )?,
        per_client: limit(
            "auth.failed_logins_per_client",
            a.failed_logins_per_client.unwrap_or(1000),
        )?,
        window: Duration::from_secs(positive(window_key, window, 86_400)?),
    })
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let s = &self.server;
        let listen: SocketAddr = s.listen.parse().map_err(|_| {
            err(
                "server.listen",
                format!(
                    "\"{}\" is not an address:port like 127.0.0.1:8080",
                    s.listen
                ),
            )
        })?;
        let log_format = match s.log_format.as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "server.log_format",
                    format!("\"{other}\" is neither \"human\" nor \"json\""),
                ))
            }
        };
        let secs = |key: &str, v: u64| positive(key, v, 86_400).map(Duration::from_secs);
        let server = ServerConfig {
            listen,
            max_body_bytes: positive("server.max_body_bytes", s.max_body_bytes, 16 << 20)? as usize,
            max_batch_body_bytes: positive(
                "server.max_batch_body_bytes",
                s.max_batch_body_bytes,
                64 << 20,
            )? as usize,
            max_connections: positive("server.max_connections", s.max_connections, 1 << 20)?
                as usize,
            header_read_timeout: secs(
                "server.header_read_timeout_seconds",
                s.header_read_timeout_seconds,
            )?,
            body_read_timeout: secs(
                "server.body_read_timeout_seconds",
                s.body_read_timeout_seconds,
            )?,
            send_timeout: secs("server.send_timeout_seconds", s.send_timeout_seconds)?,
            shutdown_grace: secs("server.shutdown_grace_seconds", s.shutdown_grace_seconds)?,
            log_format,
            log_level: {
                tracing_subscriber::EnvFilter::try_new(&s.log_level).map_err(|_| {
                    err(
                        "server.log_level",
                        format!("\"{}\" is not a log filter like \"info\"", s.log_level),
                    )
                })?;
                s.log_level.clone()
            },
            write_queue: positive("server.write_queue", s.write_queue, 1 << 20)? as usize,
            max_batch: positive("server.max_batch", s.max_batch, 100_000)? as usize,
            trusted_proxies: s
                .trusted_proxies
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    Cidr::parse(text).ok_or_else(|| {
                        err(
                            format!("server.trusted_proxies[{i}]"),
                            format!("\"{text}\" is not an address or block like 10.0.0.0/8"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        let admin = match &self.admin {
            None => None,
            Some(a) => Some(AdminConfig {
                listen: admin_listen(&a.listen, listen)?,
            }),
        };

        if self.storage.path.is_empty() {
            return Err(err("storage.path", "must not be empty"));
        }
        let storage_path = base.join(&self.storage.path);
        let storage_cache_bytes = self
            .storage
            .cache_mib
            .map(|mib| positive("storage.cache_mib", mib, 1 << 20).map(|m| m as usize * (1 << 20)))
            .transpose()?;
        let storage_backend = storage_backend(&self.storage)?;

        let a = &self.auth;
        let signing_key = match &a.signing_key {
            None => None,
            Some(text) => {
                let key = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| err("auth.signing_key", "is not valid base64"))?;
                if key.len() < 32 {
                    return Err(err(
                        "auth.signing_key",
                        format!("must decode to at least 32 bytes, not {}", key.len()),
                    ));
                }
                Some(key)
            }
        };
        let auth = AuthConfig {
            token_ttl_seconds: positive("auth.token_ttl_seconds", a.token_ttl_seconds, 86_400)?,
            signing_key,
            failed_logins: login_limits(a)?,
        };

        let mut currencies = BTreeMap::new();
        for (code, entry) in self.currencies {
            let key = format!("currencies.{code}");
            if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(err(
                    key,
                    "is not a currency code (three capital letters, like ISO 4217's)",
                ));
            }
            let (units_per_usd, exponent) = currency_entry(&key, &code, entry)?;
            currencies.insert(
                code.clone(),
                Currency {
                    code,
                    units_per_usd,
                    exponent,
                },
            );
        }

        let mut programs = BTreeMap::new();
        for (i, p) in self.programs.into_iter().enumerate() {
            let key = |field: &str| format!("programs[{i}].{field}");
            check_id(&key("id"), &p.id)?;
            if p.name.trim().is_empty() || p.name.chars().any(char::is_control) {
                return Err(err(
                    key("name"),
                    "must be a non-empty name without control characters",
                ));
            }
            let price = Decimal::parse(&p.price_per_point_usd)
                .map_err(|reason| err(key("price_per_point_usd"), reason))?;
            if price.is_zero() {
                return Err(err(key("price_per_point_usd"), "must be greater than 0"));
            }
            let min_points = p.min_points.unwrap_or(1);
            if min_points == 0 {
                return Err(err(
                    key("min_points"),
                    "must be at least 1 (0 points is never issued)",
                ));
            }
            if let Some(max) = p.max_points {
                if max < min_points {
                    return Err(err(key("max_points"), "must not be less than min_points"));
                }
            }
            if programs.contains_key(p.id.as_str()) {
                return Err(err(key("id"), format!("duplicate program id \"{}\"", p.id)));
            }
            let partner = match p.partner {
                None => None,
                Some(raw) => {
                    let key = |field: &str| format!("programs[{i}].partner.{field}");
                    Some(partner(raw, &key, base)?)
                }
            };
            let id = ProgramId::trusted(p.id);
            programs.insert(
                id.clone(),
                Program {
                    id,
                    name: p.name,
                    price_per_point_usd: price,
                    min_points,
                    max_points: p.max_points,
                    partner,
                },
            );
        }

        if self.businesses.is_empty() {
            return Err(err(
                "businesses",
                "at least one [[businesses]] entry is required",
            ));
        }
        let mut businesses = Vec::new();
        let mut clients = HashMap::new();
        let mut business_ids = HashSet::new();
        let mut warnings = Vec::new();
        for (i, b) in self.businesses.into_iter().enumerate() {
            let key = |field: &str| format!("businesses[{i}].{field}");
            check_id(&key("id"), &b.id)?;
            if !business_ids.insert(b.id.clone()) {
                return Err(err(
                    key("id"),
                    format!("duplicate business id \"{}\"", b.id),
                ));
            }
            if b.name.trim().is_empty() || b.name.chars().any(char::is_control) {
                return Err(err(
                    key("name"),
                    "must be a non-empty name without control characters",
                ));
            }
            check_id(&key("program_id"), &b.program_id)?;
            if !currencies.contains_key(&b.currency) {
                return Err(err(
                    key("currency"),
                    format!("\"{}\" is not a key of [currencies]", b.currency),
                ));
            }
            let mut enabled = HashSet::new();
            for (j, program) in b.programs.iter().enumerate() {
                if !programs.contains_key(program.as_str()) {
                    return Err(err(
                        format!("businesses[{i}].programs[{j}]"),
                        format!("program \"{program}\" is not defined in [[programs]]"),
                    ));
                }
                if !enabled.insert(program) {
                    return Err(err(
                        format!("businesses[{i}].programs[{j}]"),
                        format!("program \"{program}\" is listed twice"),
                    ));
                }
            }
            if b.clients.is_empty() {
                return Err(err(
                    key("clients"),
                    "at least one [[businesses.clients]] entry is required",
                ));
            }
            let mut business_clients = Vec::new();
            for (j, c) in b.clients.into_iter().enumerate() {
                let key = |field: &str| format!("businesses[{i}].clients[{j}].{field}");
                check_id(&key("client_id"), &c.client_id)?;
                if clients.insert(c.client_id.clone(), i).is_some() {
                    return Err(err(
                        key("client_id"),
                        format!("duplicate client id \"{}\"", c.client_id),
                    ));
                }
                // Only the example's own hash is recognised: trying the demo secret
                // against every configured hash would cost one PBKDF2 run per client at
                // each start.
                let demo = c.secret_hash.as_deref() == Some(DEMO_SECRET_HASH)
                    || c.secret.as_deref() == Some(DEMO_SECRET);
                if demo {
                    let field = if c.secret.is_some() {
                        "secret"
                    } else {
                        "secret_hash"
                    };
                    warnings.push(format!(
                        "{} (client \"{}\") accepts the public demo secret of config.example.toml: \
                         anyone can log in as this client; make a new secret with \
                         `cosmopoints hash-secret --generate`",
                        key(field),
                        c.client_id
                    ));
                }
                let secret = match (c.secret_hash, c.secret) {
                    (Some(hash), None) => ClientSecret::Hash(
                        SecretHash::parse(&hash)
                            .map_err(|reason| err(key("secret_hash"), reason))?,
                    ),
                    (None, Some(plain)) => {
                        if plain.is_empty() {
                            return Err(err(key("secret"), "must not be empty"));
                        }
                        warnings.push(format!(
                            "{} holds a plain-text secret; put the output of `cosmopoints hash-secret` in secret_hash instead",
                            key("secret")
                        ));
                        ClientSecret::Plain(plain)
                    }
                    (Some(_), Some(_)) => {
                        return Err(err(key("secret"), "give secret_hash or secret, not both"))
                    }
                    (None, None) => {
                        return Err(err(key("secret_hash"), "is required (or a plain `secret`)"))
                    }
                };
                business_clients.push(Client {
                    client_id: c.client_id,
                    secret,
                });
            }
            let mut webhooks = Vec::new();
            for (j, raw) in b.webhooks.into_iter().enumerate() {
                let key = |field: &str| format!("businesses[{i}].webhooks[{j}].{field}");
                let hook = webhook(raw, &key)?;
                if webhooks.iter().any(|w: &Webhook| w.url == hook.url) {
                    return Err(err(key("url"), "is listed twice for this business"));
                }
                webhooks.push(hook);
            }
            businesses.push(Business {
                id: BusinessId::trusted(b.id),
                name: b.name,
                program_id: b.program_id,
                currency: b.currency,
                programs: b.programs.into_iter().map(ProgramId::trusted).collect(),
                clients: business_clients,
                webhooks,
            });
        }

        Ok(Config {
            server,
            admin,
            storage_path,
            storage_cache_bytes,
            storage_backend,
            auth,
            currencies,
            programs,
            businesses,
            warnings,
            clients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_listener_is_never_the_api_port() {
        let api: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        for bad in ["127.0.0.1:8080", "0.0.0.0:8080", "nowhere", "127.0.0.1"] {
            let e = admin_listen(bad, api).expect_err(bad);
            assert_eq!(e.key, "admin.listen", "{bad}");
        }
        for good in ["127.0.0.1:9090", "127.0.0.2:8080", "127.0.0.1:0"] {
            assert!(admin_listen(good, api).is_ok(), "{good}");
        }
        let any: SocketAddr = "0.0.0.0:0".parse().expect("addr");
        assert!(admin_listen("127.0.0.1:0", any).is_ok());
        let all: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert!(admin_listen("127.0.0.1:8080", all).is_err());
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let block = Cidr::parse("10.0.0.0/8").expect("v4 block");
        assert!(block.contains(ip("10.255.0.1")));
        assert!(block.contains(ip("::ffff:10.1.1.1")));
        assert!(!block.contains(ip("11.0.0.1")));
        assert!(!block.contains(ip("::1")));
        let one = Cidr::parse("192.0.2.7").expect("bare address");
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let all = Cidr::parse("0.0.0.0/0").expect("everything");
        assert!(all.contains(ip("203.0.113.1")));
        let v6 = Cidr::parse("2001:db8::/32").expect("v6 block");
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "proxy",
            "10.0.0.0/8/8",
            "1.2.3.4/+8",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    /// 24 bytes, the Standard Webhooks reference libraries' example secret.
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    /// A minimal valid config whose first program has `partner` as its partner table.
    fn with_partner(partner: &str) -> String {
        format!(
            r#"
[currencies]
USD = "1"
[[programs]]
id = "skywards"
name = "Skywards Miles"
price_per_point_usd = "0.012"
[programs.partner]
{partner}
[[businesses]]
id = "acme"
name = "Acme"
program_id = "acme-rewards"
currency = "USD"
programs = ["skywards"]
[[businesses.clients]]
client_id = "acme-pos"
secret = "acme-secret"
"#
        )
    }

    fn load(partner: &str, base: &Path) -> Result<Partner, ConfigError> {
        let config = Config::parse(&with_partner(partner), base)?;
        Ok(config.programs["skywards"]
            .partner
            .clone()
            .expect("the test config has a partner"))
    }

    /// The one check of this file: `partner` fails with `(key, reason fragment)`.
    fn check_error(partner: &str, key: &str, reason: &str) {
        let e = load(partner, Path::new("/nonexistent")).expect_err(partner);
        assert_eq!(e.key, key, "{partner}: {e}");
        assert!(e.reason.contains(reason), "{partner}: {e}");
        assert!(!e.to_string().contains("C2FVsBQIhrscChlQIMV"), "{e}");
    }

    #[test]
    fn a_partner_gets_the_documented_defaults() {
        let p = load(
            &format!("url = \"https://Partner.example:8443/cosmo/\"\nsecret = \"{SECRET}\""),
            Path::new("/"),
        )
        .expect("valid");
        let PartnerTarget::Http { base_url, secret } = &p.target else {
            panic!("an http partner: {p:?}");
        };
        assert_eq!(
            base_url.join("/credits"),
            "https://partner.example:8443/cosmo/credits"
        );
        assert_eq!(secret.bytes().len(), 24);
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(
            p.retry_schedule,
            vec![5, 300, 1800, 7200, 18000, 36000, 36000]
        );
        assert_eq!(p.concurrency, 16);
        assert_eq!(p.ca_file, None);
        assert!(
            !format!("{p:?}").contains("C2FVsBQ"),
            "Debug shows no secret"
        );

        let config = Config::parse(
            &with_partner("").replace("[programs.partner]", ""),
            Path::new("/"),
        )
        .expect("valid");
        assert!(config.programs["skywards"].partner.is_none());
    }

    /// A config whose `[storage]` section holds `storage`.
    fn with_storage(storage: &str) -> Result<Config, ConfigError> {
        Config::parse(
            &format!("[storage]\n{storage}\n{}", with_partner("sandbox = true")),
            Path::new("/"),
        )
    }

    #[test]
    fn the_page_cache_is_sized_from_the_file_unless_configured() {
        let parse = with_storage;
        assert_eq!(parse("").expect("valid").storage_cache_bytes, None);
        let c = parse("cache_mib = 64").expect("valid");
        assert_eq!(c.storage_cache_bytes, Some(64 << 20));
        for bad in ["cache_mib = 0", "cache_mib = 1048577"] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(
                e.to_string(),
                "storage.cache_mib: must be between 1 and 1048576"
            );
        }
    }

    #[test]
    fn the_storage_backend_is_redb_unless_postgres_is_configured() {
        let parse = with_storage;
        let c = parse("").expect("valid");
        assert_eq!(c.storage_backend, StorageBackend::Redb);
        let c = parse("backend = \"redb\"\npath = \"x.redb\"").expect("valid");
        assert_eq!(c.storage_backend, StorageBackend::Redb);

        let url = "postgres://app:hunter2@127.0.0.1:5432/points";
        let c = parse(&format!("backend = \"postgres\"\nurl = \"{url}\"")).expect("valid");
        let StorageBackend::Postgres(pg) = &c.storage_backend else {
            panic!("postgres expected");
        };
        assert_eq!((pg.url.as_str(), pg.pool_size), (url, 8));
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug shows no password"
        );
        let c = parse(&format!(
            "backend = \"postgres\"\nurl = \"{url}\"\npool_size = 3"
        ))
        .expect("valid");
        assert!(matches!(
            c.storage_backend,
            StorageBackend::Postgres(PostgresConfig { pool_size: 3, .. })
        ));

        for (storage, key) in [
            ("backend = \"sqlite\"", "storage.backend"),
            ("backend = \"postgres\"", "storage.url"),
            (
                "backend = \"postgres\"\nurl = \"mysql://hunter2@h/db\"",
                "storage.url",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://\"",
                "storage.url",
            ),
            (
                &format!("backend = \"postgres\"\nurl = \"{url}\"\npool_size = 0"),
                "storage.pool_size",
            ),
            (
                &format!("backend = \"postgres\"\nurl = \"{url}\"\npool_size = 5000"),
                "storage.pool_size",
            ),
            (&format!("url = \"{url}\""), "storage.url"),
            ("pool_size = 4", "storage.pool_size"),
        ] {
            let e = parse(storage).expect_err(storage);
            assert_eq!(e.key, key, "{storage}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        // A syntax error on the url's line names the line, not the password.
        let e =
            parse(&format!("backend = \"postgres\"\nurl = \"{url}\" oops")).expect_err("syntax");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_sandbox_partner_retries_within_seconds() {
        let p = load("sandbox = true", Path::new("/")).expect("valid");
        assert_eq!(p.target, PartnerTarget::Sandbox);
        assert_eq!(p.retry_schedule, vec![1, 2, 4]);
        let p = load(
            "sandbox = true\nretry_schedule_seconds = [3]\nconcurrency = 2\ntimeout_seconds = 1",
            Path::new("/"),
        )
        .expect("valid");
        assert_eq!((p.retry_schedule, p.concurrency), (vec![3], 2));
    }

    #[test]
    fn sandbox_excludes_url_secret_and_ca_file() {
        let key = "programs[0].partner.";
        check_error(
            "sandbox = true\nurl = \"http://p.example\"",
            &format!("{key}url"),
            "sandbox",
        );
        check_error(
            &format!("sandbox = true\nsecret = \"{SECRET}\""),
            &format!("{key}secret"),
            "sandbox",
        );
        check_error(
            "sandbox = true\nca_file = \"ca.pem\"",
            &format!("{key}ca_file"),
            "sandbox",
        );
        check_error("sandbox = false", &format!("{key}url"), "required");
        check_error("", &format!("{key}url"), "required");
    }

    #[test]
    fn urls_are_http_or_https_without_userinfo_query_or_fragment() {
        let key = "programs[0].partner.url";
        for (url, reason) in [
            ("ftp://p.example", "http:// or https://"),
            ("p.example/cosmo", "http:// or https://"),
            ("https://p.example/cosmo?x=1", "query"),
            ("https://p.example/cosmo#frag", "fragment"),
            ("https://user:pw@p.example/", "user information"),
            ("https://", "no host"),
            ("https:///path", "no host"),
            ("https://p.example:0/", "port"),
            ("https://p.example:99999/", "port"),
            ("https://p.example:/", "port"),
            ("https://p_x.example/", "host"),
            ("https://p.example/a b", "path"),
            ("https://[::1/", "IPv6"),
            ("https://[zz]/", "IPv6"),
        ] {
            check_error(
                &format!("url = \"{url}\"\nsecret = \"{SECRET}\""),
                key,
                reason,
            );
        }
        for url in [
            "http://127.0.0.1:9000",
            "https://[::1]:8443/x/y",
            "HTTP://P.example",
        ] {
            load(
                &format!("url = \"{url}\"\nsecret = \"{SECRET}\""),
                Path::new("/"),
            )
            .expect(url);
        }
    }

    #[test]
    fn secrets_are_whsec_and_24_to_64_bytes_of_base64() {
        let key = "programs[0].partner.secret";
        let url = "url = \"http://p.example\"";
        check_error(url, key, "required");
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        for (secret, reason) in [
            ("C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_owned(), "whsec_"),
            ("whsec_not base64!".to_owned(), "base64"),
            (format!("whsec_{}", b64(23)), "not 23"),
            (format!("whsec_{}", b64(65)), "not 65"),
        ] {
            check_error(&format!("{url}\nsecret = \"{secret}\""), key, reason);
        }
        for n in [24, 64] {
            load(
                &format!("{url}\nsecret = \"whsec_{}\"", b64(n)),
                Path::new("/"),
            )
            .expect("24 and 64 bytes are fine");
        }
    }

    #[test]
    fn limits_name_their_key() {
        let http = format!("url = \"http://p.example\"\nsecret = \"{SECRET}\"");
        let key = "programs[0].partner.";
        for (extra, field, reason) in [
            (
                "timeout_seconds = 0",
                "timeout_seconds",
                "between 1 and 300",
            ),
            (
                "timeout_seconds = 301",
                "timeout_seconds",
                "between 1 and 300",
            ),
            (
                "retry_schedule_seconds = []",
                "retry_schedule_seconds",
                "at least one",
            ),
            (
                "retry_schedule_seconds = [5, 0]",
                "retry_schedule_seconds[1]",
                "between 1 and 86400",
            ),
            (
                "retry_schedule_seconds = [86401]",
                "retry_schedule_seconds[0]",
                "between 1 and 86400",
            ),
            ("concurrency = 0", "concurrency", "between 1 and 1024"),
            ("concurrency = 1025", "concurrency", "between 1 and 1024"),
            (
                "ca_file = \"ca.pem\"",
                "ca_file",
                "only used for an https url",
            ),
        ] {
            check_error(
                &format!("{http}\n{extra}"),
                &format!("{key}{field}"),
                reason,
            );
        }
        let e = Config::parse(
            &with_partner(&format!("{http}\nretries = 3")),
            Path::new("/"),
        )
        .expect_err("unknown keys are refused");
        assert!(e.reason.contains("retries"), "{e}");
    }

    #[test]
    fn ca_files_are_read_at_load_relative_to_the_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).expect("write");
        std::fs::write(dir.path().join("empty.pem"), "no certificate here\n").expect("write");
        std::fs::write(
            dir.path().join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let https = format!("url = \"https://localhost:8443\"\nsecret = \"{SECRET}\"");

        let p = load(&format!("{https}\nca_file = \"ca.pem\""), dir.path()).expect("valid");
        assert_eq!(p.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(p.ca_certificates, vec![cert.cert.der().to_vec()]);

        for (file, reason) in [
            ("missing.pem", "cannot read"),
            ("empty.pem", "no PEM certificate"),
            ("broken.pem", "cannot be a CA"),
            ("", "must not be empty"),
        ] {
            let e = load(&format!("{https}\nca_file = \"{file}\""), dir.path()).expect_err(file);
            assert_eq!(e.key, "programs[0].partner.ca_file", "{e}");
            assert!(e.reason.contains(reason), "{file}: {e}");
        }
    }
}
