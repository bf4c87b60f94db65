//! Cosmopoints: a self-contained loyalty-points server. One binary, one embedded redb
//! file, an HTTP/JSON API through which a business issues points in partner loyalty
//! programs and links its end users to their partner member ids.
//!
//! # Bird's-eye view
//!
//! [`service`] owns the lifecycle: it starts the API listener (and any background tasks)
//! over the shared [`app::App`], and on shutdown stops them in order before it flushes and
//! closes the store. A request arrives in [`server`] (hyper), which gives it a request id
//! and a span and hands it to the route function it was given: [`router::route`], one
//! `match` on (method, path) that authenticates (via [`api::authenticate`] and [`auth`])
//! and calls one handler in [`api`]. Handlers parse input with [`input`] into the checked
//! types of [`domain`], apply the rules of [`ledger`] (pricing with [`decimal`]), and read
//! or write through [`store`]. Writes go to the store's single writer thread, which
//! commits many of them in one durable transaction. Every failure becomes an
//! [`error::Error`], turned into problem+json in one place.
//!
//! # Code map
//!
//! - `main.rs`: the command line; thin.
//! - [`config`]: TOML → validated [`config::Config`], once.
//! - [`app`]: the shared state (config, store, token key, clock, throttle).
//! - [`service`]: the lifecycle owner: start (API listener, admin listener, background
//!   tasks), and stop in order.
//! - [`admin`]: the admin listener's endpoints: `/metrics`, `/readyz`, `/backup`.
//! - [`metrics`]: the Prometheus families and the calls that record them (requests in the
//!   router, issues in `api`, commits through a store hook, delivery attempts).
//! - [`server`]: accept loop, limits, timeouts (writes too; the header timeout on a
//!   timer that recycles its sleeps, `server/timer.rs`), graceful drain (a stop flag
//!   each connection reads, `server/drain.rs`); serves any route function.
//! - [`router`]: the endpoint list and the match.
//! - [`api`]: one function per endpoint and the JSON DTOs; `login`, the one credential
//!   check behind `/v1/auth` and `/v1/oauth/token`.
//! - [`dashboard`]: the staff dashboard (`GET /` and its script and style sheet): static
//!   files compiled into the binary, served with a strict Content Security Policy. The
//!   page is an API client like any other (token in memory, bearer requests), so it needs
//!   no access to the store or the handlers.
//! - [`oauth`]: `POST /v1/oauth/token` (RFC 6749 client credentials, its own error shape).
//! - [`csv`]: transactions as RFC 4180 rows with formula cells neutralised (the listing
//!   with `Accept: text/csv`, and exports).
//! - [`export`]: `cosmopoints export`, every business's transactions as CSV or JSON Lines.
//! - [`log_queue`]: the log's way out: lines queued in memory, written to stderr by one
//!   thread, many per `write`.
//! - [`input`]: untrusted text → typed values (JSON fields, query strings, paths).
//! - [`auth`]: secret hashes and HMAC tokens; pure functions of their inputs and `now`.
//! - [`throttle`]: failed-login counting in a sliding window, a limit per key (client id and
//!   address, address, client id).
//! - [`domain`]: checked identifiers; businesses, programs (and their partners), currencies.
//! - [`ledger`]: transactions, reversals, connections, the issuance rules, the points
//!   quote and the reversal formula.
//! - [`delivery`]: a delivery's state and how an attempt moves it on (pure).
//! - [`worker`]: the delivery worker, a background task: sends due outbox jobs (credits,
//!   debits, merchant events), writes the outcomes back, many in one write.
//! - [`decimal`]: exact decimals and the points formula.
//! - [`partner`]: the outbound partner client: one signed (Standard Webhooks) HTTP(S)
//!   request per delivery attempt and what the answer means; the in-process sandbox partner.
//! - [`store`]: the storage interface and its two backends: redb (`store/embedded.rs`
//!   and beside it the schema and versioned records, the group-commit writer, reads,
//!   `check`, the file backend that writes zeros ahead) and PostgreSQL (`store/postgres/`: migrations, a per-process group-commit
//!   writer, pooled reads, the shared outbox's claims, `check`).
//! - [`files`]: owner-only files and folders (the database, backups, exports), written
//!   atomically.
//! - [`error`], [`body`], [`clock`], [`openapi`]: the error type, body type, time, API document.
//!
//! # Invariants
//!
//! - Only `store` knows redb, postcard and tokio-postgres; its public interface names
//!   none of them. `Store` is an enum over the backends (static dispatch).
//! - Only `server`, `router`, `api`, `body`, `error`, `openapi` and `dashboard` know
//!   hyper; `server` does not know the routes or the store. `partner` knows hyper's client side only,
//!   and neither the store nor the API.
//! - `domain` and `ledger` know no HTTP, JSON or storage format: the ledger says why it
//!   refuses in its own [`ledger::Rejection`], which `error` maps to HTTP.
//! - Identifiers from a request are checked once, into [`domain`] types; the store takes
//!   only those types.
//! - Every stored value is a versioned enum; old variants never change (see
//!   [`store::schema`]). A file of an older schema is migrated on open in one write
//!   transaction; a newer one is refused.
//! - Money and points math is integer-exact: no `f32`/`f64` anywhere in it.
//! - Time is passed in as a [`clock::Clock`]; nothing reads the system time but `clock`.
//! - The redb file holds what redb wrote and nothing else: the store's backend writes
//!   zeros ahead of redb's writes only into holes past everything redb has written, and
//!   never changes the file's length (`store/prefill.rs`).
//! - A write is acknowledged only after its commit is durable (on PostgreSQL: after
//!   COMMIT returned with `synchronous_commit = on`), and a read that starts after the
//!   acknowledgement sees it (on redb the writer publishes the look-ups' shared snapshot
//!   of a commit before it answers any write in it).
//! - A job for the outbox (a credit, a debit, a merchant event) is written in the same
//!   commit as the change that causes it; a debit is sent only after its credit completed.
//! - The reversals of a transaction never add up to more than its value or its points:
//!   the writer decides each one against the totals the transaction's record keeps, read
//!   in the same write transaction (on PostgreSQL with the row locked `FOR UPDATE`;
//!   `check` verifies the sums).
//! - On PostgreSQL, idempotency rests on UNIQUE constraints (never a check-then-insert),
//!   and an outbox job is sent by one process at a time (claimed with `FOR UPDATE SKIP
//!   LOCKED` for a lease).
//! - Shutdown order: mark not ready, stop accepting API requests and drain them, stop the
//!   admin listener, stop background tasks, flush the writer, close the store.
//! - The dashboard has no privileges of its own: its files are public, and everything it
//!   shows or changes goes through the public API with the signed-in client's token.
//! - Metric labels come from closed sets (route patterns, status codes, configured
//!   program ids, outcome names), never from request text.
//! - A backup is made from one read transaction into a new file; the live file is never
//!   copied.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod clock;
pub mod config;
pub mod csv;
pub mod dashboard;
pub mod decimal;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod export;
pub mod files;
pub mod input;
pub mod ledger;
pub mod log_queue;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod partner;
pub mod router;
pub mod server;
pub mod service;
pub mod store;
pub mod throttle;
pub mod worker;
