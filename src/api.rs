//! One async function per endpoint, with its request parsing and response DTOs
//! (serde_json, camelCase). Handlers receive the parsed caller and raw body or query;
//! they never see a path.
//!
//! Invariant: every read and write is scoped to `caller.business`; a handler that
//! does not receive a [`Caller`] touches no business data.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LINK, PRAGMA, VARY,
};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::{plain_secret_matches, Claims, TokenError};
use crate::body::{self, Body};
use crate::clock::{rfc3339, write_rfc3339};
use crate::delivery::{Delivery, DeliveryStatus};
use crate::domain::{
    Business, ClientSecret, Description, DestinationUserId, EndUserId, Program, ProgramId,
    ReferenceNumber, UserId,
};
use crate::error::Error;
use crate::input::{encode_component, query, Fields};
use crate::ledger::{
    enabled_program, quote, Connection, NewReversal, NewTransaction, Recipient, Rejection,
    Reversal, ReversalId, Transaction, TransactionId, MAX_VALUE,
};
use crate::store::{Connect, Cursor, Issue, Issued, Redelivery, Reverse, Reversed, TxQuery};

pub type Reply = Result<Response<Body>, Error>;

/// The authenticated business behind a request.
pub struct Caller<'a> {
    pub business: &'a Business,
}

/// Checks the bearer token: signature, expiry, and that its client still exists in the
/// configuration under the same business.
pub fn authenticate<'a>(app: &'a App, headers: &HeaderMap) -> Result<Caller<'a>, Error> {
    let header = headers
        .get(AUTHORIZATION)
        .ok_or(Error::Unauthenticated(
            "send `Authorization: Bearer <token>`; get a token from POST /v1/auth",
        ))?
        .to_str()
        .map_err(|_| Error::Unauthenticated("the Authorization header is not valid text"))?;
    let token = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or(Error::Unauthenticated(
            "the Authorization header must be `Bearer <token>`",
        ))?;
    let claims = app
        .tokens
        .verify(token, app.clock.now())
        .map_err(|e| match e {
            TokenError::Expired => {
                Error::Unauthenticated("the token has expired; get a new one from POST /v1/auth")
            }
            TokenError::Malformed | TokenError::BadSignature => {
                Error::Unauthenticated("the token is not valid; get a new one from POST /v1/auth")
            }
        })?;
    match app.config.client(&claims.client) {
        Some((business, _)) if business.id == *claims.business => {
            crate::access::record(|line| {
                line.business = Some(claims.business);
                line.client = Some(claims.client);
            });
            Ok(Caller { business })
        }
        _ => Err(Error::Unauthenticated(
            "the token's client no longer exists; get a new token from POST /v1/auth",
        )),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let bytes = serde_json::to_vec(value).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a response");
        Error::Internal
    })?;
    json_bytes(status, bytes)
}

/// A JSON response of text already encoded.
fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> Reply {
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

pub async fn health(app: &App) -> Reply {
    app.store.ping().await?;
    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
    token_type: &'static str,
}

/// The business of `client_id` if `secret` is its secret. Every path costs at least one
/// PBKDF2 run as slow as the slowest configured hash: an unknown id and a plain-text
/// secret are checked against the app's dummy hash too, so that timing does not tell
/// which client ids exist.
fn verify_client(app: &App, client_id: &str, secret: &str) -> Option<String> {
    let Some((business, client)) = app.config.client(client_id) else {
        let _ = app.dummy_secret.verify(secret.as_bytes());
        return None;
    };
    let ok = match &client.secret {
        ClientSecret::Hash(hash) => hash.verify(secret.as_bytes()),
        ClientSecret::Plain(plain) => {
            let _ = app.dummy_secret.verify(secret.as_bytes());
            plain_secret_matches(plain, secret.as_bytes())
        }
    };
    ok.then(|| business.id.to_string())
}

/// The part of an address that failed logins are counted under: an IPv4 address, or the
/// /64 of an IPv6 one (one subscriber usually holds a whole /64).
fn address_key(address: IpAddr) -> String {
    match address.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            format!("{}/64", std::net::Ipv6Addr::from(prefix))
        }
    }
}

/// Logs a client in. `client` is the client's address: the peer, or the address a
/// trusted proxy forwarded (see the router).
pub async fn auth(app: Arc<App>, client: IpAddr, body: Bytes) -> Reply {
    let mut fields = Fields::parse(&body, &["clientId", "clientSecret"])?;
    let client_id = fields.required_string("clientId")?;
    let secret = fields.required_string("clientSecret")?;
    let grant = login(app, client, client_id, secret).await?;
    let mut response = json(
        StatusCode::OK,
        &TokenResponse {
            access_token: grant.access_token,
            expires_in: grant.expires_in,
            token_type: "Bearer",
        },
    )?;
    no_store(response.headers_mut());
    Ok(response)
}

/// RFC 6749 §5.1: a response that carries a token (or an answer about one) must not be
/// stored by any cache.
pub fn no_store(headers: &mut HeaderMap) {
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
}

/// A token granted by [`login`].
pub struct Grant {
    pub access_token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// Checks a client's credentials under the failed-login throttle and signs a token: the
/// one way to log in, shared by `POST /v1/auth` and `POST /v1/oauth/token` (so that both
/// count failures against the same limits). `client` is the client's address. Fails with
/// [`Error::TooManyRequests`] before checking anything when a limit is reached, and with
/// [`Error::BadCredentials`] for a wrong id or secret.
pub async fn login(
    app: Arc<App>,
    client: IpAddr,
    client_id: String,
    secret: String,
) -> Result<Grant, Error> {
    let limits = app.config.auth.failed_logins;
    let shown = truncate(&client_id, 128);
    let address = address_key(client);
    // Addresses hold no spaces, so the pair key cannot be confused with another pair's.
    let pair_key = format!("pair:{address} {shown}");
    let address_key = format!("address:{address}");
    let client_key = format!("client:{shown}");
    let keys = [
        (pair_key.as_str(), limits.per_client_and_address),
        (address_key.as_str(), limits.per_address),
        (client_key.as_str(), limits.per_client),
    ];
    let started = app.clock.now();
    if let Err(retry_after) = app.throttle.attempt(&keys, started) {
        return Err(Error::TooManyRequests { retry_after });
    }
    let checker = app.clone();
    let id = client_id.clone();
    let verified = tokio::task::spawn_blocking(move || verify_client(&checker, &id, &secret))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the secret check did not finish");
            Error::Internal
        })?;
    let Some(business) = verified else {
        // Debug formatting escapes control characters: a client id cannot forge log lines.
        tracing::info!(client_id = ?shown, address = %client, "failed authentication");
        return Err(Error::BadCredentials);
    };
    app.throttle.succeeded(&keys, started);
    let (business, client): (Arc<str>, Arc<str>) = (business.into(), client_id.into());
    crate::access::record(|line| {
        line.business = Some(Arc::clone(&business));
        line.client = Some(Arc::clone(&client));
    });
    let now = app.clock.now();
    let ttl = app.config.auth.token_ttl_seconds;
    let claims = Claims {
        business,
        client,
        issued_at: now,
        expires_at: now + ttl,
    };
    let access_token = app.tokens.sign(&claims).ok_or_else(|| {
        tracing::error!("a token could not be signed: an id is longer than 255 bytes");
        Error::Internal
    })?;
    Ok(Grant {
        access_token,
        expires_in: ttl,
    })
}

fn truncate(text: &str, chars: usize) -> &str {
    match text.char_indices().nth(chars) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProfileView<'a> {
    name: &'a str,
    program_id: &'a str,
    currency: &'a str,
    /// Digits after the point of the business currency: a `value` is in 10^-exponent units.
    currency_exponent: u32,
}

pub fn profile(app: &App, caller: Caller<'_>) -> Reply {
    let b = caller.business;
    json(
        StatusCode::OK,
        &ProfileView {
            name: &b.name,
            program_id: &b.program_id,
            currency: &b.currency,
            currency_exponent: app.config.currency(&b.currency).exponent,
        },
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProgramView<'a> {
    id: &'a str,
    name: &'a str,
    price_per_point_in_usd: String,
    price_per_point: String,
    currency: &'a str,
    min_amount_of_points: u64,
    max_amount_of_points: Option<u64>,
}

pub fn programs(app: &App, caller: Caller<'_>) -> Reply {
    let currency = app.config.currency(&caller.business.currency);
    let views: Vec<ProgramView> = caller
        .business
        .programs
        .iter()
        .filter_map(|id| app.config.programs.get(id.as_str()))
        .map(|p| ProgramView {
            id: &p.id,
            name: &p.name,
            price_per_point_in_usd: p.price_per_point_usd.to_string(),
            price_per_point: p
                .price_per_point_usd
                .times(currency.units_per_usd)
                .to_string(),
            currency: &currency.code,
            min_amount_of_points: p.min_points,
            max_amount_of_points: p.max_points,
        })
        .collect();
    json(StatusCode::OK, &views)
}

pub fn currencies(app: &App) -> Reply {
    let codes: Vec<&str> = app.config.currencies.keys().map(String::as_str).collect();
    json(StatusCode::OK, &codes)
}

const ISSUE_FIELDS: &[&str] = &[
    "programId",
    "value",
    "userId",
    "endUserId",
    "referenceNumber",
    "description",
    "bonus",
];

/// The `programId` and `value` that issuing and previewing share.
fn program_and_value(f: &mut Fields) -> Result<(ProgramId, u64), Error> {
    let program_id = ProgramId::parse(f.required_string(ProgramId::FIELD)?)?;
    let value = f.required_integer("value", 1, MAX_VALUE)?;
    Ok((program_id, value))
}

fn parse_issue(body: &[u8]) -> Result<NewTransaction, Error> {
    parse_issue_fields(Fields::parse(body, ISSUE_FIELDS)?)
}

fn parse_issue_fields(mut f: Fields) -> Result<NewTransaction, Error> {
    let (program_id, value) = program_and_value(&mut f)?;
    let recipient = match (f.string(UserId::FIELD)?, f.string(EndUserId::FIELD)?) {
        (Some(user), None) => Recipient::Member(UserId::parse(user)?),
        (None, Some(end_user)) => Recipient::EndUser(EndUserId::parse(end_user)?),
        (Some(_), Some(_)) => {
            return Err(Error::bad_request(
                "send either `userId` (the partner member id) or `endUserId` (your own user \
                 id, resolved through its program connection), not both",
            ))
        }
        (None, None) => {
            return Err(Error::bad_request(
                "`userId` or `endUserId` is required: the partner member id, or your own user \
                 id resolved through its program connection",
            ))
        }
    };
    let reference_number = ReferenceNumber::parse(f.required_string(ReferenceNumber::FIELD)?)?;
    let description = f
        .string("description")?
        .map(Description::parse)
        .transpose()?;
    let bonus = f.boolean("bonus")?.unwrap_or(false);
    Ok(NewTransaction {
        program_id,
        value,
        recipient,
        reference_number,
        description,
        bonus,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IssuedView<'a> {
    id: String,
    total_points: u64,
    reference_number: &'a str,
    date: &'a str,
    status: &'static str,
}

fn issued(status: StatusCode, tx: &Transaction) -> Reply {
    crate::access::record(|line| line.transaction = Some(tx.id.to_string()));
    json(status, &issued_view(tx, &rfc3339(tx.created_at)))
}

fn issued_view<'a>(tx: &'a Transaction, date: &'a str) -> IssuedView<'a> {
    IssuedView {
        id: tx.id.to_string(),
        total_points: tx.total_points,
        reference_number: tx.reference_number.as_str(),
        date,
        status: tx.status().as_str(),
    }
}

fn conflict(reference: &ReferenceNumber, field: &str) -> Error {
    Error::Conflict(format!(
        "referenceNumber \"{reference}\" was already used with a different `{field}`; \
         use a new referenceNumber, or resend the original request to get its result"
    ))
}

/// Issues points. Order of checks: the body's shape (400); then the referenceNumber, so
/// that a retry of an acknowledged request gets its original answer even if the
/// configuration changed since (200 or 409); then a new referenceNumber's form (400);
/// then the business rules (422); then the writer, which checks the referenceNumber again
/// inside its write transaction.
pub async fn issue(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let request = parse_issue(&body)?;
    let reference = request.reference_number.clone();
    let existing = app
        .store
        .by_reference(&caller.business.id, &reference)
        .await?;
    match plan_issue(app, caller.business, request, existing).await? {
        Planned::Replay(tx) => issued(StatusCode::OK, &tx),
        Planned::Write(issue) => {
            let outcome = app.store.issue(*issue).await?;
            count_issued(app, [&outcome]);
            let (status, tx) = settle_issue(outcome, &reference)?;
            issued(status, &tx)
        }
    }
}

/// What an issue request comes to before the writer sees it.
enum Planned {
    /// The referenceNumber exists with this same request: its transaction.
    Replay(Box<Transaction>),
    /// A new transaction to write (the writer checks the referenceNumber again).
    Write(Box<Issue>),
}

/// Everything an issue is checked for before the write, in the order `issue` documents,
/// given what the store holds under its referenceNumber (`existing`).
async fn plan_issue(
    app: &App,
    business: &Business,
    request: NewTransaction,
    existing: Option<Transaction>,
) -> Result<Planned, Error> {
    if let Some(existing) = existing {
        return match existing.differing_field(&request) {
            None => Ok(Planned::Replay(Box::new(existing))),
            Some(field) => Err(conflict(&request.reference_number, field)),
        };
    }
    // Checked after the lookup: an earlier version accepted such references, and a retry
    // of one of those still gets its original answer.
    if TransactionId::parse(&request.reference_number).is_some() {
        return Err(Error::bad_request(
            "`referenceNumber` must not have the form of a transaction id (`tx_` and 22 \
             base64url characters): GET /v1/transactions/{key} looks ids up first, so a \
             lookup of this reference could find another transaction; choose another",
        ));
    }
    let program = enabled_program(&app.config.programs, business, &request.program_id)?;
    let user_id = match &request.recipient {
        Recipient::Member(user) => user.clone(),
        Recipient::EndUser(end_user) => member_of(app, business, end_user, program).await?,
    };
    let total_points = quote(
        app.config.currency(&business.currency),
        program,
        request.value,
    )?;
    Ok(Planned::Write(Box::new(Issue {
        business: business.id.clone(),
        program_name: program.name.clone(),
        currency: business.currency.clone(),
        total_points,
        request,
        user_id,
        deliver: program.partner.is_some(),
    })))
}

/// Counts the new transactions among `outcomes` in the metrics, once per program and
/// status (a batch of a thousand is a few labelled look-ups, not a thousand).
fn count_issued<'a>(app: &App, outcomes: impl IntoIterator<Item = &'a Issued>) {
    let mut counts: Vec<(&ProgramId, &'static str, u64, u64)> = Vec::new();
    for outcome in outcomes {
        let Issued::Created(tx) = outcome else {
            continue;
        };
        let status = tx.status().as_str();
        match counts
            .iter_mut()
            .find(|(p, s, ..)| **p == tx.program_id && *s == status)
        {
            Some((.., n, points)) => {
                *n += 1;
                *points += tx.total_points;
            }
            None => counts.push((&tx.program_id, status, 1, tx.total_points)),
        }
    }
    for (program, status, n, points) in counts {
        app.metrics.issued(program.as_str(), status, n, points);
    }
}

/// The answer to what the writer did with an issue (counted by [`count_issued`]).
fn settle_issue(
    outcome: Issued,
    reference: &ReferenceNumber,
) -> Result<(StatusCode, Transaction), Error> {
    match outcome {
        Issued::Created(tx) => Ok((StatusCode::CREATED, tx)),
        Issued::Replayed(tx) => Ok((StatusCode::OK, tx)),
        Issued::Conflict(field) => Err(conflict(reference, field)),
    }
}

/// Most items in one batch.
pub const MAX_BATCH_ITEMS: usize = 1000;

#[derive(Serialize)]
struct BatchResults<'a> {
    results: Vec<BatchResult<'a>>,
}

#[derive(Serialize)]
struct BatchResult<'a> {
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction: Option<IssuedView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<serde_json::Value>,
}

/// Issues up to [`MAX_BATCH_ITEMS`] transactions: each item follows the rules of
/// [`issue`] (idempotency included) and gets its own result, in order; the new ones are
/// written in ONE write of the store, durable before the answer. A failure that is not
/// the item's (the store busy or unavailable, a bug) fails the whole request, and then
/// nothing was written.
pub async fn issue_batch(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let items: Vec<Result<NewTransaction, Error>> = crate::input::items(&body, MAX_BATCH_ITEMS)?
        .into_iter()
        .map(|item| item.and_then(|map| parse_issue_fields(Fields::of_object(map, ISSUE_FIELDS)?)))
        .collect();
    // Every item's referenceNumber looked up at once, before anything is written (a
    // repeat within the batch is settled by the writer, in order).
    let references: Vec<&ReferenceNumber> = items
        .iter()
        .filter_map(|item| item.as_ref().ok().map(|r| &r.reference_number))
        .collect();
    let mut existing = app
        .store
        .by_references(&caller.business.id, &references)
        .await?
        .into_iter();
    let mut results: Vec<Result<(StatusCode, Transaction), Error>> =
        Vec::with_capacity(items.len());
    let mut writes = Vec::new();
    let mut written = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let planned = match item {
            Ok(request) => {
                let reference = request.reference_number.clone();
                let found = existing.next().flatten();
                plan_issue(app, caller.business, request, found)
                    .await
                    .map(|p| (p, reference))
            }
            Err(e) => Err(e),
        };
        match planned {
            Ok((Planned::Replay(tx), _)) => results.push(Ok((StatusCode::OK, *tx))),
            Ok((Planned::Write(issue), reference)) => {
                writes.push(*issue);
                written.push((i, reference));
                results.push(Err(Error::Internal)); // replaced below
            }
            // Not the item's fault: the whole request fails, before anything is written.
            Err(e) if e.status().is_server_error() => return Err(e),
            Err(e) => results.push(Err(e)),
        }
    }
    if !writes.is_empty() {
        let outcomes = app.store.issue_many(writes).await?;
        count_issued(app, &outcomes);
        for ((i, reference), outcome) in written.into_iter().zip(outcomes) {
            results[i] = settle_issue(outcome, &reference);
        }
    }
    // The new ones share the commit's time: each run of one time is formatted once, and
    // the items of a run borrow its text.
    let mut runs: Vec<(u64, String)> = Vec::new();
    let run_of: Vec<usize> = results
        .iter()
        .map(|r| {
            if let Ok((_, tx)) = r {
                if runs.last().map(|(at, _)| *at) != Some(tx.created_at) {
                    runs.push((tx.created_at, rfc3339(tx.created_at)));
                }
            }
            runs.len().saturating_sub(1)
        })
        .collect();
    let views = BatchResults {
        results: results
            .iter()
            .zip(&run_of)
            .map(|(r, &run)| match r {
                Ok((status, tx)) => BatchResult {
                    status: status.as_u16(),
                    transaction: Some(issued_view(
                        tx,
                        runs.get(run).map_or("", |(_, date)| date.as_str()),
                    )),
                    problem: None,
                },
                Err(e) => BatchResult {
                    status: e.status().as_u16(),
                    transaction: None,
                    problem: Some(e.problem()),
                },
            })
            .collect(),
    };
    json(StatusCode::OK, &views)
}

/// The member id that the end user's connection to `program` names.
async fn member_of(
    app: &App,
    business: &Business,
    end_user: &EndUserId,
    program: &Program,
) -> Result<UserId, Error> {
    let connections = app
        .store
        .connections(&business.id, end_user, Some(&program.id))
        .await?;
    let Some(connection) = connections.into_iter().next() else {
        return Err(Rejection::NoProgramConnection {
            end_user_id: end_user.clone(),
            program: program.id.clone(),
        }
        .into());
    };
    // Both are checked with the same rules, so this cannot fail; if it did, it is ours.
    UserId::parse(connection.destination_user_id.into_string()).map_err(|e| {
        tracing::error!(error = %e, "a stored destination is not a valid member id");
        Error::Internal
    })
}

pub fn preview(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let mut f = Fields::parse(&body, &["programId", "value"])?;
    let (program_id, value) = program_and_value(&mut f)?;
    let program = enabled_program(&app.config.programs, caller.business, &program_id)?;
    let total_points = quote(
        app.config.currency(&caller.business.currency),
        program,
        value,
    )?;
    json(
        StatusCode::OK,
        &serde_json::json!({ "totalPoints": total_points }),
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryView<'a> {
    attempts: u32,
    last_attempt_at: Option<String>,
    next_attempt_at: Option<String>,
    partner_transaction_id: Option<&'a str>,
    error: Option<DeliveryErrorView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryErrorView<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    http_status: Option<u16>,
    detail: &'a str,
}

fn delivery_view(d: &Delivery) -> DeliveryView<'_> {
    DeliveryView {
        attempts: d.attempts,
        last_attempt_at: d.last_attempt_at.map(rfc3339),
        next_attempt_at: d.next_attempt_at.map(rfc3339),
        partner_transaction_id: d.partner_transaction_id.as_deref(),
        error: d.error.as_ref().map(|e| DeliveryErrorView {
            kind: e.kind.as_str(),
            http_status: e.http_status,
            detail: &e.detail,
        }),
    }
}

/// Writes the JSON of a transaction as the API shows it: every response that shows one
/// (a listing row, `GET /v1/transactions/{key}`, an event's payload, an export line).
///
/// Written by hand rather than through a serde view: the listing writes one per row, and
/// the view cost four allocated strings (id, dates, points) and serde's per-field calls.
/// Strings go through serde_json's escaping; the shape (field names, order, `null`s) is
/// pinned against a serde view in the tests below.
pub fn write_transaction_json(
    tx: &Transaction,
    mut out: impl std::io::Write,
) -> serde_json::Result<()> {
    write_transaction(tx, &mut out).map_err(serde_json::Error::io)
}

fn write_transaction(tx: &Transaction, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut id = [0; 25];
    out.write_all(b"{\"id\":\"")?;
    out.write_all(tx.id.write_text(&mut id).as_bytes())?;
    out.write_all(b"\",\"referenceNumber\":")?;
    json_str(out, tx.reference_number.as_str())?;
    out.write_all(b",\"sourceValue\":")?;
    json_u64(out, tx.value)?;
    out.write_all(b",\"currency\":")?;
    json_str(out, &tx.currency)?;
    out.write_all(b",\"description\":")?;
    json_opt_str(out, tx.description.as_ref().map(Description::as_str))?;
    out.write_all(b",\"createdAt\":")?;
    json_time(out, tx.created_at)?;
    out.write_all(b",\"userId\":")?;
    json_str(out, tx.user_id.as_str())?;
    out.write_all(b",\"endUserId\":")?;
    json_opt_str(out, tx.end_user_id.as_ref().map(EndUserId::as_str))?;
    out.write_all(match tx.bonus {
        true => b",\"bonus\":true,\"totalPoints\":",
        false => b",\"bonus\":false,\"totalPoints\":",
    })?;
    json_u64(out, tx.total_points)?;
    out.write_all(b",\"pointTransactions\":[{\"destinationNumberOfPoints\":\"")?;
    json_u64(out, tx.total_points)?;
    out.write_all(match tx.bonus {
        true => b"\",\"type\":\"bonus\"}",
        false => b"\",\"type\":\"base\"}",
    })?;
    for r in &tx.reversals {
        // Minus the points; "0" (not "-0") for a reversal that took none.
        out.write_all(match r.points {
            0 => b",{\"destinationNumberOfPoints\":\"0".as_slice(),
            _ => b",{\"destinationNumberOfPoints\":\"-".as_slice(),
        })?;
        if r.points > 0 {
            json_u64(out, r.points)?;
        }
        out.write_all(b"\",\"type\":\"reversal\",\"id\":")?;
        json_str(out, &r.id.to_string())?;
        out.write_all(b",\"status\":")?;
        json_str(out, r.status().as_str())?;
        out.write_all(b"}")?;
    }
    out.write_all(b"]")?;
    out.write_all(b",\"partnership\":{\"destination\":{\"name\":")?;
    json_str(out, &tx.program_name)?;
    out.write_all(b",\"programId\":")?;
    json_str(out, tx.program_id.as_str())?;
    out.write_all(b"}},\"status\":")?;
    json_str(out, tx.status().as_str())?;
    out.write_all(b",\"delivery\":")?;
    match &tx.delivery {
        None => out.write_all(b"null")?,
        Some(d) => write_delivery(d, out)?,
    }
    out.write_all(b",\"reversedValue\":")?;
    json_u64(out, tx.reversed_value)?;
    out.write_all(b",\"reversedPoints\":")?;
    json_u64(out, tx.reversed_points)?;
    out.write_all(b"}")
}

fn write_delivery(d: &Delivery, out: &mut impl std::io::Write) -> std::io::Result<()> {
    out.write_all(b"{\"attempts\":")?;
    json_u64(out, d.attempts.into())?;
    out.write_all(b",\"lastAttemptAt\":")?;
    json_opt_time(out, d.last_attempt_at)?;
    out.write_all(b",\"nextAttemptAt\":")?;
    json_opt_time(out, d.next_attempt_at)?;
    out.write_all(b",\"partnerTransactionId\":")?;
    json_opt_str(out, d.partner_transaction_id.as_deref())?;
    out.write_all(b",\"error\":")?;
    match &d.error {
        None => out.write_all(b"null")?,
        Some(e) => {
            out.write_all(b"{\"type\":")?;
            json_str(out, e.kind.as_str())?;
            out.write_all(b",\"httpStatus\":")?;
            match e.http_status {
                Some(status) => json_u64(out, status.into())?,
                None => out.write_all(b"null")?,
            }
            out.write_all(b",\"detail\":")?;
            json_str(out, &e.detail)?;
            out.write_all(b"}")?;
        }
    }
    out.write_all(b"}")
}

/// A JSON string, escaped as serde_json escapes it.
fn json_str(out: &mut impl std::io::Write, text: &str) -> std::io::Result<()> {
    Ok(serde_json::to_writer(out, text)?)
}

fn json_opt_str(out: &mut impl std::io::Write, text: Option<&str>) -> std::io::Result<()> {
    match text {
        Some(text) => json_str(out, text),
        None => out.write_all(b"null"),
    }
}

fn json_u64(out: &mut impl std::io::Write, n: u64) -> std::io::Result<()> {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.write_all(&digits[i..])
}

/// A time as a quoted RFC 3339 string.
fn json_time(out: &mut impl std::io::Write, epoch_seconds: u64) -> std::io::Result<()> {
    let mut buf = [0; 20];
    match write_rfc3339(epoch_seconds, &mut buf) {
        Some(text) => {
            out.write_all(b"\"")?;
            out.write_all(text.as_bytes())?;
            out.write_all(b"\"")
        }
        None => json_str(out, &rfc3339(epoch_seconds)),
    }
}

fn json_opt_time(out: &mut impl std::io::Write, epoch_seconds: Option<u64>) -> std::io::Result<()> {
    match epoch_seconds {
        Some(t) => json_time(out, t),
        None => out.write_all(b"null"),
    }
}

/// A transaction as a whole JSON response.
fn transaction_reply(status: StatusCode, tx: &Transaction) -> Reply {
    let mut bytes = Vec::with_capacity(640);
    write_transaction_json(tx, &mut bytes).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a response");
        Error::Internal
    })?;
    json_bytes(status, bytes)
}

/// One transaction by id, else by referenceNumber (`key` is already percent-decoded).
pub async fn get_transaction(app: &App, caller: Caller<'_>, key: &str) -> Reply {
    match app.store.transaction(&caller.business.id, key).await? {
        Some(tx) => transaction_reply(StatusCode::OK, &tx),
        None => Err(not_found(key)),
    }
}

/// Sends a `failed` transaction to its partner again, with a fresh retry schedule: 202 with
/// the transaction, now `pending`. Any other status is 409 (a transaction without a
/// partner is `completed`), and so is a failed one with reversals: they were settled
/// without the partner, which never had the points.
pub async fn redeliver(app: &App, caller: Caller<'_>, key: &str) -> Reply {
    let tx = app
        .store
        .transaction_head(&caller.business.id, key)
        .await?
        .ok_or_else(|| not_found(key))?;
    match app.store.redeliver_credit(tx.seq).await? {
        Redelivery::Redelivered(tx) => transaction_reply(StatusCode::ACCEPTED, &tx),
        Redelivery::NotFailed(now) => Err(not_failed(now.as_deref().unwrap_or(&tx))),
        Redelivery::Reversed(tx) => Err(Error::StateConflict(format!(
            "transaction {} failed and has reversals, which were settled without the partner; \
             it cannot be redelivered: issue a new transaction for what should still be credited",
            tx.id
        ))),
    }
}

fn not_found(key: &str) -> Error {
    Error::NotFound(format!(
        "no transaction has the id or referenceNumber \"{key}\""
    ))
}

fn not_failed(tx: &Transaction) -> Error {
    Error::StateConflict(format!(
        "transaction {} is {}; only a failed delivery can be redelivered",
        tx.id,
        tx.status().as_str()
    ))
}

/// The fields a reversal request may have.
const REVERSAL_FIELDS: &[&str] = &["referenceNumber", "value", "reason"];

fn parse_reversal(body: &[u8]) -> Result<NewReversal, Error> {
    let mut f = Fields::parse(body, REVERSAL_FIELDS)?;
    let reference_number = ReferenceNumber::parse(f.required_string(ReferenceNumber::FIELD)?)?;
    // Only an absent `value` reverses all that remains: a `null` is more likely a client
    // that lost its amount than one that means "everything".
    if f.is_null("value") {
        return Err(Error::bad_request(format!(
            "`value` must be an integer from 1 to {MAX_VALUE}, not null; leave it out to \
             reverse all that remains"
        )));
    }
    let value = f.integer("value", 1, MAX_VALUE)?;
    let reason = f
        .string("reason")?
        .map(|r| Description::parse_field("reason", r))
        .transpose()?;
    Ok(NewReversal {
        reference_number,
        value,
        reason,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReversalView<'a> {
    id: String,
    transaction_id: String,
    reference_number: &'a str,
    value: u64,
    points: u64,
    reason: Option<&'a str>,
    status: &'static str,
    created_at: String,
    delivery: Option<DeliveryView<'a>>,
}

fn reversal_view(r: &Reversal) -> ReversalView<'_> {
    ReversalView {
        id: r.id.to_string(),
        transaction_id: r.transaction_id.to_string(),
        reference_number: r.reference_number.as_str(),
        value: r.value,
        points: r.points,
        reason: r.reason.as_ref().map(Description::as_str),
        status: r.status().as_str(),
        created_at: rfc3339(r.created_at),
        delivery: r.delivery.as_ref().map(delivery_view),
    }
}

/// Writes the JSON of a reversal as the API shows it (for webhook events).
pub fn write_reversal_json(r: &Reversal, out: impl std::io::Write) -> serde_json::Result<()> {
    serde_json::to_writer(out, &reversal_view(r))
}

fn reversal_conflict(reference: &ReferenceNumber, field: &str) -> Error {
    Error::Conflict(format!(
        "reversal referenceNumber \"{reference}\" was already used with a different `{field}`; \
         use a new referenceNumber, or resend the original request to get its result"
    ))
}

/// Takes back (part of) a transaction's points. Order of checks: the body's shape (400);
/// the transaction (404); then the reversal's referenceNumber, so that a retry gets its
/// original answer (200 or 409); then a new referenceNumber's form (400); then the writer,
/// which decides against what remains (422 when nothing, or less than asked, is left).
pub async fn reverse(app: &App, caller: Caller<'_>, key: &str, body: Bytes) -> Reply {
    let request = parse_reversal(&body)?;
    let business = &caller.business.id;
    let tx = app
        .store
        .transaction_head(business, key)
        .await?
        .ok_or_else(|| not_found(key))?;
    let reference = request.reference_number.clone();
    if let Some(existing) = app.store.reversal(business, &reference).await? {
        if existing.reference_number == reference {
            return match existing.differing_field(tx.seq, &request) {
                None => reversed(StatusCode::OK, &existing),
                Some(field) => Err(reversal_conflict(&reference, field)),
            };
        }
    }
    if ReversalId::parse(&reference).is_some() {
        return Err(Error::bad_request(
            "`referenceNumber` must not have the form of a reversal id (`rv_` and 22 \
             base64url characters): GET /v1/reversals/{key} looks ids up first; choose another",
        ));
    }
    let outcome = app
        .store
        .reverse(Reverse {
            business: business.clone(),
            transaction_seq: tx.seq,
            request,
        })
        .await?;
    match outcome {
        Reversed::Created(r) => {
            // Labels only from the configuration (a program removed since is "other").
            let program = app
                .config
                .programs
                .get(tx.program_id.as_str())
                .map_or("other", |p| p.id.as_str());
            app.metrics.reversed(program, r.status().as_str(), r.points);
            reversed(StatusCode::CREATED, &r)
        }
        Reversed::Replayed(r) => reversed(StatusCode::OK, &r),
        Reversed::Conflict(field) => Err(reversal_conflict(&reference, field)),
        Reversed::Rejected(rejection) => Err(rejection.into()),
    }
}

fn reversed(status: StatusCode, r: &Reversal) -> Reply {
    crate::access::record(|line| line.transaction = Some(r.transaction_id.to_string()));
    json(status, &reversal_view(r))
}

/// A transaction's reversals, oldest first: a JSON array.
pub async fn list_reversals(app: &App, caller: Caller<'_>, key: &str) -> Reply {
    let tx = app
        .store
        .transaction(&caller.business.id, key)
        .await?
        .ok_or_else(|| not_found(key))?;
    let views: Vec<_> = tx.reversals.iter().map(reversal_view).collect();
    json(StatusCode::OK, &views)
}

/// One reversal by id, else by its referenceNumber.
pub async fn get_reversal(app: &App, caller: Caller<'_>, key: &str) -> Reply {
    match app.store.reversal(&caller.business.id, key).await? {
        Some(r) => json(StatusCode::OK, &reversal_view(&r)),
        None => Err(reversal_not_found(key)),
    }
}

/// Sends a `failed` debit to the partner again, with a fresh retry schedule: 202 with the
/// reversal, now `pending`; any other status is 409.
pub async fn redeliver_reversal(app: &App, caller: Caller<'_>, key: &str) -> Reply {
    let found = app
        .store
        .reversal(&caller.business.id, key)
        .await?
        .ok_or_else(|| reversal_not_found(key))?;
    let updated = app
        .store
        .update_debit(found.seq, |d, now| d.redeliver(now), |_, _| Vec::new())
        .await?;
    match updated {
        Some((r, true)) => json(StatusCode::ACCEPTED, &reversal_view(&r)),
        Some((r, false)) => Err(reversal_not_failed(&r)),
        None => Err(reversal_not_failed(&found)),
    }
}

fn reversal_not_found(key: &str) -> Error {
    Error::NotFound(format!(
        "no reversal has the id or referenceNumber \"{key}\""
    ))
}

fn reversal_not_failed(r: &Reversal) -> Error {
    Error::StateConflict(format!(
        "reversal {} is {}; only a failed debit can be redelivered",
        r.id,
        r.status().as_str()
    ))
}

/// Asks the program's partner whether `destinationUserId` is one of its members: 200
/// `{"isValid": bool}`. A program without a partner says yes (nothing to check against);
/// a partner that cannot be asked is 503 `partner-unavailable` with `Retry-After`.
pub async fn validate_member(
    app: &App,
    caller: Caller<'_>,
    program_id: &str,
    body: Bytes,
) -> Reply {
    let program_id = ProgramId::parse(program_id)?;
    let mut f = Fields::parse(&body, &["destinationUserId"])?;
    let member = DestinationUserId::parse(f.required_string(DestinationUserId::FIELD)?)?;
    let program = enabled_program(&app.config.programs, caller.business, &program_id)?;
    let valid = match &program.partner {
        None => true,
        Some(partner) => app
            .partners
            .validate_member(partner, program.id.as_str(), member.as_str(), app.clock.now())
            .await
            .map_err(|reason| {
                tracing::warn!(program = %program.id, %reason, "validate-member: the partner could not be asked");
                Error::PartnerUnavailable { retry_after: 30 }
            })?,
    };
    json(StatusCode::OK, &serde_json::json!({ "isValid": valid }))
}

/// Most transactions in one page when `limit` is given.
pub const MAX_PAGE: usize = 1000;

fn epoch_param(name: &str, value: Option<&String>) -> Result<u64, Error> {
    let value =
        value.ok_or_else(|| Error::bad_request(format!("query parameter `{name}` is required")))?;
    if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::bad_request(format!(
            "`{name}` must be epoch seconds of exactly 10 digits, like 1795774500"
        )));
    }
    value
        .parse()
        .map_err(|_| Error::bad_request(format!("`{name}` is not a number")))
}

fn parse_list_query(
    raw: Option<&str>,
    business: &Business,
    open_cursor: impl Fn(&str) -> Option<Cursor>,
) -> Result<TxQuery, Error> {
    let mut q = query(
        raw,
        &[
            "startDate",
            "endDate",
            "programId",
            "limit",
            "after",
            "status",
        ],
    )?;
    let start = epoch_param("startDate", q.get("startDate"))?;
    let end = epoch_param("endDate", q.get("endDate"))?;
    if start > end {
        return Err(Error::bad_request(
            "`startDate` must not be after `endDate`",
        ));
    }
    let program = q.remove("programId").map(ProgramId::parse).transpose()?;
    let status = match q.remove("status") {
        Some(s) => Some(DeliveryStatus::parse(&s).ok_or_else(|| {
            Error::bad_request("`status` must be one of pending, completed, failed")
        })?),
        None => None,
    };
    let limit = match q.get("limit") {
        Some(l) => Some(
            Some(l)
                .filter(|l| !l.is_empty() && l.len() <= 4 && l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| (1..=MAX_PAGE).contains(l))
                .ok_or_else(|| {
                    Error::bad_request(format!("`limit` must be an integer from 1 to {MAX_PAGE}"))
                })?,
        ),
        None => None,
    };
    let after = match q.get("after") {
        Some(c) => Some(open_cursor(c).ok_or_else(|| {
            Error::bad_request(
                "`after` is not a cursor from a Link header of this business's listing",
            )
        })?),
        None => None,
    };
    Ok(TxQuery {
        business: business.id.clone(),
        program,
        start,
        end,
        after,
        limit,
        status,
    })
}

/// The `after` text for a position: sealed, so that it is opaque and works for `business`
/// only (see [`crate::auth::CursorKey`]).
fn encode_cursor(app: &App, business: &str, c: Cursor) -> Option<String> {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&c.created_at.to_be_bytes());
    bytes[8..].copy_from_slice(&c.seq.to_be_bytes());
    app.cursors.seal(business, bytes)
}

fn decode_cursor(app: &App, business: &str, text: &str) -> Option<Cursor> {
    let bytes = app.cursors.open(business, text)?;
    let (created, seq) = bytes.split_at(8);
    Some(Cursor {
        created_at: u64::from_be_bytes(created.try_into().ok()?),
        seq: u64::from_be_bytes(seq.try_into().ok()?),
    })
}

/// The business's transactions in a date range, oldest first. Without `limit` the whole
/// range is streamed from one read snapshot; with it, one page and a `Link` to the next.
/// `csv`: as CSV with a header row (see [`crate::csv`]) instead of a JSON array, paged
/// the same way.
pub async fn list_transactions(
    app: Arc<App>,
    caller: Caller<'_>,
    raw_query: Option<&str>,
    csv: bool,
) -> Reply {
    let q = parse_list_query(raw_query, caller.business, |text| {
        decode_cursor(&app, &caller.business.id, text)
    })?;
    let format = if csv { Format::Csv } else { Format::Json };
    let mut response = match q.limit {
        Some(limit) => list_page(&app, q, limit, format).await,
        None => list_stream(&app, q, format).await,
    }?;
    // The same URL answers in two formats: caches must key on Accept.
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("accept"));
    Ok(response)
}

/// How a listing is written.
#[derive(Clone, Copy)]
enum Format {
    /// One JSON array.
    Json,
    /// CSV with a header row.
    Csv,
}

impl Format {
    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8; header=present",
        })
    }

    /// What comes before the first row.
    fn head(self) -> BytesMut {
        let mut buf = BytesMut::new();
        match self {
            Format::Json => buf.put_u8(b'['),
            Format::Csv => crate::csv::header(false, &mut buf),
        }
        buf
    }

    /// What comes after the last row.
    fn tail(self) -> &'static [u8] {
        match self {
            Format::Json => b"]",
            Format::Csv => b"",
        }
    }

    /// An encoder of batches of rows, the first row of all not comma-led (JSON).
    fn rows(self) -> impl FnMut(&[Transaction]) -> Option<Bytes> + Send + 'static {
        let mut first_row = true;
        // Bytes per row to make room for: the widest row seen so far and some slack, so
        // that a batch's buffer is allocated once and not regrown while it fills.
        let mut room = 512;
        move |rows: &[Transaction]| {
            let mut buf = BytesMut::with_capacity(rows.len() * room);
            for t in rows {
                let before = buf.len();
                match self {
                    Format::Json => {
                        if !first_row {
                            buf.put_u8(b',');
                        }
                        if let Err(e) = write_transaction_json(t, (&mut buf).writer()) {
                            tracing::error!(error = %e, "cannot encode a listing row");
                            return None;
                        }
                    }
                    Format::Csv => crate::csv::row(t, None, &mut buf),
                }
                room = room.max(buf.len() - before + 64);
                first_row = false;
            }
            Some(buf.freeze())
        }
    }
}

async fn list_page(app: &App, q: TxQuery, limit: usize, format: Format) -> Reply {
    // One more than the page: whether there is a next page.
    let query = TxQuery {
        limit: Some(limit + 1),
        ..q.clone()
    };
    let mut listing = app.store.list(query, <[Transaction]>::to_vec)?;
    let mut page = Vec::with_capacity(limit + 1);
    while let Some(batch) = listing.next().await {
        page.extend(batch?);
    }
    let more = page.len() > limit;
    page.truncate(limit);
    let mut body = format.head();
    body.extend_from_slice(&(format.rows())(&page).ok_or(Error::Internal)?);
    body.extend_from_slice(format.tail());
    let mut response = Response::new(body::full(body.freeze()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, format.content_type());
    if let (true, Some(last)) = (more, page.last()) {
        let mut link = format!(
            "</v1/transactions?startDate={:010}&endDate={:010}",
            q.start, q.end
        );
        if let Some(p) = &q.program {
            link.push_str(&format!("&programId={}", encode_component(p)));
        }
        if let Some(status) = q.status {
            link.push_str(&format!("&status={}", status.as_str()));
        }
        let cursor = encode_cursor(app, &q.business, Cursor::of(last)).ok_or_else(|| {
            tracing::error!("a listing cursor could not be sealed");
            Error::Internal
        })?;
        link.push_str(&format!("&limit={limit}&after={cursor}>; rel=\"next\""));
        let value = HeaderValue::from_str(&link).map_err(|e| {
            tracing::error!(error = %e, "the Link header is not a valid header value");
            Error::Internal
        })?;
        response.headers_mut().insert(LINK, value);
    }
    Ok(response)
}

/// Streams the whole range as one JSON array (or CSV), a chunk per batch of rows. A client
/// that stops reading for `send_timeout` is cut off, so that it cannot hold the store's
/// snapshot for ever; a cut or failed stream ends in a transfer error, never in a short
/// array (or CSV) that looks whole.
async fn list_stream(app: &App, q: TxQuery, format: Format) -> Reply {
    // Rows are encoded where the store reads them; only encoded text crosses threads.
    let mut listing = app.store.list(q, format.rows())?;
    // The status is decided by the first batch: a store that fails at once gets a 503,
    // not a 200 with a broken body.
    let first = match listing.next().await {
        Some(Ok(Some(rows))) => rows,
        Some(Ok(None)) => return Err(Error::Internal),
        Some(Err(e)) => return Err(e.into()),
        None => Bytes::new(),
    };
    let mut head = format.head();
    head.extend_from_slice(&first);
    let stall = app.config.server.send_timeout;
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let complete = Arc::new(AtomicBool::new(false));
    let completed = complete.clone();
    tokio::spawn(async move {
        // A client that stops reading for `stall` is cut off: dropping the listing stops
        // the scan and lets its snapshot go.
        let send = |chunk: std::io::Result<Bytes>| {
            let tx = tx.clone();
            async move {
                tokio::time::timeout(stall, tx.send(chunk))
                    .await
                    .is_ok_and(|sent| sent.is_ok())
            }
        };
        if !send(Ok(head.freeze())).await {
            tracing::info!("listing abandoned: the client stopped reading");
            return;
        }
        loop {
            let chunk = match listing.next().await {
                Some(Ok(Some(rows))) => rows,
                Some(Ok(None)) | Some(Err(_)) => {
                    send(Err(std::io::Error::other("the listing failed"))).await;
                    return;
                }
                None => break,
            };
            if !send(Ok(chunk)).await {
                tracing::info!("listing abandoned: the client stopped reading");
                return;
            }
        }
        // The sender lives until this task ends, so the body sees the mark before it
        // sees the channel close.
        if send(Ok(Bytes::from_static(format.tail()))).await {
            completed.store(true, Ordering::Release);
        }
    });
    let mut response = Response::new(body::channel(None, rx, complete));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, format.content_type());
    Ok(response)
}

const CONNECTION_FIELDS: &[&str] = &["programId", "endUserId", "destinationUserId"];

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionView<'a> {
    end_user_id: &'a str,
    program_id: &'a str,
    destination_user_id: &'a str,
    created_at: String,
    updated_at: String,
}

fn connection_view(c: &Connection) -> ConnectionView<'_> {
    ConnectionView {
        end_user_id: c.end_user_id.as_str(),
        program_id: c.program_id.as_str(),
        destination_user_id: c.destination_user_id.as_str(),
        created_at: rfc3339(c.created_at),
        updated_at: rfc3339(c.updated_at),
    }
}

/// Creates (201) or updates (200) the link between an end user and a partner member id.
pub async fn connect(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let mut f = Fields::parse(&body, CONNECTION_FIELDS)?;
    let program_id = ProgramId::parse(f.required_string(ProgramId::FIELD)?)?;
    let end_user_id = EndUserId::parse(f.required_string(EndUserId::FIELD)?)?;
    let destination_user_id =
        DestinationUserId::parse(f.required_string(DestinationUserId::FIELD)?)?;
    enabled_program(&app.config.programs, caller.business, &program_id)?;
    let (connection, created) = app
        .store
        .connect(Connect {
            business: caller.business.id.clone(),
            end_user_id,
            program_id,
            destination_user_id,
        })
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json(status, &connection_view(&connection))
}

pub async fn list_connections(app: &App, caller: Caller<'_>, raw_query: Option<&str>) -> Reply {
    let mut q = query(raw_query, &["endUserId", "programId"])?;
    let end_user = q
        .remove("endUserId")
        .ok_or_else(|| Error::bad_request("query parameter `endUserId` is required"))?;
    let end_user = EndUserId::parse(end_user)?;
    let program = q.remove("programId").map(ProgramId::parse).transpose()?;
    let found = app
        .store
        .connections(&caller.business.id, &end_user, program.as_ref())
        .await?;
    let views: Vec<ConnectionView> = found.iter().map(connection_view).collect();
    json(StatusCode::OK, &views)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{DeliveryError, FailureKind};
    use crate::domain::BusinessId;

    // The serde view the listing's JSON was first written with: the oracle that pins the
    // hand-written writer's shape, byte for byte.
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct TransactionView<'a> {
        id: String,
        reference_number: &'a str,
        source_value: u64,
        currency: &'a str,
        description: Option<&'a str>,
        created_at: String,
        user_id: &'a str,
        end_user_id: Option<&'a str>,
        bonus: bool,
        total_points: u64,
        point_transactions: Vec<PointTransactionView>,
        partnership: PartnershipView<'a>,
        status: &'static str,
        delivery: Option<DeliveryView<'a>>,
        reversed_value: u64,
        reversed_points: u64,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct DeliveryView<'a> {
        attempts: u32,
        last_attempt_at: Option<String>,
        next_attempt_at: Option<String>,
        partner_transaction_id: Option<&'a str>,
        error: Option<DeliveryErrorView<'a>>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct DeliveryErrorView<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        http_status: Option<u16>,
        detail: &'a str,
    }

    fn delivery_view(d: &Delivery) -> DeliveryView<'_> {
        DeliveryView {
            attempts: d.attempts,
            last_attempt_at: d.last_attempt_at.map(rfc3339),
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            partner_transaction_id: d.partner_transaction_id.as_deref(),
            error: d.error.as_ref().map(|e| DeliveryErrorView {
                kind: e.kind.as_str(),
                http_status: e.http_status,
                detail: &e.detail,
            }),
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct PointTransactionView {
        destination_number_of_points: String,
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<&'static str>,
    }

    #[derive(Serialize)]
    struct PartnershipView<'a> {
        destination: DestinationView<'a>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct DestinationView<'a> {
        name: &'a str,
        program_id: &'a str,
    }

    fn transaction_view(tx: &Transaction) -> TransactionView<'_> {
        TransactionView {
            id: tx.id.to_string(),
            reference_number: tx.reference_number.as_str(),
            source_value: tx.value,
            currency: &tx.currency,
            description: tx.description.as_ref().map(Description::as_str),
            created_at: rfc3339(tx.created_at),
            user_id: tx.user_id.as_str(),
            end_user_id: tx.end_user_id.as_ref().map(EndUserId::as_str),
            bonus: tx.bonus,
            total_points: tx.total_points,
            point_transactions: std::iter::once(PointTransactionView {
                destination_number_of_points: tx.total_points.to_string(),
                kind: if tx.bonus { "bonus" } else { "base" },
                id: None,
                status: None,
            })
            .chain(tx.reversals.iter().map(|r| PointTransactionView {
                destination_number_of_points: match r.points {
                    0 => "0".to_owned(),
                    points => format!("-{points}"),
                },
                kind: "reversal",
                id: Some(r.id.to_string()),
                status: Some(r.status().as_str()),
            }))
            .collect(),
            partnership: PartnershipView {
                destination: DestinationView {
                    name: &tx.program_name,
                    program_id: tx.program_id.as_str(),
                },
            },
            status: tx.status().as_str(),
            delivery: tx.delivery.as_ref().map(delivery_view),
            reversed_value: tx.reversed_value,
            reversed_points: tx.reversed_points,
        }
    }

    fn transaction(seq: u64) -> Transaction {
        Transaction {
            id: crate::ledger::IdCipher::new(&[3; 32]).encode(seq),
            business: BusinessId::trusted("acme".into()),
            reference_number: ReferenceNumber::trusted(format!("ref-{seq}")),
            program_id: ProgramId::trusted("skywards".into()),
            program_name: "Skywards Miles".into(),
            user_id: UserId::trusted("EK123456".into()),
            end_user_id: None,
            description: None,
            currency: "AED".into(),
            value: 12_345,
            total_points: 280,
            bonus: false,
            created_at: 1_795_774_500,
            seq,
            delivery: None,
            reversed_value: 0,
            reversed_points: 0,
            reversals: Vec::new(),
        }
    }

    #[test]
    fn the_written_json_is_the_serde_view_byte_for_byte() {
        let pending = Delivery {
            status: DeliveryStatus::Pending,
            attempts: 2,
            step: 2,
            last_attempt_at: Some(1_795_774_560),
            next_attempt_at: Some(1_795_775_000),
            partner_transaction_id: None,
            error: Some(DeliveryError {
                kind: FailureKind::Unreachable,
                http_status: None,
                detail: "connect: refused".into(),
            }),
        };
        let mut cases = vec![transaction(0), transaction(u64::MAX)];
        let mut t = transaction(7);
        t.end_user_id = Some(EndUserId::trusted("user-\u{e9}t\u{e9}".into()));
        t.description = Some(Description::trusted(
            "\"quoted\" \\ back\tslash\n\u{1} \u{7f} \u{2028} caf\u{e9} \u{1f600}".into(),
        ));
        t.program_name = "Name with \"quotes\" </script>".into();
        t.bonus = true;
        t.value = u64::MAX;
        t.total_points = 0;
        t.created_at = 0;
        cases.push(t);
        let mut t = transaction(8);
        t.delivery = Some(pending.clone());
        t.created_at = 253_402_300_800; // the year 10000: past the fixed-width dates
        cases.push(t);
        let mut t = transaction(9);
        t.delivery = Some(Delivery {
            status: DeliveryStatus::Failed,
            next_attempt_at: None,
            partner_transaction_id: Some("p-\"1\"".into()),
            error: Some(DeliveryError {
                kind: FailureKind::Rejected,
                http_status: Some(422),
                detail: "member \"x\" unknown\r\n".into(),
            }),
            ..pending.clone()
        });
        cases.push(t);
        let mut t = transaction(10);
        t.delivery = Some(Delivery {
            status: DeliveryStatus::Completed,
            attempts: 1,
            step: 1,
            last_attempt_at: Some(u64::MAX),
            next_attempt_at: None,
            partner_transaction_id: Some("partner-tx-1".into()),
            error: None,
        });
        // Reversals: one pending, one of 0 points, one failed.
        let reversal =
            |seq: u64, points: u64, delivery: Option<Delivery>| crate::ledger::Reversal {
                id: crate::ledger::ReversalId(crate::ledger::IdCipher::new(&[4; 32]).encipher(seq)),
                seq,
                business: BusinessId::trusted("acme".into()),
                transaction_id: t.id,
                transaction_seq: t.seq,
                reference_number: ReferenceNumber::trusted(format!("ret-{seq}")),
                value: 100,
                points,
                full: false,
                reason: None,
                created_at: 1_795_774_600,
                delivery,
            };
        t.reversals = vec![
            reversal(0, 3, Some(Delivery::new(1_795_774_600))),
            reversal(1, 0, None),
            reversal(
                2,
                u64::MAX,
                t.delivery.clone().map(|d| Delivery {
                    status: DeliveryStatus::Failed,
                    ..d
                }),
            ),
        ];
        (t.reversed_value, t.reversed_points) = (300, 12);
        cases.push(t);
        for tx in &cases {
            let mut written = Vec::new();
            write_transaction_json(tx, &mut written).expect("a Vec takes it all");
            let expected = serde_json::to_vec(&transaction_view(tx)).expect("encodes");
            assert_eq!(
                String::from_utf8(written).expect("UTF-8"),
                String::from_utf8(expected).expect("UTF-8")
            );
        }
    }
}
