//! The server's metrics, served in the Prometheus text format on the admin listener's
//! `GET /metrics` (see [`crate::admin`]).
//!
//! Families (every name prefixed `cosmopoints_`):
//!
//! | family | type | labels |
//! |---|---|---|
//! | `http_requests_total` | counter | `route`, `status` |
//! | `http_request_duration_seconds` | histogram | `route` |
//! | `store_commits_total` | counter | |
//! | `store_commit_batch_size` | histogram | |
//! | `store_commit_duration_seconds` | histogram (commit with its fsync) | |
//! | `store_write_queue_depth` | gauge | |
//! | `store_listings_running` | gauge | |
//! | `transactions_issued_total` | counter | `program`, `status` |
//! | `points_issued_total` | counter | `program`, `status` |
//! | `reversals_total` | counter | `program`, `status` |
//! | `points_reversed_total` | counter | `program`, `status` |
//! | `outbox_depth` | gauge | |
//! | `outbox_oldest_pending_age_seconds` | gauge | |
//! | `delivery_attempts_total` | counter | `outcome` |
//!
//! Counters count from the process start (Prometheus handles the reset on restart). Gauges
//! that describe the database (outbox, write queue) are read when scraped, so they cost
//! nothing between scrapes.
//!
//! Recording is lock-free for label sets already seen: `prometheus-client` keeps a family's
//! metrics in a map behind a read-write lock that is only write-locked the first time a
//! label set appears (each route and status, each program), then atomics. The request
//! latency histogram is our own [`LatencyHistogram`]: `prometheus-client`'s `Histogram`
//! takes a mutex per observation, which every worker thread answering the same route
//! would contend for on every request. (The writer's commit histograms keep theirs: one
//! thread records them.)
//!
//! Invariant: labels take only values from a closed set — route patterns of the router
//! (never a raw path), status codes, configured program ids, outcome names from code —
//! so that no client can grow the number of series.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssueLabels {
    program: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// The request latency histogram's buckets: 100 µs doubling to ~1.6 s (a read takes
/// microseconds, an issue one fsync, milliseconds), and +Inf.
const LATENCY_BUCKETS: usize = 15;

/// A histogram of request latencies that records with atomics and no lock: the same
/// buckets, type and text as `prometheus-client`'s `Histogram` over
/// `exponential_buckets(0.0001, 2.0, 15)`. Each observation adds one to its bucket and
/// its nanoseconds to the sum. The count is the buckets' total, read when encoded, so it
/// always agrees with them; the sum, read apart, may be off from them by the observations
/// in flight. The sum (a u64 of nanoseconds) wraps after 584 years of latency in all: at
/// 30,000 requests/s of 3 ms each, after 6.5 years, which Prometheus reads as a reset.
#[derive(Debug, Default)]
struct LatencyHistogram {
    /// Observations per bucket (not cumulative): bucket `i < LATENCY_BUCKETS` holds those
    /// of at most `100 µs << i` not in an earlier one; the last, the rest (+Inf).
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = (0..LATENCY_BUCKETS)
            .find(|&i| nanos <= 100_000 << i)
            .unwrap_or(LATENCY_BUCKETS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = exponential_buckets(0.0001, 2.0, LATENCY_BUCKETS as u16)
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every metric of the process; one per [`crate::app::App`], shared by reference.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, LatencyHistogram>,
    commits: Counter,
    batch_size: Histogram,
    commit_time: Histogram,
    write_queue: Gauge,
    listings: Gauge,
    issued: Family<IssueLabels, Counter>,
    points: Family<IssueLabels, Counter>,
    reversals: Family<IssueLabels, Counter>,
    points_reversed: Family<IssueLabels, Counter>,
    outbox_depth: Gauge,
    outbox_oldest_age: Gauge,
    delivery_attempts: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cosmopoints");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests answered, by the router's route pattern and status code",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, LatencyHistogram>::default();
        registry.register(
            "http_request_duration_seconds",
            "Time from routing an API request to its response head (a streamed body's \
             transfer is not included), by route pattern",
            latency.clone(),
        );
        let commits = Counter::default();
        registry.register(
            "store_commits",
            "Durable write transactions the writer committed",
            commits.clone(),
        );
        // 1 to 4096 writes: up to the largest max_batch worth having.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "store_commit_batch_size",
            "Writes applied in one commit (group commit)",
            batch_size.clone(),
        );
        let commit_time = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "store_commit_duration_seconds",
            "Time of one commit, its fsync included",
            commit_time.clone(),
        );
        let write_queue = Gauge::default();
        registry.register(
            "store_write_queue_depth",
            "Writes waiting for the writer when scraped",
            write_queue.clone(),
        );
        let listings = Gauge::default();
        registry.register(
            "store_listings_running",
            "Transaction listings streaming when scraped (each holds a read snapshot)",
            listings.clone(),
        );
        let issued = Family::<IssueLabels, Counter>::default();
        registry.register(
            "transactions_issued",
            "Transactions created, by program and delivery status at creation (pending: \
             to be delivered to a partner; completed: recorded here only)",
            issued.clone(),
        );
        let points = Family::<IssueLabels, Counter>::default();
        registry.register(
            "points_issued",
            "Points of the transactions created, by program and delivery status at creation",
            points.clone(),
        );
        let reversals = Family::<IssueLabels, Counter>::default();
        registry.register(
            "reversals",
            "Reversals created, by program and status at creation (pending: a debit to \
             send to the partner; completed: nothing to send)",
            reversals.clone(),
        );
        let points_reversed = Family::<IssueLabels, Counter>::default();
        registry.register(
            "points_reversed",
            "Points the reversals created took back, by program and status at creation",
            points_reversed.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Deliveries pending in the outbox when scraped",
            outbox_depth.clone(),
        );
        let outbox_oldest_age = Gauge::default();
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "How long the longest-due pending delivery has been due (0 when none is overdue)",
            outbox_oldest_age.clone(),
        );
        let delivery_attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts to partners, by outcome",
            delivery_attempts.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            commits,
            batch_size,
            commit_time,
            write_queue,
            listings,
            issued,
            points,
            reversals,
            points_reversed,
            outbox_depth,
            outbox_oldest_age,
            delivery_attempts,
        }
    }

    /// An API request answered with `status` on the endpoint `route` (the router's
    /// pattern), `elapsed` after it was routed.
    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(elapsed);
    }

    /// A commit of `writes` writes that took `elapsed` (fsync included). Called by the
    /// store's writer thread through the hook [`Metrics::commit_hook`] gives it.
    pub fn commit(&self, writes: usize, elapsed: Duration) {
        self.commits.inc();
        self.batch_size.observe(writes as f64);
        self.commit_time.observe(elapsed.as_secs_f64());
    }

    /// A hook for [`crate::store::Store::on_commit`]: the store does not know this crate.
    pub fn commit_hook(self: &Arc<Self>) -> impl Fn(usize, Duration) + Send + Sync + 'static {
        let metrics = self.clone();
        move |writes, elapsed| metrics.commit(writes, elapsed)
    }

    /// `n` transactions created in `program` with `points` in all; `status` is their
    /// delivery status at creation (`pending` or `completed`).
    pub fn issued(&self, program: &str, status: &'static str, n: u64, points: u64) {
        let labels = IssueLabels {
            program: program.to_owned(),
            status,
        };
        self.issued.get_or_create(&labels).inc_by(n);
        self.points.get_or_create(&labels).inc_by(points);
    }

    /// A reversal created in `program` taking back `points`; `status` as for
    /// [`Metrics::issued`].
    pub fn reversed(&self, program: &str, status: &'static str, points: u64) {
        let labels = IssueLabels {
            program: program.to_owned(),
            status,
        };
        self.reversals.get_or_create(&labels).inc();
        self.points_reversed.get_or_create(&labels).inc_by(points);
    }

    /// One delivery attempt to a partner ended with `outcome`. For the delivery worker:
    /// call it once per attempt with one of a fixed set of names — `delivered`, `retry`
    /// (a transient failure, tried again later), `failed` (given up) — never with text
    /// from a partner's answer, so that the number of series stays bounded.
    pub fn delivery_attempt(&self, outcome: &str) {
        self.delivery_attempts
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The text of every family, with the gauges read at scrape time set first: the
    /// write queue, running listings, the outbox's depth and the age of its oldest due
    /// entry at `now`.
    pub fn encode(&self, scraped: Scraped) -> Result<String, std::fmt::Error> {
        self.write_queue.set(scraped.write_queue as i64);
        self.listings.set(scraped.listings as i64);
        self.outbox_depth.set(scraped.outbox_depth as i64);
        let age = scraped
            .outbox_oldest_due
            .map_or(0, |due| scraped.now.saturating_sub(due));
        self.outbox_oldest_age.set(age as i64);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// What the admin listener reads from the store when it is scraped.
pub struct Scraped {
    pub now: u64,
    pub write_queue: usize,
    pub listings: usize,
    pub outbox_depth: u64,
    /// When the longest-waiting pending delivery was (or will be) due.
    pub outbox_oldest_due: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of one histogram registered as `latency` (sum line apart).
    fn text_of(metric: impl prometheus_client::registry::Metric) -> (Vec<String>, f64) {
        let mut registry = Registry::default();
        registry.register("latency", "help", metric);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encodes");
        let sum_line = text
            .lines()
            .find(|line| line.starts_with("latency_sum "))
            .expect("a sum");
        let sum = sum_line["latency_sum ".len()..].parse().expect("a number");
        let rest = text
            .lines()
            .filter(|line| !line.starts_with("latency_sum "))
            .map(str::to_owned)
            .collect();
        (rest, sum)
    }

    #[test]
    fn the_latency_histogram_reads_as_prometheus_clients_own() {
        // Values in every bucket, 0, every bound itself (a bound is in its own bucket),
        // and above them all.
        let mut micros = vec![
            0, 1, 99, 101, 150, 250, 399, 900, 1_700, 3_000, 6_500, 12_000, 30_000, 60_000,
            200_000, 500_000, 1_000_000, 1_600_000, 1_700_000, 90_000_000,
        ];
        micros.extend((0..15).map(|i| 100u64 << i));
        let ours = LatencyHistogram::default();
        let theirs = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        for &us in &micros {
            for _ in 0..us % 3 + 1 {
                ours.observe(Duration::from_micros(us));
                theirs.observe(Duration::from_micros(us).as_secs_f64());
            }
        }
        let (our_text, our_sum) = text_of(ours);
        let (their_text, their_sum) = text_of(theirs);
        assert_eq!(our_text, their_text);
        assert!(
            (our_sum - their_sum).abs() < 1e-9,
            "{our_sum} against {their_sum}"
        );
        assert!(our_text
            .iter()
            .any(|l| l == "latency_bucket{le=\"0.0001\"} 6"));
    }

    #[test]
    fn the_latency_histogram_loses_no_observation_between_threads() {
        let histogram = Arc::new(LatencyHistogram::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let histogram = histogram.clone();
                std::thread::spawn(move || {
                    for n in 0..50_000u64 {
                        histogram.observe(Duration::from_micros((n * (t + 1)) % 5_000));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("joins");
        }
        let total: u64 = histogram
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        assert_eq!(total, 200_000);
        let expected_nanos: u64 = (0..4u64)
            .map(|t| {
                (0..50_000u64)
                    .map(|n| (n * (t + 1)) % 5_000 * 1_000)
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(histogram.sum_nanos.load(Ordering::Relaxed), expected_nanos);
    }

    #[test]
    fn every_family_is_in_the_text_with_its_labels() {
        let metrics = Metrics::new();
        metrics.request("/v1/profile", 200, Duration::from_millis(3));
        metrics.commit(5, Duration::from_millis(2));
        metrics.issued("skywards", "completed", 1, 833);
        metrics.reversed("skywards", "pending", 227);
        metrics.delivery_attempt("delivered");
        let text = metrics
            .encode(Scraped {
                now: 100,
                write_queue: 2,
                listings: 1,
                outbox_depth: 3,
                outbox_oldest_due: Some(40),
            })
            .expect("encodes");
        for line in [
            "cosmopoints_http_requests_total{route=\"/v1/profile\",status=\"200\"} 1",
            "cosmopoints_http_request_duration_seconds_count{route=\"/v1/profile\"} 1",
            "cosmopoints_store_commits_total 1",
            "cosmopoints_store_commit_batch_size_sum 5.0",
            "cosmopoints_store_commit_duration_seconds_count 1",
            "cosmopoints_store_write_queue_depth 2",
            "cosmopoints_store_listings_running 1",
            "cosmopoints_transactions_issued_total{program=\"skywards\",status=\"completed\"} 1",
            "cosmopoints_points_issued_total{program=\"skywards\",status=\"completed\"} 833",
            "cosmopoints_reversals_total{program=\"skywards\",status=\"pending\"} 1",
            "cosmopoints_points_reversed_total{program=\"skywards\",status=\"pending\"} 227",
            "cosmopoints_outbox_depth 3",
            "cosmopoints_outbox_oldest_pending_age_seconds 60",
            "cosmopoints_delivery_attempts_total{outcome=\"delivered\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in:\n{text}"
            );
        }
    }
}
