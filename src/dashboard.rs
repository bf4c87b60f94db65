//! The dashboard: one page for a merchant's staff (`GET /`) and its script and style
//! sheet, compiled into the binary and served as they are.
//!
//! The page is a client of the public API like any other: it signs in through
//! `/v1/auth`, keeps the token in memory, and reads and writes through the bearer-token
//! endpoints. So these files are public and static, need no authentication, and this
//! module knows nothing of the store or the API's handlers.
//!
//! Every file is sent with the same strict headers ([`SECURITY_HEADERS`]): a Content
//! Security Policy that allows scripts, styles, images and requests from this origin only
//! (no inline script or style, no framing, no form posts, no `<base>`), `nosniff`, and no
//! `Referer`. The page's script builds every element with DOM calls and sets API values
//! only as text, so a description such as `<img src=x onerror=…>` shows as text; the CSP
//! is the second line of defence.

use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::Response;

use crate::api::Reply;
use crate::body;

/// The page, served at `/`.
pub const PAGE: &str = include_str!("dashboard/index.html");
/// The page's script, served at `/dashboard/app.js`.
pub const SCRIPT: &str = include_str!("dashboard/app.js");
/// The page's style sheet, served at `/dashboard/app.css`.
pub const STYLE: &str = include_str!("dashboard/app.css");

/// The Content Security Policy of the page and its assets.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The headers every dashboard file carries, besides its content type.
pub const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    // Revalidate on every load, so that a new binary's page is used at once; the files
    // are small and served from memory.
    ("cache-control", "no-cache"),
];

/// `GET /`.
pub fn page() -> Reply {
    Ok(file(PAGE, "text/html; charset=utf-8"))
}

/// `GET /dashboard/app.js`.
pub fn script() -> Reply {
    Ok(file(SCRIPT, "text/javascript; charset=utf-8"))
}

/// `GET /dashboard/app.css`.
pub fn style() -> Reply {
    Ok(file(STYLE, "text/css; charset=utf-8"))
}

fn file(contents: &'static str, content_type: &'static str) -> Response<body::Body> {
    let mut response = Response::new(body::full(contents));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}
