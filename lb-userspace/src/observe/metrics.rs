//! The agent's Prometheus metrics (SEMANTICS A2, A3) and the handler of its
//! metrics server (`--metrics-bind-address`, `127.0.0.1:10249` by default
//! like kube-proxy's).
//!
//! Names, types, help texts and histogram buckets of the `kubeproxy_*`
//! metrics are kube-proxy's (pkg/proxy/metrics), so existing dashboards and
//! alerts keep working. kube-proxy registers them through
//! k8s.io/component-base, which prefixes the help text with the stability
//! level (`[ALPHA] `); that prefix is reproduced. The `lb_*` metrics are lb's
//! own.
//!
//! # Encoding
//! prometheus-client writes the exposition, in the Prometheus text format
//! 0.0.4 (`encoding::prometheus_text`), which is what kube-proxy serves; the
//! crate's default OpenMetrics encoder would end with `# EOF`, TYPE counters
//! without their `_total` and print `le="1.0"` where Go prints `le="1"`
//! (another series for Prometheus). Counters are described *without* the
//! `_total` suffix: the encoder appends it to HELP, TYPE and samples.
//!
//! [`Metrics`] keeps plain values behind one mutex and hands them to the
//! encoder through one `Collector` instead of registering live metric
//! objects, because:
//! - a scrape reads everything under one lock, so it sees one consistent
//!   state (the sync histogram's count and the last-sync timestamp agree);
//!   writes happen a few times per sync and reads once per scrape, so
//!   contention does not matter;
//! - `Registry::register` appends a full stop to help texts, which would
//!   change kube-proxy's; a collector's descriptors are written as given;
//! - series come out in a stable order, sorted by label value (datapath
//!   reasons in the datapath's order); `Family` is a hash map whose order
//!   changes from scrape to scrape;
//! - the datapath counters are absolute values read from the kernel, which
//!   `ConstCounter` expresses and an add-only `Counter` does not.
//!
//! The histograms are prometheus-client's. Labelled families without series
//! are left out, as client_golang does for a vector without children.
//!
//! # HTTP
//! [`serve_metrics`] answers like kube-proxy's metrics server: `/metrics`,
//! `/proxyMode` (the mode name, `ebpf`) and the generic `/healthz` (`ok`)
//! that kube-proxy also installs on that server; any other path is 404.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use lb_common::{StatReason, STAT_COUNT};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;

use super::http::{self, Handler};

/// What `/proxyMode` prints and `lb_agent_info{mode}` carries by default.
const PROXY_MODE: &str = "ebpf";

/// kube-proxy's `SyncProxyRulesLatency` buckets: `ExponentialBuckets(0.001, 2, 15)`
/// (1 ms .. 16.384 s).
fn sync_proxy_rules_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's `NetworkProgrammingLatency` buckets:
/// `merge(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59),
/// LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7))`
/// (0.25 s, 0.5 s, 1..59 s, 60..115 s, 120..300 s; 80 buckets).
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

#[derive(Debug)]
struct State {
    sync_duration: Histogram,
    network_programming: Histogram,
    last_sync_timestamp: f64,
    last_queued_timestamp: f64,
    service_changes: u64,
    endpoint_changes: u64,
    map_entries: BTreeMap<String, u64>,
    map_capacity: BTreeMap<String, u64>,
    conntrack_entries: u64,
    conntrack_gc_deleted: u64,
    conntrack_gc_duration: f64,
    conntrack_gc_last_timestamp: f64,
    datapath: [u64; STAT_COUNT as usize],
    rejected: BTreeMap<String, u64>,
    apiserver_connected: bool,
    info_version: String,
    info_mode: String,
    /// Where the desired state comes from: `cluster` or `manifest`.
    info_source: String,
    attached: BTreeMap<String, u64>,
}

/// Never panics: a panic while holding the lock leaves plain numbers
/// behind, which are still fine to read and write.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's metrics. Cheap to update from any thread.
pub struct Metrics {
    state: Arc<Mutex<State>>,
    /// Holds one [`StateCollector`] over `state`.
    registry: Registry,
}

impl Metrics {
    /// All counters at zero; `lb_agent_info{version=<crate version>, mode="ebpf"}`.
    pub fn new() -> Arc<Self> {
        let state = Arc::new(Mutex::new(State {
            sync_duration: Histogram::new(sync_proxy_rules_buckets()),
            network_programming: Histogram::new(network_programming_buckets()),
            last_sync_timestamp: 0.0,
            last_queued_timestamp: 0.0,
            service_changes: 0,
            endpoint_changes: 0,
            map_entries: BTreeMap::new(),
            map_capacity: BTreeMap::new(),
            conntrack_entries: 0,
            conntrack_gc_deleted: 0,
            conntrack_gc_duration: 0.0,
            conntrack_gc_last_timestamp: 0.0,
            datapath: [0; STAT_COUNT as usize],
            rejected: BTreeMap::new(),
            apiserver_connected: false,
            info_version: env!("CARGO_PKG_VERSION").to_string(),
            info_mode: PROXY_MODE.to_string(),
            info_source: String::new(),
            attached: BTreeMap::new(),
        }));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StateCollector(state.clone())));
        Arc::new(Self { state, registry })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A sync of the datapath finished successfully after `d`:
    /// `kubeproxy_sync_proxy_rules_duration_seconds` and
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds` (= now).
    pub fn observe_sync(&self, d: Duration) {
        self.observe_sync_at(d, SystemTime::now());
    }

    /// [`Self::observe_sync`] with the wall-clock time as a parameter, so
    /// that tests can check the timestamp.
    fn observe_sync_at(&self, d: Duration, now: SystemTime) {
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

    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`: a change
    /// was queued for the datapath at `t`.
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

    /// A conntrack GC pass: `lb_conntrack_entries = entries`,
    /// `lb_conntrack_gc_deleted_total += deleted`,
    /// `lb_conntrack_gc_duration_seconds` and
    /// `lb_conntrack_gc_last_timestamp_seconds` (= now).
    pub fn observe_conntrack_gc(&self, entries: u64, deleted: u64, d: Duration) {
        let mut m = self.lock();
        m.conntrack_entries = entries;
        m.conntrack_gc_deleted = m.conntrack_gc_deleted.saturating_add(deleted);
        m.conntrack_gc_duration = d.as_secs_f64();
        m.conntrack_gc_last_timestamp = unix_seconds(SystemTime::now());
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

    /// The `source` label of `lb_agent_info`: `cluster` or `manifest`.
    pub fn set_agent_source(&self, source: &str) {
        self.lock().info_source = source.to_string();
    }

    /// `lb_attached_interfaces{role}` (e.g. role `uplink`, `pod`).
    pub fn set_attached_interfaces(&self, role: &str, n: u64) {
        self.lock().attached.insert(role.to_string(), n);
    }

    /// The Prometheus text format (0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail and neither can the collector, so
        // an error here is a bug in the encoder; serve what was written.
        if prometheus_text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding the metrics failed");
        }
        out
    }
}

/// Seconds since the Unix epoch as a float (Go's `SetToCurrentTime`).
fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Encodes [`State`] on each scrape (see the module docs for why this is a
/// collector).
#[derive(Debug)]
struct StateCollector(Arc<Mutex<State>>);

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = lock(&self.0);
        let e = &mut enc;

        // ---- kube-proxy's (pkg/proxy/metrics), same names and buckets ----
        single(
            e,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "[ALPHA] SyncProxyRules latency in seconds",
            &s.sync_duration,
        )?;
        single(
            e,
            "kubeproxy_network_programming_duration_seconds",
            "[ALPHA] In Cluster Network Programming Latency in seconds",
            &s.network_programming,
        )?;
        single(
            e,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "[ALPHA] The last time proxy rules were successfully synced",
            &ConstGauge::new(s.last_sync_timestamp),
        )?;
        single(
            e,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "[ALPHA] The last time a sync of proxy rules was queued",
            &ConstGauge::new(s.last_queued_timestamp),
        )?;
        // Counter names without `_total`, see the module docs.
        single(
            e,
            "kubeproxy_sync_proxy_rules_service_changes",
            "[ALPHA] Cumulative proxy rules Service changes",
            &ConstCounter::new(s.service_changes),
        )?;
        single(
            e,
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "[ALPHA] Cumulative proxy rules Endpoint changes",
            &ConstCounter::new(s.endpoint_changes),
        )?;

        // ---- lb's own ----
        family(
            e,
            "lb_agent_info",
            "Always 1; labels carry the agent's version, its proxy mode and where its desired state comes from",
            [(
                [
                    ("version", s.info_version.as_str()),
                    ("mode", s.info_mode.as_str()),
                    ("source", s.info_source.as_str()),
                ],
                ConstGauge::new(1u64),
            )],
        )?;
        single(
            e,
            "lb_apiserver_connected",
            "1 while the agent's watches of the API server are connected, else 0",
            &ConstGauge::new(u64::from(s.apiserver_connected)),
        )?;
        family(
            e,
            "lb_map_entries",
            "Entries in a BPF map",
            labelled("map", &s.map_entries, ConstGauge::new),
        )?;
        family(
            e,
            "lb_map_capacity",
            "Maximum entries of a BPF map",
            labelled("map", &s.map_capacity, ConstGauge::new),
        )?;
        single(
            e,
            "lb_conntrack_entries",
            "Entries in the datapath's conntrack map",
            &ConstGauge::new(s.conntrack_entries),
        )?;
        single(
            e,
            "lb_conntrack_gc_deleted",
            "Conntrack entries the agent's GC deleted (idle past their state's lifetime)",
            &ConstCounter::new(s.conntrack_gc_deleted),
        )?;
        single(
            e,
            "lb_conntrack_gc_duration_seconds",
            "Duration of the last conntrack GC pass",
            &ConstGauge::new(s.conntrack_gc_duration),
        )?;
        single(
            e,
            "lb_conntrack_gc_last_timestamp_seconds",
            "When the last conntrack GC pass finished (0: none yet)",
            &ConstGauge::new(s.conntrack_gc_last_timestamp),
        )?;
        let reason = |r: &StatReason| {
            (
                [("reason", r.name())],
                ConstCounter::new(s.datapath[*r as usize]),
            )
        };
        family(
            e,
            "lb_datapath_packets",
            "Packets seen by the datapath, by outcome (reason=packets counts every packet)",
            StatReason::ALL.iter().map(reason),
        )?;
        family(
            e,
            "lb_datapath_drops",
            "Packets dropped by the datapath, by reason",
            StatReason::ALL.iter().filter(|r| r.is_drop()).map(reason),
        )?;
        family(
            e,
            "lb_rejected_objects",
            "Objects (or parts of objects) rejected as invalid, by kind",
            labelled("kind", &s.rejected, ConstCounter::new),
        )?;
        family(
            e,
            "lb_attached_interfaces",
            "Interfaces the datapath programs are attached to, by role",
            labelled("role", &s.attached, ConstGauge::new),
        )
    }
}

/// One family with one unlabelled series.
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &M,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One family with a series per label set; left out when `series` is empty.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The series of a map keyed by the value of the one label `key`.
fn labelled<'a, M>(
    key: &'static str,
    values: &'a BTreeMap<String, u64>,
    metric: impl Fn(u64) -> M + 'a,
) -> impl Iterator<Item = ([(&'static str, &'a str); 1], M)> + 'a {
    values
        .iter()
        .map(move |(k, v)| ([(key, k.as_str())], metric(*v)))
}

/// Answers one request to the metrics server (any method, like Go's mux):
/// `/metrics`, `/proxyMode`, `/healthz`; 404 otherwise.
fn metrics_response(metrics: &Metrics, req: &Request<()>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => http::response(
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            metrics.render(),
        ),
        // kube-proxy: fmt.Fprintf(w, "%s", proxyMode), no newline.
        "/proxyMode" => http::plain(StatusCode::OK, PROXY_MODE),
        // k8s.io/apiserver healthz.InstallHandler with no checks.
        "/healthz" => http::plain(StatusCode::OK, "ok"),
        _ => http::not_found(),
    }
}

/// Serves `/metrics`, `/proxyMode` and `/healthz` (A2) on `listener` until
/// the returned future is dropped; never returns on its own.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let handler: Handler = Arc::new(move |req| metrics_response(&metrics, req));
    http::serve(listener, "metrics", handler).await
}

#[cfg(test)]
mod tests;
