//! The shared state every request sees: configuration, store, token key, clock, throttle,
//! metrics.

use std::num::NonZeroU32;
use std::sync::Arc;

use crate::auth::{random_secret, CursorKey, SecretHash, TokenKey, DEFAULT_ITERATIONS};
use crate::clock::Clock;
use crate::config::{Config, StorageBackend};
use crate::domain::ClientSecret;
use crate::metrics::Metrics;
use crate::store::{Limits, OpenError, Store};
use crate::throttle::Throttle;

pub struct App {
    /// Shared with background work that outlives a request (the delivery worker's writes).
    pub config: std::sync::Arc<Config>,
    /// The outbound client to partners and merchant webhooks (its connection pools are
    /// shared by the delivery worker and validate-member).
    pub partners: crate::partner::Client,
    pub store: Store,
    pub tokens: TokenKey,
    /// Seals listing cursors; derived from the token signing key.
    pub cursors: CursorKey,
    pub clock: Clock,
    pub throttle: Throttle,
    /// A hash of nothing, as costly as the costliest configured one: checked when a
    /// client id is unknown, so that a wrong id takes as long as a wrong secret.
    pub dummy_secret: SecretHash,
    /// Counters and histograms for the admin listener's `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl App {
    /// Opens the database named by `config` and loads (or makes) the token signing key.
    pub fn open(config: Config, clock: Clock) -> Result<App, OpenError> {
        let limits = Limits {
            max_batch: config.server.max_batch,
            queue: config.server.write_queue,
            cache_bytes: config.storage_cache_bytes,
        };
        let store = match &config.storage_backend {
            StorageBackend::Redb => Store::open(&config.storage_path, clock.clone(), limits)?,
            StorageBackend::Postgres(pg) => Store::open_postgres(pg, clock.clone(), limits)?,
        };
        let key = match &config.auth.signing_key {
            Some(key) => key.clone(),
            None => store
                .signing_key(random_secret)
                .map_err(|_| OpenError::Unusable("cannot read or store the signing key".into()))?,
        };
        let throttle = Throttle::new(config.auth.failed_logins.window.as_secs());
        let iterations = config
            .businesses
            .iter()
            .flat_map(|b| &b.clients)
            .filter_map(|c| match &c.secret {
                ClientSecret::Hash(hash) => Some(hash.iterations()),
                ClientSecret::Plain(_) => None,
            })
            .max()
            .unwrap_or(DEFAULT_ITERATIONS);
        let dummy_secret = SecretHash::new(
            b"",
            NonZeroU32::new(iterations).expect("parsed iterations are at least 1"),
        );
        let metrics = Arc::new(Metrics::new());
        store.on_commit(metrics.commit_hook());
        Ok(App {
            dummy_secret,
            metrics,
            tokens: TokenKey::new(&key),
            cursors: CursorKey::new(&key),
            config: std::sync::Arc::new(config),
            partners: crate::partner::Client::new(),
            store,
            clock,
            throttle,
        })
    }
}
