//! `POST /v1/oauth/token`: the OAuth 2.0 client credentials grant (RFC 6749 §4.4), for
//! clients and gateways that speak OAuth rather than `POST /v1/auth`. The same clients,
//! secrets, tokens and failed-login throttle as `/v1/auth` ([`crate::api::login`]).
//!
//! - Request: `application/x-www-form-urlencoded`, `grant_type=client_credentials`; the
//!   client authenticates with HTTP Basic (id and secret each form-urlencoded, then
//!   base64, RFC 6749 §2.3.1) or with `client_id` and `client_secret` in the form, not
//!   both. Parameters appear at most once; unknown ones are ignored (§3.2); a `scope` is
//!   refused (`invalid_scope`): this server has no scopes.
//! - Answer (§5.1): `{access_token, token_type: "Bearer", expires_in}`, with
//!   `Cache-Control: no-store` and `Pragma: no-cache`.
//! - Errors (§5.2) are JSON `{error, error_description}`, NOT problem+json, because OAuth
//!   clients parse this shape: 400 `invalid_request`, `unsupported_grant_type`,
//!   `invalid_scope`; 401 `invalid_client` (always with `WWW-Authenticate: Basic`, also
//!   for form credentials: every 401 carries a challenge). What is not about OAuth keeps
//!   the server's problem+json: 429 (throttled, with `Retry-After`), 413, 408, 415 (an
//!   encoded body), 5xx.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::api::{login, no_store, Reply};
use crate::app::App;
use crate::body;
use crate::error::Error;
use crate::input::decode_component;

/// An RFC 6749 §5.2 error code and a description for the developer.
struct OAuthError {
    code: &'static str,
    description: String,
}

fn oauth_error(code: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        code,
        description: description.into(),
    }
}

#[derive(Serialize)]
struct TokenAnswer {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

#[derive(Serialize)]
struct ErrorAnswer<'a> {
    error: &'static str,
    error_description: &'a str,
}

/// The token endpoint. `form`: whether the body was declared form-urlencoded;
/// `authorization`: the `Authorization` header, if any.
pub async fn token(
    app: Arc<App>,
    client: IpAddr,
    form: bool,
    authorization: Option<&HeaderValue>,
    body: Bytes,
) -> Reply {
    let request = match parse(form, authorization, &body) {
        Ok(request) => request,
        Err(e) => return Ok(error_response(e)),
    };
    match login(app, client, request.client_id, request.secret).await {
        Ok(grant) => {
            let answer = TokenAnswer {
                access_token: grant.access_token,
                token_type: "Bearer",
                expires_in: grant.expires_in,
            };
            Ok(json_response(StatusCode::OK, &answer))
        }
        Err(Error::BadCredentials) => Ok(error_response(oauth_error(
            "invalid_client",
            "the client id or the client secret is wrong",
        ))),
        Err(other) => Err(other),
    }
}

/// A checked token request: who asks.
struct TokenRequest {
    client_id: String,
    secret: String,
}

fn parse(
    form: bool,
    authorization: Option<&HeaderValue>,
    body: &[u8],
) -> Result<TokenRequest, OAuthError> {
    if !form {
        return Err(oauth_error(
            "invalid_request",
            "send the body as application/x-www-form-urlencoded (RFC 6749 §4.4.2)",
        ));
    }
    let params = form_params(body)?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    match get("grant_type") {
        None | Some("") => {
            return Err(oauth_error(
                "invalid_request",
                "grant_type is required: grant_type=client_credentials",
            ))
        }
        Some("client_credentials") => {}
        Some(_) => {
            return Err(oauth_error(
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            ))
        }
    }
    if get("scope").is_some_and(|s| !s.is_empty()) {
        return Err(oauth_error(
            "invalid_scope",
            "this server has no scopes: leave scope out",
        ));
    }
    let in_form = (get("client_id"), get("client_secret"));
    match (authorization, in_form) {
        (Some(header), (None, None)) => basic_credentials(header),
        (Some(_), _) => Err(oauth_error(
            "invalid_request",
            "authenticate either with HTTP Basic or with client_id and client_secret in \
             the body, not both (RFC 6749 §2.3)",
        )),
        (None, (Some(id), Some(secret))) => Ok(TokenRequest {
            client_id: id.to_owned(),
            secret: secret.to_owned(),
        }),
        (None, (Some(_), None)) => Err(oauth_error(
            "invalid_request",
            "client_secret is required with client_id",
        )),
        (None, (None, Some(_))) => Err(oauth_error(
            "invalid_request",
            "client_id is required with client_secret",
        )),
        (None, (None, None)) => Err(oauth_error(
            "invalid_client",
            "no client authentication: use HTTP Basic, or client_id and client_secret in \
             the body",
        )),
    }
}

/// The name=value pairs of a form body, each name at most once (RFC 6749 §3.2).
fn form_params(body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| oauth_error("invalid_request", "the body is not UTF-8"))?;
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |t: &str| {
            decode_component(t, true).map_err(|_| {
                oauth_error(
                    "invalid_request",
                    "the body is not valid form encoding (a `%` not followed by two hex \
                     digits, or not UTF-8)",
                )
            })
        };
        let (name, value) = (decode(name)?, decode(value)?);
        if params.iter().any(|(n, _)| *n == name) {
            return Err(oauth_error(
                "invalid_request",
                format!("the parameter {name} is given more than once"),
            ));
        }
        params.push((name, value));
    }
    Ok(params)
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`.
fn basic_credentials(header: &HeaderValue) -> Result<TokenRequest, OAuthError> {
    let bad = || {
        oauth_error(
            "invalid_client",
            "the Authorization header must be `Basic ` and base64 of client_id:client_secret",
        )
    };
    let text = header.to_str().map_err(|_| bad())?;
    let (scheme, encoded) = text.split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(bad)?;
    let client_id = decode_component(id, true).map_err(|_| bad())?;
    let secret = decode_component(secret, true).map_err(|_| bad())?;
    if client_id.is_empty() {
        return Err(bad());
    }
    Ok(TokenRequest { client_id, secret })
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<body::Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode an OAuth answer");
        b"{\"error\":\"server_error\"}".to_vec()
    });
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    no_store(headers);
    response
}

fn error_response(e: OAuthError) -> Response<body::Body> {
    crate::access::record(|line| line.problem = Some(e.code));
    let status = if e.code == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut response = json_response(
        status,
        &ErrorAnswer {
            error: e.code,
            error_description: &e.description,
        },
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"cosmopoints\", charset=\"UTF-8\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(form: bool, auth: Option<&str>, body: &str) -> Result<(String, String), &'static str> {
        let header = auth.map(|a| HeaderValue::from_str(a).expect("header"));
        parse(form, header.as_ref(), body.as_bytes())
            .map(|r| (r.client_id, r.secret))
            .map_err(|e| e.code)
    }

    #[test]
    fn requests_parse_into_credentials_or_the_right_error() {
        let basic = |id: &str, secret: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
            )
        };
        let grant = "grant_type=client_credentials";
        assert_eq!(
            code(true, Some(&basic("acme-pos", "s%3Ac+x")), grant),
            Ok(("acme-pos".into(), "s:c x".into()))
        );
        assert_eq!(
            code(
                true,
                None,
                &format!("{grant}&client_id=a&client_secret=b%26c")
            ),
            Ok(("a".into(), "b&c".into()))
        );
        let cases = [
            (false, None, grant, "invalid_request"),
            (true, None, "", "invalid_request"),
            (true, None, "grant_type=password", "unsupported_grant_type"),
            (
                true,
                None,
                "grant_type=client_credentials&grant_type=client_credentials",
                "invalid_request",
            ),
            (
                true,
                None,
                "grant_type=client_credentials&scope=all",
                "invalid_scope",
            ),
            (true, None, grant, "invalid_client"),
            (
                true,
                None,
                "grant_type=client_credentials&client_id=a",
                "invalid_request",
            ),
            (true, Some("Bearer x"), grant, "invalid_client"),
            (true, Some("Basic !!!"), grant, "invalid_client"),
            (true, Some("Basic YQ=="), grant, "invalid_client"),
            (true, None, "grant_type=%zz", "invalid_request"),
        ];
        for (form, auth, body, expected) in cases {
            assert_eq!(code(form, auth, body), Err(expected), "{auth:?} {body}");
        }
        assert_eq!(
            code(
                true,
                Some(&basic("a", "b")),
                "grant_type=client_credentials&client_id=a&client_secret=b"
            ),
            Err("invalid_request")
        );
    }
}
