//! The agent's Prometheus metrics (SEMANTICS A2, A3) and the metrics HTTP
//! server (`127.0.0.1:10249` by default, like kube-proxy's
//! `--metrics-bind-address`).
//!
//! [`Metrics`] holds every value behind one mutex: it is written a few times
//! per sync and read once per scrape, so contention does not matter, and one
//! lock gives each scrape a consistent view. [`Metrics::render`] writes the
//! Prometheus text exposition format 0.0.4 with a small hand-written encoder
//! (no metrics crate).
//!
//! Names, help texts and histogram buckets of the `kubeproxy_*` metrics are
//! kube-proxy's (pkg/proxy/metrics), so existing dashboards and alerts keep
//! working. kube-proxy registers them through k8s.io/component-base, which
//! prefixes the help text with the stability level (`[ALPHA] `); that prefix
//! is reproduced. The `lb_*` metrics are lb's own.
//!
//! The HTTP side ([`serve_metrics`], [`metrics_response`]) answers like
//! kube-proxy's metrics server: `/metrics`, `/proxyMode` (the mode name,
//! `ebpf`) and the generic `/healthz` (`ok`) that kube-proxy also installs on
//! that server; any other path is 404.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use lb_common::{StatReason, STAT_COUNT};

use super::health::{plain_response, serve_http, NOT_FOUND_BODY};

/// What `/proxyMode` prints and `lb_agent_info{mode}` carries.
pub const PROXY_MODE: &str = "ebpf";

/// kube-proxy's default metrics port (A2).
pub const DEFAULT_METRICS_PORT: u16 = 10249;

/// Content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// kube-proxy's `SyncProxyRulesLatency` buckets: `ExponentialBuckets(0.001, 2, 15)`
/// (1 ms .. 16.384 s).
pub fn sync_proxy_rules_buckets() -> Vec<f64> {
    // Same computation as Go's ExponentialBuckets (repeated multiplication).
    let mut out = Vec::with_capacity(15);
    let mut b = 0.001_f64;
    for _ in 0..15 {
        out.push(b);
        b *= 2.0;
    }
    out
}

/// kube-proxy's `NetworkProgrammingLatency` buckets:
/// `merge(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59),
/// LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7))`
/// (0.25 s, 0.5 s, 1..59 s, 60..115 s, 120..300 s; 80 buckets).
pub fn network_programming_buckets() -> Vec<f64> {
    let linear =
        |start: f64, width: f64, count: usize| (0..count).map(move |i| start + width * i as f64);
    linear(0.25, 0.25, 2)
        .chain(linear(1.0, 1.0, 59))
        .chain(linear(60.0, 5.0, 12))
        .chain(linear(120.0, 30.0, 7))
        .collect()
}

/// A Prometheus histogram (upper bounds inclusive, like client_golang).
#[derive(Clone, Debug)]
struct Histogram {
    bounds: Vec<f64>,
    /// Per bucket, not cumulative; one more than `bounds` (the +Inf bucket).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len();
        Self {
            bounds,
            counts: vec![0; n + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        // First bucket whose upper bound is >= v (le is inclusive).
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

struct Inner {
    sync_duration: Histogram,
    network_programming: Histogram,
    last_sync_timestamp: f64,
    last_queued_timestamp: f64,
    service_changes: u64,
    endpoint_changes: u64,
    map_entries: BTreeMap<String, u64>,
    map_capacity: BTreeMap<String, u64>,
    conntrack_entries: u64,
    datapath: [u64; STAT_COUNT as usize],
    rejected: BTreeMap<String, u64>,
    apiserver_connected: bool,
    info_version: String,
    info_mode: String,
    attached: BTreeMap<String, u64>,
    service_packets: BTreeMap<String, u64>,
}

/// The agent's metrics. Cheap to update from any thread.
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// All counters at zero; `lb_agent_info{version=<crate version>, mode="ebpf"}`.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                sync_duration: Histogram::new(sync_proxy_rules_buckets()),
                network_programming: Histogram::new(network_programming_buckets()),
                last_sync_timestamp: 0.0,
                last_queued_timestamp: 0.0,
                service_changes: 0,
                endpoint_changes: 0,
                map_entries: BTreeMap::new(),
                map_capacity: BTreeMap::new(),
                conntrack_entries: 0,
                datapath: [0; STAT_COUNT as usize],
                rejected: BTreeMap::new(),
                apiserver_connected: false,
                info_version: env!("CARGO_PKG_VERSION").to_string(),
                info_mode: PROXY_MODE.to_string(),
                attached: BTreeMap::new(),
                service_packets: BTreeMap::new(),
            }),
        })
    }

    /// Never panics: a panic while holding the lock leaves plain numbers
    /// behind, which are still fine to read and write.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sync of the datapath finished successfully after `d`:
    /// `kubeproxy_sync_proxy_rules_duration_seconds` and
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds` (= now).
    pub fn observe_sync(&self, d: Duration) {
        self.observe_sync_at(d, SystemTime::now());
    }

    /// [`Self::observe_sync`] with an explicit wall-clock time.
    pub fn observe_sync_at(&self, d: Duration, now: SystemTime) {
        let mut m = self.lock();
        m.sync_duration.observe(d.as_secs_f64());
        m.last_sync_timestamp = unix_seconds(now);
    }

    /// `kubeproxy_network_programming_duration_seconds`: time from a change
    /// of an object (its trigger time) to the datapath reflecting it.
    pub fn observe_network_programming(&self, d: Duration) {
        self.lock().network_programming.observe(d.as_secs_f64());
    }

    /// `kubeproxy_sync_proxy_rules_service_changes_total += n`.
    pub fn add_service_changes(&self, n: u64) {
        let mut m = self.lock();
        m.service_changes = m.service_changes.saturating_add(n);
    }

    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total += n`.
    pub fn add_endpoint_changes(&self, n: u64) {
        let mut m = self.lock();
        m.endpoint_changes = m.endpoint_changes.saturating_add(n);
    }

    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`.
    pub fn set_last_queued(&self, t: SystemTime) {
        self.lock().last_queued_timestamp = unix_seconds(t);
    }

    /// `lb_map_entries{map}` and `lb_map_capacity{map}`.
    pub fn set_map_fill(&self, map: &str, entries: u64, capacity: u64) {
        let mut m = self.lock();
        m.map_entries.insert(map.to_string(), entries);
        m.map_capacity.insert(map.to_string(), capacity);
    }

    /// `lb_conntrack_entries`.
    pub fn set_conntrack_entries(&self, n: u64) {
        self.lock().conntrack_entries = n;
    }

    /// `lb_datapath_packets_total{reason}` (and `lb_datapath_drops_total{reason}`
    /// for drop reasons) from the datapath's counters: absolute values, the
    /// per-CPU values already summed. Reasons not given keep their value.
    pub fn set_datapath_counters(&self, counters: &[(StatReason, u64)]) {
        let mut m = self.lock();
        for (reason, v) in counters {
            if let Some(slot) = m.datapath.get_mut(*reason as usize) {
                *slot = *v;
            }
        }
    }

    /// `lb_rejected_objects_total{kind} += 1` (kind: Service, EndpointSlice, Node).
    pub fn inc_rejected_object(&self, kind: &str) {
        let mut m = self.lock();
        let c = m.rejected.entry(kind.to_string()).or_insert(0);
        *c = c.saturating_add(1);
    }

    /// `lb_apiserver_connected` (1/0).
    pub fn set_apiserver_connected(&self, connected: bool) {
        self.lock().apiserver_connected = connected;
    }

    /// Replaces the labels of `lb_agent_info` (default: this crate's version
    /// and [`PROXY_MODE`]).
    pub fn set_agent_info(&self, version: &str, mode: &str) {
        let mut m = self.lock();
        m.info_version = version.to_string();
        m.info_mode = mode.to_string();
    }

    /// `lb_attached_interfaces{role}` (e.g. role `uplink`, `pod`).
    pub fn set_attached_interfaces(&self, role: &str, n: u64) {
        self.lock().attached.insert(role.to_string(), n);
    }

    /// `lb_service_packets_total{service}`: replaces the whole set (services
    /// not listed disappear). Absolute values.
    pub fn set_service_packets(&self, packets: &[(String, u64)]) {
        let mut m = self.lock();
        m.service_packets = packets.iter().cloned().collect();
    }

    /// The Prometheus text format (0.0.4) of every metric.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut e = Encoder::default();

        // ---- kube-proxy's (pkg/proxy/metrics), same names and buckets ----
        e.histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "[ALPHA] SyncProxyRules latency in seconds",
            &m.sync_duration,
        );
        e.histogram(
            "kubeproxy_network_programming_duration_seconds",
            "[ALPHA] In Cluster Network Programming Latency in seconds",
            &m.network_programming,
        );
        e.single(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "[ALPHA] The last time proxy rules were successfully synced",
            "gauge",
            Value::F(m.last_sync_timestamp),
        );
        e.single(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "[ALPHA] The last time a sync of proxy rules was queued",
            "gauge",
            Value::F(m.last_queued_timestamp),
        );
        e.single(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "[ALPHA] Cumulative proxy rules Service changes",
            "counter",
            Value::U(m.service_changes),
        );
        e.single(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "[ALPHA] Cumulative proxy rules Endpoint changes",
            "counter",
            Value::U(m.endpoint_changes),
        );

        // ---- lb's own ----
        e.header(
            "lb_agent_info",
            "Always 1; labels carry the agent's version and proxy mode",
            "gauge",
        );
        e.sample(
            "lb_agent_info",
            &[("version", &m.info_version), ("mode", &m.info_mode)],
            Value::U(1),
        );
        e.single(
            "lb_apiserver_connected",
            "1 while the agent's watches of the API server are connected, else 0",
            "gauge",
            Value::U(u64::from(m.apiserver_connected)),
        );
        e.labeled(
            "lb_map_entries",
            "Entries in a BPF map",
            "gauge",
            "map",
            &m.map_entries,
        );
        e.labeled(
            "lb_map_capacity",
            "Maximum entries of a BPF map",
            "gauge",
            "map",
            &m.map_capacity,
        );
        e.single(
            "lb_conntrack_entries",
            "Entries in the datapath's conntrack map",
            "gauge",
            Value::U(m.conntrack_entries),
        );
        let packets: BTreeMap<String, u64> = StatReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), m.datapath[*r as usize]))
            .collect();
        e.labeled(
            "lb_datapath_packets_total",
            "Packets seen by the datapath, by outcome (reason=packets counts every packet)",
            "counter",
            "reason",
            &packets,
        );
        let drops: BTreeMap<String, u64> = StatReason::ALL
            .iter()
            .filter(|r| r.is_drop())
            .map(|r| (r.name().to_string(), m.datapath[*r as usize]))
            .collect();
        e.labeled(
            "lb_datapath_drops_total",
            "Packets dropped by the datapath, by reason",
            "counter",
            "reason",
            &drops,
        );
        e.labeled(
            "lb_rejected_objects_total",
            "Objects (or parts of objects) rejected as invalid, by kind",
            "counter",
            "kind",
            &m.rejected,
        );
        e.labeled(
            "lb_attached_interfaces",
            "Interfaces the datapath programs are attached to, by role",
            "gauge",
            "role",
            &m.attached,
        );
        e.labeled(
            "lb_service_packets_total",
            "Packets translated for a service",
            "counter",
            "service",
            &m.service_packets,
        );
        e.out
    }
}

/// Seconds since the Unix epoch as a float (Go's `SetToCurrentTime`).
fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[derive(Clone, Copy)]
enum Value {
    U(u64),
    F(f64),
}

/// Writes the text exposition format.
#[derive(Default)]
struct Encoder {
    out: String,
}

impl Encoder {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: Value) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(val));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        match v {
            Value::U(u) => {
                let _ = write!(self.out, "{u}");
            }
            Value::F(f) => self.out.push_str(&format_float(f)),
        }
        self.out.push('\n');
    }

    fn single(&mut self, name: &str, help: &str, kind: &str, v: Value) {
        self.header(name, help, kind);
        self.sample(name, &[], v);
    }

    /// A family with one label; omitted entirely while it has no series
    /// (as client_golang does for a vector without children).
    fn labeled(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        series: &BTreeMap<String, u64>,
    ) {
        if series.is_empty() {
            return;
        }
        self.header(name, help, kind);
        for (k, v) in series {
            self.sample(name, &[(label, k)], Value::U(*v));
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, b) in h.bounds.iter().enumerate() {
            cumulative += h.counts[i];
            self.sample(&bucket, &[("le", &format_float(*b))], Value::U(cumulative));
        }
        self.sample(&bucket, &[("le", "+Inf")], Value::U(h.count));
        self.sample(&format!("{name}_sum"), &[], Value::F(h.sum));
        self.sample(&format!("{name}_count"), &[], Value::U(h.count));
    }
}

/// Floats as Prometheus writes them: shortest round-trip form, `+Inf`,
/// `-Inf`, `NaN`.
fn format_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f == f64::INFINITY {
        "+Inf".into()
    } else if f == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{f}")
    }
}

/// Label values: backslash, double quote and line feed are escaped.
fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and line feed are escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Answers one request to the metrics server (any method, like Go's mux):
/// `/metrics`, `/proxyMode`, `/healthz`; 404 otherwise.
pub fn metrics_response<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            );
            resp
        }
        // kube-proxy: fmt.Fprintf(w, "%s", proxyMode), no newline.
        "/proxyMode" => plain_response(StatusCode::OK, PROXY_MODE),
        // k8s.io/apiserver healthz.InstallHandler with no checks.
        "/healthz" => plain_response(StatusCode::OK, "ok"),
        _ => plain_response(StatusCode::NOT_FOUND, NOT_FOUND_BODY),
    }
}

/// Serves [`metrics_response`] on `listener` until the returned future is
/// dropped (dropping it also closes every open connection). Never returns.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    serve_http(listener, "metrics", move |req| {
        metrics_response(&metrics, req)
    })
    .await
}

#[cfg(test)]
mod tests;
