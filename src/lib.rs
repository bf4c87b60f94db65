//! Cosmopoints: a self-contained loyalty-points server. One binary, one embedded redb
//! file, an HTTP/JSON API through which a business issues points in partner loyalty
//! programs and links its end users to their partner member ids.
//!
//! # Bird's-eye view
//!
//! A request arrives in [`server`] (hyper), which gives it a request id and a span and
//! hands it to [`router`]: one `match` on (method, path) that authenticates (via
//! [`api::authenticate`] and [`auth`]) and calls one handler in [`api`]. Handlers parse
//! input with [`input`] into [`ledger`] types, apply the business rules of [`ledger`]
//! (pricing with [`decimal`]), and read or write through [`store`]. Writes go to the
//! store's single writer thread, which commits many of them in one durable transaction.
//! Every failure is an [`error::Error`], turned into problem+json in one place.
//!
//! # Code map
//!
//! - `main.rs`: the command line; thin.
//! - [`config`]: TOML → validated [`config::Config`], once.
//! - [`app`]: the shared state (config, store, token key, clock, throttle).
//! - [`server`]: accept loop, limits, timeouts (writes too), graceful shutdown.
//! - [`router`]: the endpoint list and the match.
//! - [`api`]: one function per endpoint and the JSON DTOs.
//! - [`input`]: untrusted text → typed values (JSON fields, query strings, paths).
//! - [`auth`]: secret hashes and HMAC tokens; pure functions of their inputs and `now`.
//! - [`throttle`]: failed-login counting in a sliding window, a limit per key (client id and
//!   address, address, client id).
//! - [`ledger`]: transactions, connections, validation, the points quote.
//! - [`decimal`]: exact decimals and the points formula.
//! - [`store`]: redb tables, postcard records, the group-commit writer.
//! - [`error`], [`body`], [`clock`], [`openapi`]: the error type, body type, time, API document.
//!
//! # Invariants
//!
//! - Only `store` knows redb and postcard.
//! - Only `server`, `router`, `api`, `body`, `error` and `openapi` know hyper.
//! - Money and points math is integer-exact: no `f32`/`f64` anywhere in it.
//! - Time is passed in as a [`clock::Clock`]; nothing reads the system time but `clock`.
//! - A write is acknowledged only after its commit is durable.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod clock;
pub mod config;
pub mod decimal;
pub mod error;
pub mod input;
pub mod ledger;
pub mod openapi;
pub mod router;
pub mod server;
pub mod store;
pub mod throttle;
