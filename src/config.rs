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
use crate::domain::{Business, BusinessId, Client, ClientSecret, Currency, Program, ProgramId};

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
    /// The database's page cache, in bytes.
    pub storage_cache_bytes: usize,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    #[serde(default = "default_storage_path")]
    path: String,
    #[serde(default = "default_cache_mib")]
    cache_mib: u64,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            path: default_storage_path(),
            cache_mib: default_cache_mib(),
        }
    }
}

fn default_cache_mib() -> u64 {
    16
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
        let storage_cache_bytes =
            positive("storage.cache_mib", self.storage.cache_mib, 1 << 20)? as usize * (1 << 20);

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
            let id = ProgramId::trusted(p.id);
            programs.insert(
                id.clone(),
                Program {
                    id,
                    name: p.name,
                    price_per_point_usd: price,
                    min_points,
                    max_points: p.max_points,
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
            businesses.push(Business {
                id: BusinessId::trusted(b.id),
                name: b.name,
                program_id: b.program_id,
                currency: b.currency,
                programs: b.programs.into_iter().map(ProgramId::trusted).collect(),
                clients: business_clients,
            });
        }

        Ok(Config {
            server,
            admin,
            storage_path,
            storage_cache_bytes,
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
}
