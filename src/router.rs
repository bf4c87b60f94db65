//! The endpoint list, and the one `match` that sends a request to its handler.
//!
//! | method | path | auth |
//! |---|---|---|
//! | GET, HEAD | / | no |
//! | GET, HEAD | /dashboard/app.js | no |
//! | GET, HEAD | /dashboard/app.css | no |
//! | GET, HEAD | /healthz | no |
//! | GET, HEAD | /v1/openapi.json | no |
//! | POST | /v1/auth | no |
//! | POST | /v1/oauth/token | no |
//! | GET, HEAD | /v1/profile | bearer |
//! | GET, HEAD | /v1/programs | bearer |
//! | POST | /v1/programs/{programId}/validate-member | bearer |
//! | GET, HEAD | /v1/currencies | bearer |
//! | POST | /v1/transactions | bearer |
//! | GET, HEAD | /v1/transactions?startDate&endDate[&programId][&status][&limit][&after] | bearer |
//! | POST | /v1/transactions/preview | bearer |
//! | POST | /v1/transactions/batch | bearer |
//! | GET, HEAD | /v1/transactions/{id or referenceNumber} | bearer |
//! | POST | /v1/transactions/{id or referenceNumber}/redeliver | bearer |
//! | POST | /v1/transactions/{id or referenceNumber}/reversals | bearer |
//! | GET, HEAD | /v1/transactions/{id or referenceNumber}/reversals | bearer |
//! | GET, HEAD | /v1/reversals/{id or referenceNumber} | bearer |
//! | POST | /v1/reversals/{id or referenceNumber}/redeliver | bearer |
//! | PUT, POST | /v1/program-connections | bearer |
//! | GET, HEAD | /v1/program-connections?endUserId[&programId] | bearer |
//!
//! The match below is the truth. A known path with another method is 405 with `Allow`;
//! anything else is 404. HEAD is served wherever GET is (RFC 9110 §9.3.2): the same
//! answer, whose body hyper leaves out. Authentication is an explicit call in each arm that needs it,
//! made before the body is read. `GET /v1/transactions/preview` looks up a transaction
//! whose referenceNumber is "preview": only POST is the preview (and the same for "batch").
//!
//! `/` and `/dashboard/…` are the staff dashboard ([`crate::dashboard`]): public static
//! files, which use the API below with a token like any client; any other
//! `/dashboard/…` path is a 404 like every unknown path.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, Version};

use crate::api::{self, authenticate, Reply};
use crate::app::App;
use crate::body::Body;
use crate::error::Error;
use crate::input::decode_component;
use crate::{dashboard, oauth, openapi};

pub async fn route(app: Arc<App>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    // The request's access-log line carries these.
    let route = route_name(req.method(), req.uri().path());
    crate::access::record(|line| {
        line.remote = Some(remote);
        line.route = Some(route.into());
    });
    let started = std::time::Instant::now();
    let metrics = app.metrics.clone();
    let response = dispatch(app, req, remote)
        .await
        .unwrap_or_else(Error::into_response);
    metrics.request(route, response.status().as_u16(), started.elapsed());
    response
}

/// The endpoint a path belongs to, as the table above writes it, for the logs: requests
/// group by it, and an id or reference in the path does not leak into it (the `path`
/// field has that). Paths of no endpoint are "none".
fn route_name(method: &Method, path: &str) -> &'static str {
    match Segments::of(path).as_slice() {
        [""] => "/",
        ["dashboard", "app.js"] => "/dashboard/app.js",
        ["dashboard", "app.css"] => "/dashboard/app.css",
        ["healthz"] => "/healthz",
        ["v1", "openapi.json"] => "/v1/openapi.json",
        ["v1", "auth"] => "/v1/auth",
        ["v1", "oauth", "token"] => "/v1/oauth/token",
        ["v1", "profile"] => "/v1/profile",
        ["v1", "programs"] => "/v1/programs",
        ["v1", "currencies"] => "/v1/currencies",
        ["v1", "transactions"] => "/v1/transactions",
        ["v1", "transactions", "preview"] if method == Method::POST => "/v1/transactions/preview",
        ["v1", "transactions", "batch"] if method == Method::POST => "/v1/transactions/batch",
        ["v1", "transactions", key] if !key.is_empty() => "/v1/transactions/{transactionId}",
        ["v1", "transactions", key, "redeliver"] if !key.is_empty() => {
            "/v1/transactions/{transactionId}/redeliver"
        }
        ["v1", "transactions", key, "reversals"] if !key.is_empty() => {
            "/v1/transactions/{transactionId}/reversals"
        }
        ["v1", "reversals", key] if !key.is_empty() => "/v1/reversals/{reversalId}",
        ["v1", "reversals", key, "redeliver"] if !key.is_empty() => {
            "/v1/reversals/{reversalId}/redeliver"
        }
        ["v1", "program-connections"] => "/v1/program-connections",
        _ => "none",
    }
}

/// The router's one match. Its future is as large as its largest arm's, and each request
/// allocates one (`server::handle` boxes it): the handlers whose futures are large (the
/// writes, over 0.9 KiB each) are boxed where they are called, and request bodies are
/// read through [`BodyRead`], so that a read such as a GET allocates ~0.8 KiB, not ~5.
async fn dispatch(app: Arc<App>, req: Request<Incoming>, remote: SocketAddr) -> Reply {
    check_framing(&req)?;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let segments = Segments::of(&path);
    match (req.method(), segments.as_slice()) {
        (&Method::GET | &Method::HEAD, [""]) => dashboard::page(),
        (_, [""]) => Err(Error::MethodNotAllowed("GET, HEAD")),
        (&Method::GET | &Method::HEAD, ["dashboard", "app.js"]) => dashboard::script(),
        (_, ["dashboard", "app.js"]) => Err(Error::MethodNotAllowed("GET, HEAD")),
        (&Method::GET | &Method::HEAD, ["dashboard", "app.css"]) => dashboard::style(),
        (_, ["dashboard", "app.css"]) => Err(Error::MethodNotAllowed("GET, HEAD")),

        (&Method::GET | &Method::HEAD, ["healthz"]) => api::health(&app).await,
        (_, ["healthz"]) => Err(Error::MethodNotAllowed("GET, HEAD")),

        (&Method::GET | &Method::HEAD, ["v1", "openapi.json"]) => openapi::document(),
        (_, ["v1", "openapi.json"]) => Err(Error::MethodNotAllowed("GET, HEAD")),

        (&Method::POST, ["v1", "auth"]) => {
            let client = client_address(&app, &req, remote)?;
            let body = read_json(req, &app).await?;
            api::auth(app, client, body).await
        }
        (_, ["v1", "auth"]) => Err(Error::MethodNotAllowed("POST")),

        // Client authentication is the handler's (HTTP Basic or the form), not a bearer token.
        (&Method::POST, ["v1", "oauth", "token"]) => {
            let client = client_address(&app, &req, remote)?;
            let form = has_media_type(&req, "application/x-www-form-urlencoded");
            let authorization = req.headers().get(AUTHORIZATION).cloned();
            let body = read_body(req, &app).await?;
            oauth::token(app, client, form, authorization.as_ref(), body).await
        }
        (_, ["v1", "oauth", "token"]) => Err(Error::MethodNotAllowed("POST")),

        (&Method::GET | &Method::HEAD, ["v1", "profile"]) => {
            api::profile(&app, authenticate(&app, req.headers())?)
        }
        (_, ["v1", "profile"]) => Err(Error::MethodNotAllowed("GET, HEAD")),

        (&Method::GET | &Method::HEAD, ["v1", "programs"]) => {
            api::programs(&app, authenticate(&app, req.headers())?)
        }
        (_, ["v1", "programs"]) => Err(Error::MethodNotAllowed("GET, HEAD")),

        (&Method::POST, ["v1", "programs", program, "validate-member"]) if !program.is_empty() => {
            let caller = authenticate(&app, req.headers())?;
            let program = decode_component(program, false)?;
            let body = read_json(req, &app).await?;
            Box::pin(api::validate_member(&app, caller, &program, body)).await
        }
        (_, ["v1", "programs", program, "validate-member"]) if !program.is_empty() => {
            Err(Error::MethodNotAllowed("POST"))
        }

        (&Method::GET | &Method::HEAD, ["v1", "currencies"]) => {
            authenticate(&app, req.headers())?;
            api::currencies(&app)
        }
        (_, ["v1", "currencies"]) => Err(Error::MethodNotAllowed("GET, HEAD")),

        (&Method::POST, ["v1", "transactions"]) => {
            let caller = authenticate(&app, req.headers())?;
            let body = read_json(req, &app).await?;
            Box::pin(api::issue(&app, caller, body)).await
        }
        (&Method::GET | &Method::HEAD, ["v1", "transactions"]) => {
            let caller = authenticate(&app, req.headers())?;
            let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let csv = crate::csv::accepts_csv(accept);
            api::list_transactions(app.clone(), caller, query.as_deref(), csv).await
        }
        (_, ["v1", "transactions"]) => Err(Error::MethodNotAllowed("GET, HEAD, POST")),

        (&Method::POST, ["v1", "transactions", "batch"]) => {
            let caller = authenticate(&app, req.headers())?;
            let limit = app.config.server.max_batch_body_bytes;
            let body = read_json_up_to(req, &app, limit).await?;
            Box::pin(api::issue_batch(&app, caller, body)).await
        }
        (&Method::POST, ["v1", "transactions", "preview"]) => {
            let caller = authenticate(&app, req.headers())?;
            let body = read_json(req, &app).await?;
            api::preview(&app, caller, body)
        }
        (&Method::GET | &Method::HEAD, ["v1", "transactions", key]) if !key.is_empty() => {
            let caller = authenticate(&app, req.headers())?;
            api::get_transaction(&app, caller, &decode_component(key, false)?).await
        }
        (&Method::POST, ["v1", "transactions", key, "redeliver"]) if !key.is_empty() => {
            let caller = authenticate(&app, req.headers())?;
            api::redeliver(&app, caller, &decode_component(key, false)?).await
        }
        (_, ["v1", "transactions", key, "redeliver"]) if !key.is_empty() => {
            Err(Error::MethodNotAllowed("POST"))
        }
        (&Method::POST, ["v1", "transactions", key, "reversals"]) if !key.is_empty() => {
            let caller = authenticate(&app, req.headers())?;
            let key = decode_component(key, false)?;
            let body = read_json(req, &app).await?;
            Box::pin(api::reverse(&app, caller, &key, body)).await
        }
        (&Method::GET | &Method::HEAD, ["v1", "transactions", key, "reversals"])
            if !key.is_empty() =>
        {
            let caller = authenticate(&app, req.headers())?;
            api::list_reversals(&app, caller, &decode_component(key, false)?).await
        }
        (_, ["v1", "transactions", key, "reversals"]) if !key.is_empty() => {
            Err(Error::MethodNotAllowed("GET, HEAD, POST"))
        }

        (&Method::GET | &Method::HEAD, ["v1", "reversals", key]) if !key.is_empty() => {
            let caller = authenticate(&app, req.headers())?;
            api::get_reversal(&app, caller, &decode_component(key, false)?).await
        }
        (_, ["v1", "reversals", key]) if !key.is_empty() => {
            Err(Error::MethodNotAllowed("GET, HEAD"))
        }
        (&Method::POST, ["v1", "reversals", key, "redeliver"]) if !key.is_empty() => {
            let caller = authenticate(&app, req.headers())?;
            api::redeliver_reversal(&app, caller, &decode_component(key, false)?).await
        }
        (_, ["v1", "reversals", key, "redeliver"]) if !key.is_empty() => {
            Err(Error::MethodNotAllowed("POST"))
        }
        (_, ["v1", "transactions", "preview" | "batch"]) => {
            Err(Error::MethodNotAllowed("GET, HEAD, POST"))
        }
        (_, ["v1", "transactions", key]) if !key.is_empty() => {
            Err(Error::MethodNotAllowed("GET, HEAD"))
        }

        (&Method::PUT | &Method::POST, ["v1", "program-connections"]) => {
            let caller = authenticate(&app, req.headers())?;
            let body = read_json(req, &app).await?;
            api::connect(&app, caller, body).await
        }
        (&Method::GET | &Method::HEAD, ["v1", "program-connections"]) => {
            let caller = authenticate(&app, req.headers())?;
            api::list_connections(&app, caller, query.as_deref()).await
        }
        (_, ["v1", "program-connections"]) => Err(Error::MethodNotAllowed("GET, HEAD, POST, PUT")),

        _ => Err(Error::NotFound(format!("there is no endpoint at {path}"))),
    }
}

/// A path's segments after its leading `/`, kept on the stack (collected into a `Vec`,
/// they were two allocations per request). At most [`Segments::MAX`]: no endpoint has as
/// many, so a longer path, cut there, still matches none.
struct Segments<'a> {
    parts: [&'a str; Segments::MAX],
    len: usize,
}

impl<'a> Segments<'a> {
    /// One more than the longest endpoint's count.
    const MAX: usize = 5;

    fn of(path: &'a str) -> Segments<'a> {
        let mut segments = Segments {
            parts: [""; Segments::MAX],
            len: 0,
        };
        for (slot, part) in segments.parts.iter_mut().zip(path.split('/').skip(1)) {
            *slot = part;
            segments.len += 1;
        }
        segments
    }

    fn as_slice(&self) -> &[&'a str] {
        &self.parts[..self.len]
    }
}

/// What every request must get right before it is routed: one `Host` in HTTP/1.1
/// (RFC 9112 §3.2), and at most one `Authorization` (two would leave open which one
/// counts).
fn check_framing(req: &Request<Incoming>) -> Result<(), Error> {
    let hosts = req.headers().get_all(HOST).iter().count();
    if req.version() == Version::HTTP_11 && hosts != 1 {
        return Err(Error::bad_request(
            "an HTTP/1.1 request must carry exactly one Host header",
        ));
    }
    if hosts > 1 {
        return Err(Error::bad_request("send at most one Host header"));
    }
    if req.headers().get_all(AUTHORIZATION).iter().count() > 1 {
        return Err(Error::bad_request("send at most one Authorization header"));
    }
    Ok(())
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is read from the right (the entry the nearest proxy added) past every
/// trusted proxy to the first address that is not one. From anyone else the header is
/// ignored, so that a client cannot pick the address it is counted under.
fn client_address(app: &App, req: &Request<Incoming>, remote: SocketAddr) -> Result<IpAddr, Error> {
    let proxies = &app.config.server.trusted_proxies;
    let trusted = |address: IpAddr| proxies.iter().any(|p| p.contains(address));
    let mut address = remote.ip().to_canonical();
    if !trusted(address) {
        return Ok(address);
    }
    let mut entries = Vec::new();
    for value in req.headers().get_all("x-forwarded-for") {
        let text = value.to_str().map_err(|_| forwarded_error())?;
        entries.extend(text.split(',').map(str::trim).filter(|e| !e.is_empty()));
    }
    for entry in entries.iter().rev() {
        address = parse_forwarded(entry).ok_or_else(forwarded_error)?;
        if !trusted(address) {
            break;
        }
    }
    Ok(address)
}

fn forwarded_error() -> Error {
    Error::bad_request("X-Forwarded-For from a trusted proxy must be a list of IP addresses")
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`[v6]:port`, `v4:port`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let address = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(address.to_canonical())
}

/// Whether the request declares its body as `media` (parameters such as charset aside).
fn has_media_type(req: &Request<Incoming>, media: &str) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case(media))
}

/// A request body being read. Boxed, and the headers checked before: what a request's
/// future holds across the read is this pointer, not the request, the timer and the
/// body's state (~1.3 KiB, which every request's future would otherwise be sized for,
/// GETs' included: see `server::handle`).
type BodyRead = Pin<Box<dyn Future<Output = Result<Bytes, Error>> + Send>>;

/// The body of a JSON request: declared `application/json` (415 otherwise), read as
/// [`read_body`] reads.
fn read_json(req: Request<Incoming>, app: &App) -> BodyRead {
    read_json_up_to(req, app, app.config.server.max_body_bytes)
}

/// [`read_json`] with another size limit (the batch endpoint's).
fn read_json_up_to(req: Request<Incoming>, app: &App, limit: usize) -> BodyRead {
    if !has_media_type(&req, "application/json") {
        return refused(Error::UnsupportedMediaType(
            "send the body with `Content-Type: application/json`",
        ));
    }
    read_body_up_to(req, app, limit)
}

/// A request body: not encoded (415 otherwise), at most `max_body_bytes` (413), arriving
/// within `body_read_timeout` (408).
fn read_body(req: Request<Incoming>, app: &App) -> BodyRead {
    read_body_up_to(req, app, app.config.server.max_body_bytes)
}

fn read_body_up_to(req: Request<Incoming>, app: &App, limit: usize) -> BodyRead {
    let encoded = req
        .headers()
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .any(|coding| !coding.trim().eq_ignore_ascii_case("identity"));
    if encoded {
        return refused(Error::UnsupportedMediaType(
            "send the body unencoded: no `Content-Encoding` other than identity",
        ));
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return refused(Error::PayloadTooLarge(limit));
    }
    let body = Limited::new(req.into_body(), limit).collect();
    let timeout = app.config.server.body_read_timeout;
    Box::pin(async move {
        match tokio::time::timeout(timeout, body).await {
            Err(_) => Err(Error::RequestTimeout),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(Error::PayloadTooLarge(limit))
            }
            Ok(Err(_)) => Err(Error::bad_request("the request body could not be read")),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    })
}

/// A body refused on its headers, unread.
fn refused(error: Error) -> BodyRead {
    Box::pin(std::future::ready(Err(error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_the_path_split_at_slashes_cut_past_the_longest_endpoint() {
        fn split(path: &str) -> Vec<&str> {
            Segments::of(path).as_slice().to_vec()
        }
        assert_eq!(split("/"), [""]);
        assert_eq!(split("*"), Vec::<&str>::new());
        assert_eq!(split("/v1/transactions/"), ["v1", "transactions", ""]);
        assert_eq!(
            split("/v1/transactions/a/reversals"),
            ["v1", "transactions", "a", "reversals"]
        );
        assert_eq!(split("//a///b"), ["", "a", "", "", "b"]);
        assert_eq!(split("/a/b/c/d/e/f/g"), ["a", "b", "c", "d", "e"]);
        // A path longer than every endpoint's matches none, however it goes on.
        for path in [
            "/v1/transactions/a/reversals/x",
            "/v1/transactions/a/reversals/x/y/z",
            "/v1/reversals/r/redeliver/again",
        ] {
            assert_eq!(route_name(&Method::GET, path), "none", "{path}");
            assert_eq!(route_name(&Method::POST, path), "none", "{path}");
        }
        assert_eq!(
            route_name(&Method::POST, "/v1/transactions/a/reversals"),
            "/v1/transactions/{transactionId}/reversals"
        );
    }
}
