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
    HeaderMap, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LINK, PRAGMA,
};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::{plain_secret_matches, Claims, TokenError};
use crate::body::{self, Body};
use crate::clock::rfc3339;
use crate::config::{Business, ClientSecret};
use crate::error::Error;
use crate::input::{encode_component, query, Fields};
use crate::ledger::{
    check_description, check_text, enabled_program, quote, Connection, NewTransaction, Transaction,
    MAX_ID_CHARS, MAX_VALUE,
};
use crate::store::{Connect, Cursor, Issue, Issued, StoreError};

pub type Reply = Result<Response<Body>, Error>;

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Busy => Error::Overloaded { retry_after: 1 },
            StoreError::Unavailable => Error::Unavailable,
            StoreError::Corrupt => Error::Internal,
        }
    }
}

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
        Some((business, _)) if business.id == claims.business => Ok(Caller { business }),
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
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

pub async fn health(app: &App) -> Reply {
    app.store.ping()?;
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
    ok.then(|| business.id.clone())
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
    let now = app.clock.now();
    let ttl = app.config.auth.token_ttl_seconds;
    let claims = Claims {
        business,
        client: client_id,
        issued_at: now,
        expires_at: now + ttl,
    };
    let access_token = app.tokens.sign(&claims).ok_or_else(|| {
        tracing::error!("a token could not be signed: an id is longer than 255 bytes");
        Error::Internal
    })?;
    let mut response = json(
        StatusCode::OK,
        &TokenResponse {
            access_token,
            expires_in: ttl,
            token_type: "Bearer",
        },
    )?;
    // RFC 6749 §5.1: a response that carries a token must not be stored by any cache.
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
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
}

pub fn profile(caller: Caller<'_>) -> Reply {
    let b = caller.business;
    json(
        StatusCode::OK,
        &ProfileView {
            name: &b.name,
            program_id: &b.program_id,
            currency: &b.currency,
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
        .filter_map(|id| app.config.programs.get(id))
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
    "referenceNumber",
    "description",
    "bonus",
];

/// The `programId` and `value` that issuing and previewing share.
fn program_and_value(f: &mut Fields) -> Result<(String, u64), Error> {
    let program_id = f.required_string("programId")?;
    check_text("programId", &program_id, MAX_ID_CHARS)?;
    let value = f.required_integer("value", 1, MAX_VALUE)?;
    Ok((program_id, value))
}

fn parse_issue(body: &[u8]) -> Result<NewTransaction, Error> {
    let mut f = Fields::parse(body, ISSUE_FIELDS)?;
    let (program_id, value) = program_and_value(&mut f)?;
    let user_id = f.required_string("userId")?;
    check_text("userId", &user_id, MAX_ID_CHARS)?;
    let reference_number = f.required_string("referenceNumber")?;
    check_text("referenceNumber", &reference_number, MAX_ID_CHARS)?;
    let description = f.string("description")?;
    if let Some(d) = &description {
        check_description(d)?;
    }
    let bonus = f.boolean("bonus")?.unwrap_or(false);
    Ok(NewTransaction {
        program_id,
        value,
        user_id,
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
    date: String,
}

fn issued(status: StatusCode, tx: &Transaction) -> Reply {
    json(
        status,
        &IssuedView {
            id: tx.id.to_string(),
            total_points: tx.total_points,
            reference_number: &tx.reference_number,
            date: rfc3339(tx.created_at),
        },
    )
}

fn conflict(reference: &str, field: &str) -> Error {
    Error::Conflict(format!(
        "referenceNumber \"{reference}\" was already used with a different `{field}`; \
         use a new referenceNumber, or resend the original request to get its result"
    ))
}

/// Issues points. Order of checks: the body's shape (400); then the referenceNumber, so
/// that a retry of an acknowledged request gets its original answer even if the
/// configuration changed since (200 or 409); then the business rules (422); then the
/// writer, which checks the referenceNumber again inside its write transaction.
pub async fn issue(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let request = parse_issue(&body)?;
    let business = caller.business;
    if let Some(existing) = app
        .store
        .by_reference(&business.id, &request.reference_number)?
    {
        return match existing.differing_field(&request) {
            None => issued(StatusCode::OK, &existing),
            Some(field) => Err(conflict(&request.reference_number, field)),
        };
    }
    let program = enabled_program(&app.config, business, &request.program_id)?;
    let total_points = quote(&app.config, business, program, request.value)?;
    let reference = request.reference_number.clone();
    let outcome = app
        .store
        .issue(Issue {
            business: business.id.clone(),
            program_name: program.name.clone(),
            currency: business.currency.clone(),
            total_points,
            request,
        })
        .await?;
    match outcome {
        Issued::Created(tx) => issued(StatusCode::CREATED, &tx),
        Issued::Replayed(tx) => issued(StatusCode::OK, &tx),
        Issued::Conflict(field) => Err(conflict(&reference, field)),
    }
}

pub fn preview(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let mut f = Fields::parse(&body, &["programId", "value"])?;
    let (program_id, value) = program_and_value(&mut f)?;
    let program = enabled_program(&app.config, caller.business, &program_id)?;
    let total_points = quote(&app.config, caller.business, program, value)?;
    json(
        StatusCode::OK,
        &serde_json::json!({ "totalPoints": total_points }),
    )
}

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
    bonus: bool,
    total_points: u64,
    point_transactions: [PointTransactionView; 1],
    partnership: PartnershipView<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PointTransactionView {
    destination_number_of_points: String,
    #[serde(rename = "type")]
    kind: &'static str,
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
        reference_number: &tx.reference_number,
        source_value: tx.value,
        currency: &tx.currency,
        description: tx.description.as_deref(),
        created_at: rfc3339(tx.created_at),
        user_id: &tx.user_id,
        bonus: tx.bonus,
        total_points: tx.total_points,
        point_transactions: [PointTransactionView {
            destination_number_of_points: tx.total_points.to_string(),
            kind: if tx.bonus { "bonus" } else { "base" },
        }],
        partnership: PartnershipView {
            destination: DestinationView {
                name: &tx.program_name,
                program_id: &tx.program_id,
            },
        },
    }
}

/// Writes the JSON of a transaction as the API shows it (the listing's per-row work).
pub fn write_transaction_json(
    tx: &Transaction,
    out: impl std::io::Write,
) -> serde_json::Result<()> {
    serde_json::to_writer(out, &transaction_view(tx))
}

/// One transaction by id, else by referenceNumber (`key` is already percent-decoded).
pub fn get_transaction(app: &App, caller: Caller<'_>, key: &str) -> Reply {
    match app.store.transaction(&caller.business.id, key)? {
        Some(tx) => json(StatusCode::OK, &transaction_view(&tx)),
        None => Err(Error::NotFound(format!(
            "no transaction has the id or referenceNumber \"{key}\""
        ))),
    }
}

/// Most transactions in one page when `limit` is given.
pub const MAX_PAGE: u64 = 1000;
/// The listing is streamed in chunks of about this many bytes.
const CHUNK: usize = 32 * 1024;

struct ListQuery {
    start: u64,
    end: u64,
    program: Option<String>,
    limit: Option<u64>,
    after: Option<Cursor>,
}

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
    open_cursor: impl Fn(&str) -> Option<Cursor>,
) -> Result<ListQuery, Error> {
    let q = query(
        raw,
        &["startDate", "endDate", "programId", "limit", "after"],
    )?;
    let start = epoch_param("startDate", q.get("startDate"))?;
    let end = epoch_param("endDate", q.get("endDate"))?;
    if start > end {
        return Err(Error::bad_request(
            "`startDate` must not be after `endDate`",
        ));
    }
    let program = match q.get("programId") {
        Some(p) => {
            check_text("programId", p, MAX_ID_CHARS)?;
            Some(p.clone())
        }
        None => None,
    };
    let limit = match q.get("limit") {
        Some(l) => Some(
            Some(l)
                .filter(|l| !l.is_empty() && l.len() <= 4 && l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse::<u64>().ok())
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
    Ok(ListQuery {
        start,
        end,
        program,
        limit,
        after,
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
/// range is streamed from one read transaction; with it, one page and a `Link` to the next.
pub async fn list_transactions(
    app: Arc<App>,
    caller: Caller<'_>,
    raw_query: Option<&str>,
) -> Reply {
    let business = caller.business.id.clone();
    let q = parse_list_query(raw_query, |text| decode_cursor(&app, &business, text))?;
    match q.limit {
        Some(limit) => list_page(app, business, q, limit).await,
        None => list_stream(app, business, q).await,
    }
}

async fn list_page(app: Arc<App>, business: String, q: ListQuery, limit: u64) -> Reply {
    let scan_app = app.clone();
    let owner = business.clone();
    let (program, start, end, after) = (q.program.clone(), q.start, q.end, q.after);
    let (page, more) = tokio::task::spawn_blocking(move || {
        let mut page = Vec::new();
        let mut more = false;
        scan_app
            .store
            .scan(&business, program.as_deref(), start, end, after, |tx| {
                if page.len() as u64 == limit {
                    more = true;
                    return false;
                }
                page.push(tx);
                true
            })?;
        Ok::<_, StoreError>((page, more))
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "a listing page did not finish");
        Error::Internal
    })??;
    let views: Vec<TransactionView> = page.iter().map(transaction_view).collect();
    let mut response = json(StatusCode::OK, &views)?;
    if let (true, Some(last)) = (more, page.last()) {
        let mut link = format!(
            "</v1/transactions?startDate={:010}&endDate={:010}",
            q.start, q.end
        );
        if let Some(p) = &q.program {
            link.push_str(&format!("&programId={}", encode_component(p)));
        }
        let cursor = encode_cursor(&app, &owner, Cursor::of(last)).ok_or_else(|| {
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

async fn list_stream(app: Arc<App>, business: String, q: ListQuery) -> Reply {
    // Each streaming listing holds a blocking thread and a read snapshot: bound them.
    let permit = app
        .listings
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::Overloaded { retry_after: 1 })?;
    let stall = app.config.server.send_timeout;
    let runtime = tokio::runtime::Handle::current();
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let complete = Arc::new(AtomicBool::new(false));
    let completed = complete.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        // A client that stops reading for `stall` is cut off, so that it cannot hold the
        // thread and the snapshot (which keeps the file from reusing pages) for ever.
        let send = |item: std::io::Result<Bytes>| {
            runtime
                .block_on(tokio::time::timeout(stall, tx.send(item)))
                .is_ok_and(|sent| sent.is_ok())
        };
        let mut buf = BytesMut::with_capacity(CHUNK + 1024);
        buf.put_u8(b'[');
        let mut first = true;
        let mut client_gone = false;
        let scanned = app.store.scan(
            &business,
            q.program.as_deref(),
            q.start,
            q.end,
            q.after,
            |t| {
                if !first {
                    buf.put_u8(b',');
                }
                first = false;
                if write_transaction_json(&t, (&mut buf).writer()).is_err() {
                    return false;
                }
                if buf.len() >= CHUNK && !send(Ok(buf.split().freeze())) {
                    client_gone = true;
                    return false;
                }
                true
            },
        );
        match scanned {
            Ok(()) if !client_gone => {
                buf.put_u8(b']');
                // The sender lives until this closure returns, so the body sees the mark
                // before it sees the channel close.
                if send(Ok(buf.freeze())) {
                    completed.store(true, Ordering::Release);
                }
            }
            Ok(()) => tracing::info!("listing abandoned: the client stopped reading"),
            Err(_) => {
                send(Err(std::io::Error::other("the listing failed")));
            }
        }
    });
    // The status is decided by the first chunk: a store that fails at once gets a 503,
    // not a 200 with a broken body.
    let first = match rx.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(_)) | None => return Err(Error::Unavailable),
    };
    let mut response = Response::new(body::channel(Some(first), rx, complete));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
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
        end_user_id: &c.end_user_id,
        program_id: &c.program_id,
        destination_user_id: &c.destination_user_id,
        created_at: rfc3339(c.created_at),
        updated_at: rfc3339(c.updated_at),
    }
}

/// Creates (201) or updates (200) the link between an end user and a partner member id.
pub async fn connect(app: &App, caller: Caller<'_>, body: Bytes) -> Reply {
    let mut f = Fields::parse(&body, CONNECTION_FIELDS)?;
    let mut text = |name: &str| -> Result<String, Error> {
        let value = f.required_string(name)?;
        check_text(name, &value, MAX_ID_CHARS)?;
        Ok(value)
    };
    let program_id = text("programId")?;
    let end_user_id = text("endUserId")?;
    let destination_user_id = text("destinationUserId")?;
    enabled_program(&app.config, caller.business, &program_id)?;
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

pub fn list_connections(app: &App, caller: Caller<'_>, raw_query: Option<&str>) -> Reply {
    let q = query(raw_query, &["endUserId", "programId"])?;
    let end_user = q
        .get("endUserId")
        .ok_or_else(|| Error::bad_request("query parameter `endUserId` is required"))?;
    check_text("endUserId", end_user, MAX_ID_CHARS)?;
    let program = q.get("programId");
    if let Some(p) = program {
        check_text("programId", p, MAX_ID_CHARS)?;
    }
    let found =
        app.store
            .connections(&caller.business.id, end_user, program.map(String::as_str))?;
    let views: Vec<ConnectionView> = found.iter().map(connection_view).collect();
    json(StatusCode::OK, &views)
}
