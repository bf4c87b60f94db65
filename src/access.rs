//! The access log's line: what the router, authentication, the handlers and the error
//! mapper learn about a request, gathered while it runs and written once, as one `done`
//! event, when it is answered.
//!
//! The fields are kept in a task-local [`Line`] rather than recorded into a tracing span:
//! a span with ten fields, each `record` re-formatting into the span's text, was a large
//! share of a GET's CPU. Requests still run inside a small `request{id=…}` span, so that
//! any other line a request logs carries its id. When the access log is off (its level
//! is disabled) nothing is gathered at all.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::SocketAddr;

tokio::task_local! {
    static LINE: RefCell<Line>;
}

/// What the access log says of a request beside its id, method, path, status and latency.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Line {
    pub remote: Option<SocketAddr>,
    /// The endpoint as the router's table writes it (ids and references stay in `path`).
    pub route: Option<Cow<'static, str>>,
    pub business: Option<String>,
    pub client: Option<String>,
    /// The transaction an issue or a reversal answered with.
    pub transaction: Option<String>,
    /// The problem type of an error answer.
    pub problem: Option<&'static str>,
}

/// Changes the running request's line; does nothing outside a request or when the access
/// log is off.
pub fn record(change: impl FnOnce(&mut Line)) {
    let _ = LINE.try_with(|line| change(&mut line.borrow_mut()));
}

/// Runs `request` gathering its line (when `gather`), and returns its output and the line.
pub async fn gather<T>(gather: bool, request: impl std::future::Future<Output = T>) -> (T, Line) {
    if !gather {
        return (request.await, Line::default());
    }
    LINE.scope(RefCell::new(Line::default()), async move {
        let output = request.await;
        let line = LINE.with(|line| std::mem::take(&mut *line.borrow_mut()));
        (output, line)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_gathers_what_it_records_and_nothing_leaks_outside() {
        let (answer, line) = gather(true, async {
            record(|l| l.business = Some("acme".into()));
            record(|l| l.problem = Some("not-found"));
            7
        })
        .await;
        assert_eq!(answer, 7);
        assert_eq!(line.business.as_deref(), Some("acme"));
        assert_eq!(line.problem, Some("not-found"));
        // Outside a request, and with gathering off, recording is a no-op.
        record(|l| l.business = Some("nobody".into()));
        let (_, line) = gather(false, async { record(|l| l.client = Some("x".into())) }).await;
        assert_eq!(line, Line::default());
    }
}
