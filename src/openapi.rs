//! The OpenAPI 3.1 document, kept in the repository as `docs/openapi.json` and served as is.

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;

use crate::api::Reply;
use crate::body;

/// The document, compiled into the binary.
pub const DOCUMENT: &str = include_str!("../docs/openapi.json");

pub fn document() -> Reply {
    let mut response = Response::new(body::full(DOCUMENT));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
