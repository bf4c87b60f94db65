//! The shared state every request sees: configuration, store, token key, clock, throttle.

use crate::auth::TokenKey;
use crate::clock::Clock;
use crate::config::Config;
use crate::store::{Limits, OpenError, Store};
use crate::throttle::Throttle;

pub struct App {
    pub config: Config,
    pub store: Store,
    pub tokens: TokenKey,
    pub clock: Clock,
    pub throttle: Throttle,
}

impl App {
    /// Opens the database named by `config` and loads (or makes) the token signing key.
    pub fn open(config: Config, clock: Clock) -> Result<App, OpenError> {
        let store = Store::open(
            &config.storage_path,
            clock.clone(),
            Limits {
                max_batch: config.server.max_batch,
                queue: config.server.write_queue,
                cache_bytes: config.storage_cache_bytes,
            },
        )?;
        let key = match &config.auth.signing_key {
            Some(key) => key.clone(),
            None => store
                .signing_key(TokenKey::generate_secret)
                .map_err(|_| OpenError::Unusable("cannot read or store the signing key".into()))?,
        };
        let throttle = Throttle::new(
            config.auth.max_failed_attempts,
            config.auth.failed_attempts_window.as_secs(),
        );
        Ok(App {
            tokens: TokenKey::new(&key),
            config,
            store,
            clock,
            throttle,
        })
    }
}
