//! The response body type: either a whole buffer or a stream of chunks fed by a channel
//! (the transaction listing, which must never sit whole in memory).
//!
//! A streamed body can fail half-way (the store fails mid-scan). It then ends with an
//! error, which makes hyper abort the chunked response: the client sees a broken
//! transfer, never a silently truncated but well-formed JSON array.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use tokio::sync::mpsc;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body that starts with `first` and goes on with the chunks that arrive on `rx`. It
/// ends well only if the producer set `complete` before dropping its sender; a channel
/// that closes otherwise (the producer gave up) ends the body with an error.
pub fn channel(
    first: Option<Bytes>,
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    complete: Arc<AtomicBool>,
) -> Body {
    ChannelBody {
        first,
        rx,
        complete,
    }
    .boxed()
}

struct ChannelBody {
    first: Option<Bytes>,
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    complete: Arc<AtomicBool>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        self.rx.poll_recv(cx).map(|chunk| match chunk {
            Some(result) => Some(result.map(Frame::data)),
            None if self.complete.load(Ordering::Acquire) => None,
            None => Some(Err(std::io::Error::other("the stream was cut short"))),
        })
    }
}
