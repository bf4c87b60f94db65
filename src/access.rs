//! The access log's line: what the router, authentication, the handlers and the error
//! mapper learn about a request, gathered while it runs and written once, as one `done`
//! line, when it is answered.
//!
//! The fields are kept in a task-local [`Line`] rather than recorded into a tracing span:
//! a span with ten fields, each `record` re-formatting into the span's text, was a large
//! share of a GET's CPU. The request's id is kept there too, and [`WithRequestId`] adds it
//! to any other line the request logs, as a `request{id=…}` span would show it (a real
//! span cost ~5% of a GET's CPU, for lines that few requests write). When the access log
//! is off (its level is disabled) nothing is gathered at all, and no line carries an id.
//!
//! The `done` line itself is formatted here, by hand, into the same text the log's
//! formatter gives it without colours (the same fields, escapes and order, in both
//! formats; it is never coloured, even at a terminal), and
//! handed to the log's writer thread: formatting it through `tracing`'s event machinery
//! (field visitors, `core::fmt`, the timestamp) was a fifth of a GET's CPU. The level
//! filter still decides whether it is written.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;
use crate::log_queue::LogQueue;

tokio::task_local! {
    static LINE: RefCell<Scope>;
}

/// What a request keeps while it runs: its id, and its line.
#[derive(Default)]
struct Scope {
    id: String,
    line: Line,
}

/// What the access log says of a request beside its id, method, path, status and latency.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Line {
    pub remote: Option<SocketAddr>,
    /// The endpoint as the router's table writes it (ids and references stay in `path`).
    pub route: Option<Cow<'static, str>>,
    pub business: Option<std::sync::Arc<str>>,
    pub client: Option<std::sync::Arc<str>>,
    /// The transaction an issue or a reversal answered with.
    pub transaction: Option<String>,
    /// The problem type of an error answer.
    pub problem: Option<&'static str>,
}

impl Line {
    /// The text fields after `remote`, in the line's order, each with whether the human
    /// format quotes it (as tracing recorded a `&str`: Debug) or writes it as it is.
    fn optional_fields(&self) -> [(&'static str, Option<&str>, bool); 5] {
        [
            ("route", self.route.as_deref(), false),
            ("business", self.business.as_deref(), true),
            ("client", self.client.as_deref(), true),
            ("transaction", self.transaction.as_deref(), false),
            ("problem", self.problem, false),
        ]
    }
}

/// Changes the running request's line; does nothing outside a request or when the access
/// log is off.
pub fn record(change: impl FnOnce(&mut Line)) {
    let _ = LINE.try_with(|scope| change(&mut scope.borrow_mut().line));
}

/// Runs `request` with its id, gathering its line (when `gather`); returns its output,
/// the line and the id.
pub async fn gather<T>(
    gather: bool,
    id: String,
    request: impl std::future::Future<Output = T>,
) -> (T, Line, String) {
    if !gather {
        return (request.await, Line::default(), id);
    }
    let scope = Scope {
        id,
        line: Line::default(),
    };
    LINE.scope(RefCell::new(scope), async move {
        let output = request.await;
        let Scope { id, line } = LINE.with(|scope| std::mem::take(&mut *scope.borrow_mut()));
        (output, line, id)
    })
    .await
}

/// The log's event formatter: `inner`'s line, with the running request's id added as
/// a `request{id=…}` span would add it (in plain text, even where `inner` writes colours),
/// when a request (whose line is being gathered) is running on this thread. Lines outside
/// requests are `inner`'s as they are. It assumes what `init_tracing` sets up: the level
/// is written, and no other span is ever entered while a request runs.
pub struct WithRequestId<F> {
    inner: F,
    format: LogFormat,
}

impl<F> WithRequestId<F> {
    pub fn new(format: LogFormat, inner: F) -> WithRequestId<F> {
        WithRequestId { inner, format }
    }
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithRequestId<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let id = LINE
            .try_with(|scope| scope.try_borrow().ok().map(|s| s.id.clone()))
            .ok()
            .flatten();
        let Some(id) = id else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut text = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut text),
            event,
        )?;
        writer.write_str(&with_request_id(
            self.format,
            &text,
            event.metadata().level(),
            &id,
        ))
    }
}

/// `line` (the formatter's, newline included) with request `id` in it: in the human
/// format after the level (`… INFO request{id=…}: target: …`), in JSON as the
/// `span` and `spans` keys that tracing writes for a span named `request`.
fn with_request_id(format: LogFormat, line: &str, level: &tracing::Level, id: &str) -> String {
    let mut out = String::with_capacity(line.len() + 2 * id.len() + 64);
    match format {
        LogFormat::Human => {
            // The timestamp (digits, `-`, `:`, `.`, `T`, `Z`) cannot hold a level's
            // name; the level may be wrapped in colour codes, which hold no space.
            let level = level.as_str();
            let at = line
                .find(level)
                .and_then(|i| line[i..].find(' ').map(|j| i + j + 1));
            match at {
                Some(at) => {
                    out.push_str(&line[..at]);
                    out.push_str("request{id=");
                    out.push_str(id);
                    out.push_str("}: ");
                    out.push_str(&line[at..]);
                }
                None => out.push_str(line),
            }
        }
        LogFormat::Json => match line.trim_end_matches('\n').strip_suffix('}') {
            Some(open) => {
                // Writing a &str as JSON cannot fail.
                let id = serde_json::to_string(id).unwrap_or_default();
                out.push_str(open);
                for (key, close) in [(",\"span\":", ""), (",\"spans\":[", "]")] {
                    out.push_str(key);
                    out.push_str("{\"id\":");
                    out.push_str(&id);
                    out.push_str(",\"name\":\"request\"}");
                    out.push_str(close);
                }
                out.push_str("}\n");
            }
            None => out.push_str(line),
        },
    }
    out
}

/// Where `done` lines go: the log's own writer (its thread and queue) and format.
/// Installed once, by the binary's log set-up; a server run without it (in-process, as
/// the tests run it) writes no access log.
struct Sink {
    format: LogFormat,
    out: LogQueue,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends `done` lines to `out`, in `format`. Only the first call counts.
pub fn install(format: LogFormat, out: LogQueue) {
    let _ = SINK.set(Sink { format, out });
}

/// Whether a `done` line would be written: a sink is installed and the log's filter lets
/// `info` of this module through.
pub fn enabled() -> bool {
    SINK.get().is_some() && tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// The module the line is logged as, as the log's formatter would name it.
const TARGET: &str = "cosmopoints::server";

/// A request's closing line.
pub struct Done<'a> {
    pub at: SystemTime,
    pub id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub line: &'a Line,
    pub status: u16,
    pub latency_us: u64,
}

/// Writes `done` to the installed sink (nothing when there is none).
pub fn write(done: &Done<'_>) {
    let Some(sink) = SINK.get() else { return };
    // The line is formatted in this thread's buffer, outside the queue's lock, and then
    // copied into the queue.
    TEXT.with_borrow_mut(|text| {
        text.clear();
        write_line(text, sink.format, done);
        sink.out.push(text);
    });
}

thread_local! {
    static TEXT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `done` as one line of the log, newline included, appended to `out`.
fn write_line(out: &mut Vec<u8>, format: LogFormat, done: &Done<'_>) {
    let l = done.line;
    match format {
        LogFormat::Human => {
            timestamp(out, done.at);
            out.extend_from_slice(b"  INFO ");
            out.extend_from_slice(TARGET.as_bytes());
            out.extend_from_slice(b": done id=");
            out.extend_from_slice(done.id.as_bytes());
            out.extend_from_slice(b" method=");
            out.extend_from_slice(done.method.as_bytes());
            out.extend_from_slice(b" path=");
            debug_str(out, done.path);
            if let Some(remote) = l.remote {
                out.extend_from_slice(b" remote=");
                socket_address(out, remote);
            }
            for (name, value, quoted) in l.optional_fields() {
                if let Some(value) = value {
                    out.push(b' ');
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    if quoted {
                        debug_str(out, value);
                    } else {
                        out.extend_from_slice(value.as_bytes());
                    }
                }
            }
            out.extend_from_slice(b" status=");
            digits(out, u64::from(done.status), 1);
            out.extend_from_slice(b" latency_us=");
            digits(out, done.latency_us, 1);
        }
        LogFormat::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(out, done.at);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"done\"");
            json_field(out, "id", done.id);
            json_field(out, "method", done.method);
            // The path as the human format shows it (Debug-quoted), then JSON-escaped.
            let mut path = Vec::with_capacity(done.path.len() + 2);
            debug_str(&mut path, done.path);
            json_field(out, "path", &String::from_utf8_lossy(&path));
            if let Some(remote) = l.remote {
                // Digits, dots, colons, brackets and a `%`: nothing JSON escapes.
                out.extend_from_slice(b",\"remote\":\"");
                socket_address(out, remote);
                out.push(b'"');
            }
            for (name, value, _) in l.optional_fields() {
                if let Some(value) = value {
                    json_field(out, name, value);
                }
            }
            out.extend_from_slice(b",\"status\":");
            digits(out, u64::from(done.status), 1);
            out.extend_from_slice(b",\"latency_us\":");
            digits(out, done.latency_us, 1);
            out.extend_from_slice(b",\"target\":\"");
            out.extend_from_slice(TARGET.as_bytes());
            out.extend_from_slice(b"\"}");
        }
    }
    out.push(b'\n');
}

/// `,"name":"value"` with `value` JSON-escaped.
fn json_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    // Writing into a Vec cannot fail, and a &str always serializes.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// `value` as `{:?}` writes it: quoted, with quotes, backslashes and anything not
/// printable escaped. Visible ASCII, the common case, is copied as it is.
fn debug_str(out: &mut Vec<u8>, value: &str) {
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// `at` as RFC 3339 in UTC with microseconds, as the log's formatter writes it:
/// `2026-11-29T01:52:32.331578Z` (the date and time from [`crate::clock`]).
fn timestamp(out: &mut Vec<u8>, at: SystemTime) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut buf = [0u8; 20];
    match crate::clock::write_rfc3339(since.as_secs(), &mut buf) {
        // Without its `Z`, which comes after the microseconds.
        Some(text) => out.extend_from_slice(&text.as_bytes()[..19]),
        None => out.extend_from_slice(b"9999-12-31T23:59:59"),
    }
    out.push(b'.');
    digits(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// `addr` as its `Display` writes it; an IPv4 one (the usual case) without `core::fmt`
/// (which was a third of the line's formatting).
fn socket_address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                digits(out, u64::from(octet), 1);
            }
            out.push(b':');
            digits(out, u64::from(v4.port()), 1);
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// `n` in decimal, zero-padded to `width` digits (wider when it needs more).
fn digits(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = at.min(buf.len() - width.min(buf.len()));
    out.extend_from_slice(&buf[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_gathers_what_it_records_and_nothing_leaks_outside() {
        let (answer, line, id) = gather(true, "r-1".into(), async {
            record(|l| l.business = Some("acme".into()));
            record(|l| l.problem = Some("not-found"));
            7
        })
        .await;
        assert_eq!((answer, id.as_str()), (7, "r-1"));
        assert_eq!(line.business.as_deref(), Some("acme"));
        assert_eq!(line.problem, Some("not-found"));
        // Outside a request, and with gathering off, recording is a no-op.
        record(|l| l.business = Some("nobody".into()));
        let (_, line, id) = gather(false, "r-2".into(), async {
            record(|l| l.client = Some("x".into()))
        })
        .await;
        assert_eq!((line, id.as_str()), (Line::default(), "r-2"));
    }

    /// What `log` writes through a subscriber set up as the binary's (without the time),
    /// with [`WithRequestId`] when `ours`.
    fn logged(format: LogFormat, ours: bool, log: impl FnOnce()) -> String {
        use tracing_subscriber::fmt::format as lines;
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time();
        match (format, ours) {
            (LogFormat::Human, false) => tracing::subscriber::with_default(builder.finish(), log),
            (LogFormat::Human, true) => tracing::subscriber::with_default(
                builder
                    .event_format(WithRequestId::new(format, lines().without_time()))
                    .finish(),
                log,
            ),
            (LogFormat::Json, false) => tracing::subscriber::with_default(
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .finish(),
                log,
            ),
            (LogFormat::Json, true) => tracing::subscriber::with_default(
                builder
                    .json()
                    .event_format(WithRequestId::new(
                        format,
                        lines()
                            .json()
                            .flatten_event(true)
                            .with_current_span(true)
                            .without_time(),
                    ))
                    .finish(),
                log,
            ),
        }
        let text = buffer.0.lock().expect("buffer").clone();
        String::from_utf8(text).expect("UTF-8")
    }

    #[tokio::test]
    async fn a_request_names_its_id_in_its_other_lines_as_a_request_span_did() {
        // An id as a client may send it: visible ASCII, quotes and braces included.
        let id = "abc\"d}e{\\";
        let warn = || tracing::warn!(client_id = ?"acme\npos", "failed authentication");
        for format in [LogFormat::Human, LogFormat::Json] {
            let theirs = logged(format, false, || {
                let span = tracing::info_span!("request", id = %id);
                let _entered = span.enter();
                warn();
            });
            let (ours, _, _) =
                gather(true, id.to_owned(), async { logged(format, true, warn) }).await;
            match format {
                LogFormat::Human => {
                    assert!(ours.contains("WARN request{id=abc\"d}e{\\}: "), "{ours}");
                    assert_eq!(ours, theirs);
                }
                LogFormat::Json => {
                    let ours: serde_json::Value = serde_json::from_str(&ours).expect("JSON");
                    let theirs: serde_json::Value = serde_json::from_str(&theirs).expect("JSON");
                    assert_eq!(ours["span"]["id"], id);
                    assert_eq!(ours, theirs);
                }
            }
            // Outside a request (or with the access log off), the line has no id.
            let outside = logged(format, true, warn);
            assert_eq!(outside, logged(format, false, warn));
            assert!(!outside.contains("request"), "{outside}");
            let (off, _, _) =
                gather(false, id.to_owned(), async { logged(format, true, warn) }).await;
            assert_eq!(off, outside);
        }
    }

    /// The human format with colours, as at a terminal: `log` through the binary's set-up
    /// (with the time when `time`), with [`WithRequestId`] when `ours`.
    fn logged_in_colour(ours: bool, time: bool, log: impl FnOnce()) -> String {
        use tracing_subscriber::fmt::format as lines;
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(true);
        match (ours, time) {
            (false, false) => {
                tracing::subscriber::with_default(builder.without_time().finish(), log)
            }
            (false, true) => tracing::subscriber::with_default(builder.finish(), log),
            (true, false) => tracing::subscriber::with_default(
                builder
                    .without_time()
                    .event_format(WithRequestId::new(
                        LogFormat::Human,
                        lines().with_ansi(true).without_time(),
                    ))
                    .finish(),
                log,
            ),
            (true, true) => tracing::subscriber::with_default(
                builder
                    .event_format(WithRequestId::new(
                        LogFormat::Human,
                        lines().with_ansi(true),
                    ))
                    .finish(),
                log,
            ),
        }
        let text = buffer.0.lock().expect("buffer").clone();
        String::from_utf8(text).expect("UTF-8")
    }

    /// `text` without its colour codes (`ESC [ … m`).
    fn without_colours(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('\u{1b}') {
            out.push_str(&rest[..at]);
            let end = rest[at..].find('m').expect("a colour code ends with m");
            rest = &rest[at + end + 1..];
        }
        out.push_str(rest);
        out
    }

    #[tokio::test]
    async fn at_a_terminal_the_id_follows_the_coloured_level_as_a_span_did() {
        let id = "r-42";
        let warn = || tracing::warn!(client_id = ?"acme", "failed authentication");
        let theirs = logged_in_colour(false, false, || {
            let span = tracing::info_span!("request", id = %id);
            let _entered = span.enter();
            warn();
        });
        let (ours, _, _) = gather(true, id.to_owned(), async {
            logged_in_colour(true, false, warn)
        })
        .await;
        // Coloured (the level and the target), and the same text as a span gave, except
        // that a span's name was bold.
        assert!(
            ours.contains("WARN\u{1b}[0m request{id=r-42}: "),
            "{ours:?}"
        );
        assert_ne!(without_colours(&ours), ours);
        assert_eq!(without_colours(&ours), without_colours(&theirs));
        // With the (dimmed) time in front: still right after the level.
        let (timed, _, _) = gather(true, id.to_owned(), async {
            logged_in_colour(true, true, warn)
        })
        .await;
        let plain = without_colours(&timed);
        let (time, rest) = plain.split_once(' ').expect("a time first");
        assert!(time.ends_with('Z') && time.starts_with("20"), "{plain:?}");
        assert!(
            rest.trim_start().starts_with("WARN request{id=r-42}: "),
            "{plain:?}"
        );
        let untimed = logged_in_colour(false, true, || {
            let span = tracing::info_span!("request", id = %id);
            let _entered = span.enter();
            warn();
        });
        let untimed = without_colours(&untimed);
        assert_eq!(
            plain.split_once(' ').map(|(_, rest)| rest),
            untimed.split_once(' ').map(|(_, rest)| rest)
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut out = Vec::new();
            timestamp(
                &mut out,
                UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000),
            );
            String::from_utf8(out).expect("ASCII")
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_915_952, 331_578), "2026-11-29T01:32:32.331578Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        assert_eq!(at(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z");
        assert_eq!(at(253_402_300_800, 5), "9999-12-31T23:59:59.000005Z");
        let mut out = Vec::new();
        digits(&mut out, 1234567, 2);
        digits(&mut out, 7, 3);
        assert_eq!(out, b"1234567007");
    }

    /// `done` as [`write`] hands it to the log's queue.
    fn format(format: LogFormat, done: &Done<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        write_line(&mut out, format, done);
        out
    }

    /// A log writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line as `tracing`'s own formatter wrote it (the way release 0.1 logged it),
    /// without the timestamp.
    fn through_tracing(format: LogFormat, done: &Done<'_>) -> String {
        let l = done.line;
        let log = || {
            tracing::info!(
                target: TARGET,
                id = %done.id,
                method = %done.method,
                path = ?done.path,
                remote = l.remote.map(tracing::field::display),
                route = l.route.as_deref().map(tracing::field::display),
                business = l.business.as_deref(),
                client = l.client.as_deref(),
                transaction = l.transaction.as_deref().map(tracing::field::display),
                problem = l.problem.map(tracing::field::display),
                status = done.status,
                latency_us = done.latency_us,
                "done"
            )
        };
        logged(format, false, log)
    }

    #[test]
    fn the_done_line_is_the_text_the_log_formatter_gives_in_both_formats() {
        let full = Line {
            remote: Some("127.0.0.1:38612".parse().expect("address")),
            route: Some("/v1/transactions/{transactionId}".into()),
            business: Some("acme".into()),
            client: Some("acme \"pos\"\n".into()),
            transaction: Some("tx_1a2b".into()),
            problem: Some("not-found"),
        };
        let addresses = ["0.0.0.0:0", "255.255.255.255:65535", "[fe80::1%2]:8080"];
        let others = addresses.map(|a| Line {
            remote: Some(a.parse().expect("address")),
            ..full.clone()
        });
        let mut lines = vec![full, Line::default()];
        lines.extend(others);
        let paths = [
            "/v1/transactions/fill-0-1",
            "/v1/a%22b\\c",
            "/v1/caf\u{e9}\u{7f}",
        ];
        for line in &lines {
            for path in paths {
                let done = Done {
                    at: UNIX_EPOCH + std::time::Duration::from_micros(1_795_915_952_331_578),
                    id: "abc\"def",
                    method: "GET",
                    path,
                    line,
                    status: 404,
                    latency_us: 150,
                };
                let human = String::from_utf8(format(LogFormat::Human, &done)).expect("UTF-8");
                let (time, rest) = human.split_at(27);
                assert_eq!(time, "2026-11-29T01:32:32.331578Z");
                assert_eq!(
                    rest.trim_start(),
                    through_tracing(LogFormat::Human, &done).trim_start()
                );
                let json = String::from_utf8(format(LogFormat::Json, &done)).expect("UTF-8");
                assert!(json.ends_with("}\n") && json.matches('\n').count() == 1);
                let mut ours: serde_json::Value = serde_json::from_str(&json).expect("JSON");
                let theirs: serde_json::Value =
                    serde_json::from_str(&through_tracing(LogFormat::Json, &done)).expect("JSON");
                assert_eq!(ours["timestamp"], "2026-11-29T01:32:32.331578Z");
                ours.as_object_mut().expect("object").remove("timestamp");
                assert_eq!(ours, theirs, "{json}");
            }
        }
    }
}
