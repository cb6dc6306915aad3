//! Prometheus metrics (`GET /metrics`), with the `prometheus-client` crate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub method: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub sandboxes: Family<StateLabel, Gauge>,
    pub fork_seconds: Histogram,
    pub exec_total: Counter,
    pub exec_seconds: Histogram,
    pub host_memory_used: Gauge,
    pub http_requests: Family<HttpLabel, Counter>,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ]
    .into_iter()
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("forkd");
        let sandboxes = Family::<StateLabel, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        let fork_seconds = Histogram::new(buckets());
        registry.register(
            "fork_seconds",
            "Seconds from launch until a child answered, per child",
            fork_seconds.clone(),
        );
        let exec_total = Counter::default();
        registry.register("exec", "Commands run", exec_total.clone());
        let exec_seconds = Histogram::new(buckets());
        registry.register(
            "exec_seconds",
            "Seconds a command ran",
            exec_seconds.clone(),
        );
        let host_memory_used = Gauge::default();
        registry.register(
            "host_memory_used_bytes",
            "Host memory in use (MemTotal - MemAvailable)",
            host_memory_used.clone(),
        );
        let http_requests = Family::<HttpLabel, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method and status",
            http_requests.clone(),
        );
        Metrics {
            registry,
            sandboxes,
            fork_seconds,
            exec_total,
            exec_seconds,
            host_memory_used,
            http_requests,
        }
    }

    /// The text exposition, after refreshing the gauges that are read at scrape time.
    pub fn render(&self, running: usize, paused: usize) -> String {
        let set = |s: &str, v: usize| {
            self.sandboxes
                .get_or_create(&StateLabel { state: s.into() })
                .set(v as i64);
        };
        set("running", running);
        set("paused", paused);
        self.host_memory_used
            .set(host_memory_used().unwrap_or(0) as i64);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// MemTotal - MemAvailable, in bytes.
fn host_memory_used() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?) * 1024)
}
