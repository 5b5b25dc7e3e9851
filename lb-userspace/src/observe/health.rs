//! The agent's health endpoints (SEMANTICS A1) and the per-Service
//! health-check node ports (H1), with kube-proxy's semantics
//! (pkg/proxy/healthcheck: `ProxierHealthServer`, `ServiceHealthServer`).
//!
//! # Proxy health (`/healthz`, `/livez`, default port 10256)
//! [`ProxyHealth`] is kube-proxy's `ProxierHealthServer` for one IP family:
//! - [`ProxyHealth::queued_update`] (kube-proxy `QueuedUpdate`): a change is
//!   waiting to be programmed; records the time only if none is pending yet
//!   (the *oldest* pending change counts).
//! - [`ProxyHealth::updated`] (kube-proxy `Updated`): a sync finished;
//!   lastUpdated = now, nothing pending.
//! - Healthy unless an update has been pending for `health_timeout` or
//!   longer (`now - oldestPending < healthTimeout` is healthy). Before the
//!   first `updated()` the proxy counts as healthy *whatever is pending*:
//!   that is kube-proxy's rule ("the proxier is healthy while it's starting
//!   up"), and kube-proxy calls `Updated` once when its sync loop starts
//!   (`SyncLoop`), so the agent should call [`ProxyHealth::updated`] once when
//!   its sync loop starts too; from then on a stuck first sync turns
//!   `/healthz` to 503 after `health_timeout`.
//! - `/healthz` is additionally 503 while the node is not eligible
//!   ([`ProxyHealth::sync_node`]: node being deleted or tainted
//!   `ToBeDeletedByClusterAutoscaler`); `/livez` ignores the node. The node
//!   starts eligible.
//! - Bodies as kube-proxy writes them, key order and spacing included:
//!   `{"lastUpdated": "..","currentTime": "..", "nodeEligible": true}` and
//!   `{"lastUpdated": "..","currentTime": ".."}`. When healthy, lastUpdated
//!   is reported as currentTime (kube-proxy keeps that for compatibility with
//!   older releases); when unhealthy it is the real last update (or
//!   `0001-01-01T00:00:00Z`, Go's zero time, if there was none). Times are
//!   RFC 3339 in UTC with up to nanosecond precision. (kube-proxy itself
//!   prints Go's `time.Time.String()` here, e.g.
//!   `2024-05-01 10:00:00.123 +0000 UTC m=+12.3`, which is not a stable
//!   format; lb prints RFC 3339 instead. Consumers look at the status code.)
//! - Content-Type `application/json`, `X-Content-Type-Options: nosniff`;
//!   any method; other paths get Go's `404 page not found`.
//!
//! Time is injected (`Moment`) so the logic is tested without sleeping.
//! The pending-update age uses the monotonic clock (like Go's `time.Time`
//! with its monotonic reading), the printed times the wall clock.
//!
//! # Health-check node ports (H1)
//! [`ServiceHealthServers`] keeps one HTTP listener per
//! `spec.healthCheckNodePort` of the LoadBalancer Services with
//! externalTrafficPolicy=Local that the model reports ([`HealthCheck`]).
//! Every path and method answers
//! ```text
//! {
//!     "service": {
//!         "namespace": "ns",
//!         "name": "svc"
//!     },
//!     "localEndpoints": 1,
//!     "serviceProxyHealthy": true
//! }
//! ```
//! (kube-proxy's exact bytes: indented with tabs, shown here as spaces; no
//! trailing newline), status 200 when localEndpoints > 0 and the proxy is
//! healthy, 503 otherwise. As in kube-proxy, "proxy healthy" here is the
//! proxy's own health (`IsHealthy`), which does not look at node
//! eligibility. `localEndpoints` is the model's count:
//! local endpoints with condition ready (not the serving+terminating
//! fallback), summed over the Service's ports, as kube-proxy's
//! `LocalReadyEndpoints` counts them. The EndpointSlice controller sets
//! ready=false on terminating endpoints, so those are not counted (H1); an
//! endpoint written by hand with ready=true *and* terminating=true would
//! be, as in kube-proxy.
//!
//! # Serving
//! This module only answers requests; the listeners, their connection limit
//! and their lifetime are `observe::http`'s.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use lb_core::model::HealthCheck;

use super::http::{self, Handler};

/// The taint the cluster autoscaler puts on a node it is about to delete;
/// such a node is not eligible (kube-proxy `ToBeDeletedTaint`).
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Go's zero `time.Time` in RFC 3339, printed when there was no update yet.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A point in time, as both clocks: the monotonic one for ages, the wall
/// clock for what is printed. Tests build their own and move them forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Moment {
    wall: SystemTime,
    mono: Instant,
}

impl Moment {
    fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// This moment plus `d` on both clocks.
    #[cfg(test)]
    fn after(self, d: Duration) -> Self {
        Self {
            wall: self.wall + d,
            mono: self.mono + d,
        }
    }
}

#[derive(Debug)]
struct State {
    last_updated: Option<Moment>,
    oldest_pending: Option<Moment>,
    node_eligible: bool,
}

/// kube-proxy's `ProxierHealthServer` state (one IP family). See the module
/// docs for the rules.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
}

/// Status and body of a `/healthz` or `/livez` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HealthReply {
    status: StatusCode,
    body: String,
}

impl ProxyHealth {
    /// `health_timeout`: how long an update may stay pending before the proxy
    /// is unhealthy (kube-proxy: 2 x sync period).
    pub fn new(health_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            timeout: health_timeout,
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                // kube-proxy: eligible while starting up, until a Node event
                // says otherwise.
                node_eligible: true,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change is waiting to be programmed (kube-proxy `QueuedUpdate`).
    pub fn queued_update(&self) {
        self.queued_update_at(Moment::now());
    }

    /// [`Self::queued_update`] at `now`: kept only if nothing is pending yet.
    /// (Time is a parameter so that tests need not sleep.)
    fn queued_update_at(&self, now: Moment) {
        let mut st = self.lock();
        if st.oldest_pending.is_none() {
            st.oldest_pending = Some(now);
        }
    }

    /// A sync finished successfully (kube-proxy `Updated`).
    pub fn updated(&self) {
        self.updated_at(Moment::now());
    }

    /// [`Self::updated`] at `now`.
    fn updated_at(&self, now: Moment) {
        let mut st = self.lock();
        st.oldest_pending = None;
        st.last_updated = Some(now);
    }

    /// False while this node is being deleted: `/healthz` answers 503,
    /// `/livez` and the health-check node ports are unaffected.
    fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    #[cfg(test)]
    fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// kube-proxy `SyncNode`: the node is eligible unless it has a deletion
    /// timestamp or the `ToBeDeletedByClusterAutoscaler` taint.
    pub fn sync_node(&self, node: &Node) {
        self.set_node_eligible(node_eligible(node));
    }

    /// The proxy's own health, ignoring the node (kube-proxy `IsHealthy`).
    fn is_healthy(&self, now: Moment) -> bool {
        self.check(now).0
    }

    /// (healthy, lastUpdated to report, node eligible), kube-proxy's
    /// `isHealthy` for one family.
    fn check(&self, now: Moment) -> (bool, Option<SystemTime>, bool) {
        let st = self.lock();
        let healthy = match (st.last_updated, st.oldest_pending) {
            // Starting up (never updated) or fully synced.
            (None, _) | (Some(_), None) => true,
            // Something is queued; unhealthy once it is late.
            (Some(_), Some(p)) => now.mono.saturating_duration_since(p.mono) < self.timeout,
        };
        (healthy, st.last_updated.map(|m| m.wall), st.node_eligible)
    }

    /// The `/healthz` answer at `now`: 200 when healthy and the node is
    /// eligible, else 503.
    fn healthz_body(&self, now: Moment) -> HealthReply {
        let (healthy, last_updated, eligible) = self.check(now);
        let ok = healthy && eligible;
        let last = if ok { Some(now.wall) } else { last_updated };
        HealthReply {
            status: status(ok),
            body: format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {}}}"#,
                rfc3339(last),
                rfc3339(Some(now.wall)),
                eligible
            ),
        }
    }

    /// The `/livez` answer at `now`: 200 when healthy, else 503 (the node's
    /// eligibility does not matter).
    fn livez_body(&self, now: Moment) -> HealthReply {
        let (healthy, last_updated, _) = self.check(now);
        let last = if healthy {
            Some(now.wall)
        } else {
            last_updated
        };
        HealthReply {
            status: status(healthy),
            body: format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
                rfc3339(last),
                rfc3339(Some(now.wall))
            ),
        }
    }
}

/// kube-proxy's node eligibility rule (see [`ProxyHealth::sync_node`]).
fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !tainted
}

fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// RFC 3339, UTC, nanoseconds when not zero; Go's zero time for `None`.
fn rfc3339(t: Option<SystemTime>) -> String {
    t.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
        .map(|ts| ts.to_string())
        .unwrap_or_else(|| ZERO_TIME.to_string())
}

/// Answers one request to the proxy health server: `/healthz`, `/livez`
/// (any method, query ignored), 404 otherwise.
fn health_response(health: &ProxyHealth, req: &Request<()>, now: Moment) -> Response<Full<Bytes>> {
    let reply = match req.uri().path() {
        "/healthz" => health.healthz_body(now),
        "/livez" => health.livez_body(now),
        _ => return http::not_found(),
    };
    http::json(reply.status, reply.body)
}

/// Serves `/healthz` and `/livez` (A1) on `listener` until the returned
/// future is dropped; never returns on its own.
pub async fn serve_health(listener: TcpListener, health: Arc<ProxyHealth>) {
    let handler: Handler = Arc::new(move |req| health_response(&health, req, Moment::now()));
    http::serve(listener, "healthz", handler).await
}

/// The body a health-check node port answers with (kube-proxy's bytes).
fn service_health_body(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> String {
    // serde_json's string escaping gives the same result as Go's %q for
    // every valid namespace and name (DNS labels).
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        q(namespace),
        q(name),
        local_endpoints,
        proxy_healthy
    )
}

/// The answer of a health-check node port (H1), for any request: 200 when
/// `local_endpoints > 0 && proxy_healthy`, else 503.
fn service_health_response(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> Response<Full<Bytes>> {
    http::json(
        status(local_endpoints > 0 && proxy_healthy),
        service_health_body(namespace, name, local_endpoints, proxy_healthy),
    )
}

/// A health-check node port that could not be served. The other ports are
/// not affected; [`ServiceHealthServers::sync`] retries on every call.
#[derive(Debug, thiserror::Error)]
pub enum HealthServerError {
    #[error(
        "health check node port {port} of Service {namespace}/{name}: cannot listen on {addr}: {source}"
    )]
    Bind {
        namespace: String,
        name: String,
        port: u16,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "health check node port {port} of Service {namespace}/{name}: already used by Service {owner_namespace}/{owner_name}"
    )]
    PortConflict {
        namespace: String,
        name: String,
        port: u16,
        owner_namespace: String,
        owner_name: String,
    },
}

/// What a health-check node port reports; updated in place by `sync`.
#[derive(Clone, Debug)]
struct CheckState {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

struct PortServer {
    state: Arc<Mutex<CheckState>>,
    /// One accept loop per bind address.
    tasks: Vec<JoinHandle<()>>,
}

impl PortServer {
    /// Stops listening; returns when every listener is closed.
    async fn close(mut self) {
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
            // Resolves once the task's future (and its listener) is dropped.
            let _ = t.await;
        }
    }
}

impl Drop for PortServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The health-check node port listeners (H1). See the module docs.
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    bind_addrs: Vec<IpAddr>,
    servers: tokio::sync::Mutex<BTreeMap<u16, PortServer>>,
}

impl ServiceHealthServers {
    /// `bind_addrs`: the addresses to listen on (kube-proxy: the node port
    /// addresses); empty means all (0.0.0.0).
    pub fn new(health: Arc<ProxyHealth>, bind_addrs: Vec<IpAddr>) -> Self {
        let bind_addrs = if bind_addrs.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            bind_addrs
        };
        Self {
            health,
            bind_addrs,
            servers: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Makes the listeners match `checks`: opens one per distinct node port,
    /// updates the counts and names of existing ones in place (no re-bind)
    /// and closes those of ports no longer wanted before returning. A port
    /// that cannot be bound (or is claimed twice; the first check in
    /// namespace/name order keeps it) gives an error; it is retried on the
    /// next call. Must run inside a tokio runtime.
    pub async fn sync(&self, checks: &[HealthCheck]) -> Vec<HealthServerError> {
        let mut errors = Vec::new();
        let mut wanted: BTreeMap<u16, &HealthCheck> = BTreeMap::new();
        for c in checks {
            match wanted.entry(c.node_port) {
                Entry::Vacant(v) => {
                    v.insert(c);
                }
                Entry::Occupied(o) => errors.push(HealthServerError::PortConflict {
                    namespace: c.namespace.clone(),
                    name: c.name.clone(),
                    port: c.node_port,
                    owner_namespace: o.get().namespace.clone(),
                    owner_name: o.get().name.clone(),
                }),
            }
        }

        let mut servers = self.servers.lock().await;
        let gone: Vec<u16> = servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(s) = servers.remove(&port) {
                tracing::info!(port, "closing health check node port");
                s.close().await;
            }
        }

        for (port, c) in wanted {
            let new_state = CheckState {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                local_endpoints: c.local_endpoints,
            };
            if let Some(s) = servers.get(&port) {
                *s.state.lock().unwrap_or_else(|e| e.into_inner()) = new_state;
                continue;
            }
            match self.open(port, new_state).await {
                Ok(s) => {
                    tracing::info!(
                        port,
                        service = %format_args!("{}/{}", c.namespace, c.name),
                        "opened health check node port"
                    );
                    servers.insert(port, s);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// The ports currently listened on.
    #[cfg(test)]
    async fn ports(&self) -> Vec<u16> {
        self.servers.lock().await.keys().copied().collect()
    }

    async fn open(&self, port: u16, state: CheckState) -> Result<PortServer, HealthServerError> {
        let mut listeners = Vec::with_capacity(self.bind_addrs.len());
        for ip in &self.bind_addrs {
            let addr = SocketAddr::new(*ip, port);
            match TcpListener::bind(addr).await {
                Ok(l) => listeners.push(l),
                // Like kube-proxy: all addresses or none (the ones already
                // bound are closed when `listeners` is dropped).
                Err(source) => {
                    return Err(HealthServerError::Bind {
                        namespace: state.namespace,
                        name: state.name,
                        port,
                        addr,
                        source,
                    })
                }
            }
        }
        let state = Arc::new(Mutex::new(state));
        let handler: Handler = {
            let state = state.clone();
            let health = self.health.clone();
            // Any path, any method (kube-proxy's handler ignores the request).
            Arc::new(move |_req| {
                let s = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
                service_health_response(
                    &s.namespace,
                    &s.name,
                    s.local_endpoints,
                    health.is_healthy(Moment::now()),
                )
            })
        };
        let tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(http::serve(l, "health check node port", handler.clone())))
            .collect();
        Ok(PortServer { state, tasks })
    }
}

#[cfg(test)]
mod tests;
