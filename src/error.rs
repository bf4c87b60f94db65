//! The one request-path error type, converted into RFC 9457 `application/problem+json`
//! in exactly one place ([`Error::into_response`]).
//!
//! Invariant: a 5xx response says nothing internal. Whatever went wrong is logged by the
//! code that saw it; the client only learns that it was our fault and whether to retry.

use bytes::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::body::{full, Body};
use crate::domain::Invalid;
use crate::ledger::Rejection;
use crate::store::StoreError;

/// Everything a request can fail with. Each variant carries only what the client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Malformed JSON, a missing or mistyped field, a bad query parameter or path segment.
    BadRequest(String),
    /// No, invalid or expired bearer token.
    Unauthenticated(&'static str),
    /// Wrong client id or secret on `/v1/auth`; deliberately the same for both.
    BadCredentials,
    /// Unknown path, or a resource the caller's business does not have.
    NotFound(String),
    /// Known path, other method: the methods the path does have.
    MethodNotAllowed(&'static str),
    /// An idempotency key reused with a different request.
    Conflict(String),
    /// The resource is not in a state that allows this action (redelivering a delivery
    /// that has not failed).
    StateConflict(String),
    /// The request body is larger than the configured limit (in bytes).
    PayloadTooLarge(usize),
    /// The body did not arrive within the body read timeout.
    RequestTimeout,
    /// A body that is not declared as `application/json`, or that is encoded
    /// (`Content-Encoding` other than identity): what to send instead.
    UnsupportedMediaType(&'static str),
    /// Well-formed but not allowed by the business rules (program not enabled, points limits).
    Rejected(Rejection),
    /// Too many failed attempts; retry after this many seconds.
    TooManyRequests { retry_after: u64 },
    /// The write queue is full; retry after this many seconds.
    Overloaded { retry_after: u64 },
    /// The store cannot serve this request now (write failure, shutting down).
    Unavailable,
    /// The program's partner could not answer a question (validate-member); retry after
    /// this many seconds.
    PartnerUnavailable { retry_after: u64 },
    /// A bug or an unexpected failure; the detail is in the log.
    Internal,
}

/// Untrusted text that is not a valid value: 400, naming the field.
impl From<Invalid> for Error {
    fn from(e: Invalid) -> Error {
        Error::BadRequest(e.to_string())
    }
}

/// A business rule refused the request: 422, except for a configuration the server
/// cannot price with, which is our fault.
impl From<Rejection> for Error {
    fn from(e: Rejection) -> Error {
        match e {
            Rejection::Unpriceable(_) => {
                tracing::error!(reason = %e, "a quote failed");
                Error::Internal
            }
            Rejection::ProgramNotEnabled(_)
            | Rejection::ZeroPoints { .. }
            | Rejection::BelowMinimum { .. }
            | Rejection::AboveMaximum { .. }
            | Rejection::NoProgramConnection { .. }
            | Rejection::NothingToReverse
            | Rejection::ValueExceedsRemaining { .. }
            | Rejection::TooManyReversals { .. } => Error::Rejected(e),
        }
    }
}

/// A storage failure: busy is 503 with `Retry-After`, unavailable 503, damage 500. The
/// store logged the detail where it happened.
impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Busy => Error::Overloaded { retry_after: 1 },
            StoreError::Unavailable => Error::Unavailable,
            StoreError::Corrupt => Error::Internal,
        }
    }
}

impl Error {
    pub fn bad_request(detail: impl Into<String>) -> Error {
        Error::BadRequest(detail.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthenticated(_) | Error::BadCredentials => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) | Error::StateConflict(_) => StatusCode::CONFLICT,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Overloaded { .. } | Error::Unavailable | Error::PartnerUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem type: a stable URN that clients may match on (listed in docs/API.md).
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Error::BadRequest(_) => ("invalid-request", "Invalid request"),
            Error::Unauthenticated(_) => ("unauthenticated", "Authentication required"),
            Error::BadCredentials => ("invalid-credentials", "Invalid client credentials"),
            Error::NotFound(_) => ("not-found", "Not found"),
            Error::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            Error::Conflict(_) => ("idempotency-conflict", "Reference number already used"),
            Error::StateConflict(_) => ("invalid-state", "Not allowed in the current state"),
            Error::RequestTimeout => ("request-timeout", "Request body too slow"),
            Error::PayloadTooLarge(_) => ("payload-too-large", "Request body too large"),
            Error::UnsupportedMediaType(_) => ("unsupported-media-type", "Unsupported media type"),
            Error::Rejected(r) => (r.problem_type(), "Request cannot be processed"),
            Error::TooManyRequests { .. } => ("too-many-requests", "Too many failed attempts"),
            Error::Overloaded { .. } => ("overloaded", "Server busy"),
            Error::Unavailable => ("unavailable", "Service unavailable"),
            Error::PartnerUnavailable { .. } => ("partner-unavailable", "Partner unavailable"),
            Error::Internal => ("internal", "Internal server error"),
        }
    }

    fn detail(&self) -> String {
        match self {
            Error::BadRequest(d) | Error::NotFound(d) | Error::Conflict(d) => d.clone(),
            Error::StateConflict(d) => d.clone(),
            Error::Rejected(r) => r.to_string(),
            Error::Unauthenticated(d) => (*d).to_owned(),
            Error::BadCredentials => "the client id or the client secret is wrong".to_owned(),
            Error::MethodNotAllowed(allow) => format!("this path accepts only: {allow}"),
            Error::PayloadTooLarge(limit) => {
                format!("the request body must be at most {limit} bytes")
            }
            Error::RequestTimeout => "the request body did not arrive in time".to_owned(),
            Error::UnsupportedMediaType(d) => (*d).to_owned(),
            Error::TooManyRequests { retry_after } => {
                format!("too many failed authentication attempts; retry in {retry_after} s")
            }
            Error::Overloaded { retry_after } => {
                format!("too many writes are waiting; retry in {retry_after} s")
            }
            Error::Unavailable => {
                "the service cannot store or read data right now; retry later with the same \
                 referenceNumber (a retry never issues points twice)"
                    .to_owned()
            }
            Error::PartnerUnavailable { retry_after } => format!(
                "the program's partner could not be asked right now; retry in {retry_after} s"
            ),
            Error::Internal => "an internal error occurred; it has been logged".to_owned(),
        }
    }

    /// The problem document (RFC 9457) of this error: the body of its response, and an
    /// item's result in a batch.
    pub fn problem(&self) -> serde_json::Value {
        let (kind, title) = self.kind();
        serde_json::json!({
            "type": format!("urn:cosmopoints:problem:{kind}"),
            "title": title,
            "status": self.status().as_u16(),
            "detail": self.detail(),
        })
    }

    /// The one place where an error becomes an HTTP response.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let (kind, _) = self.kind();
        // The request's access-log line names the problem.
        crate::access::record(|line| line.problem = Some(kind));
        let problem = self.problem();
        let mut response = Response::new(full(Bytes::from(problem.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            // RFC 9110 §15.5.2: every 401 carries a challenge, wrong client credentials too.
            Error::Unauthenticated(_) | Error::BadCredentials => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Error::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            Error::TooManyRequests { retry_after }
            | Error::Overloaded { retry_after }
            | Error::PartnerUnavailable { retry_after } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Error::Unavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Error::BadRequest(_)
            | Error::NotFound(_)
            | Error::Conflict(_)
            | Error::StateConflict(_)
            | Error::PayloadTooLarge(_)
            | Error::RequestTimeout
            | Error::UnsupportedMediaType(_)
            | Error::Rejected(_)
            | Error::Internal => {}
        }
        response
    }
}
