//! What both modes share: the loaded datapath, the planner's mirror of the
//! maps, interfaces and node addresses, conntrack collection, metrics and
//! health.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::MapData;
use ipnet::Ipv4Net;
use lb_common::DatapathConfig;
use lb_userspace::agent::{interfaces_to_attach, nodeport_addrs, uplink_addrs};
use lb_userspace::dataplane::{self, error_chain, DatapathMaps, Dataplane, Role};
use lb_userspace::health::ProxyHealth;
use lb_userspace::metrics::Metrics;
use lb_userspace::sync::{Limits, Plan, SyncState};
use lb_userspace::{conntrack_gc, inspect, netlink};
use regex::Regex;
use tracing::{debug, error, info, warn};

/// Settings both modes take from the command line.
pub struct NodeSettings {
    pub bpffs: PathBuf,
    pub uplinks: Vec<String>,
    pub pod_pattern: Regex,
    pub nodeport_cidrs: Vec<Ipv4Net>,
    pub config: DatapathConfig,
}

pub struct NodeAgent {
    pub dp: Dataplane,
    pub sync: SyncState,
    settings: NodeSettings,
    pub node_addrs: BTreeSet<Ipv4Addr>,
    datapath_maps: DatapathMaps<MapData>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
    pruned_stale_pins: bool,
    /// An apply failed part way: rebuild the mirror from the maps first.
    needs_resync: bool,
    ready_logged: bool,
    generation: u64,
}

impl NodeAgent {
    pub fn new(
        settings: NodeSettings,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
    ) -> Result<Self> {
        let dp = Dataplane::load(&settings.bpffs, &settings.config)
            .with_context(|| format!("loading the datapath into {}", settings.bpffs.display()))?;
        // Start from what is in the maps (an earlier agent's work): every
        // plan is a diff against it, never a flush.
        let applied = dp.maps.read_contents().context("reading pinned maps")?;
        info!(
            frontends = applied.services.len(),
            backends = applied.backends.len(),
            "adopted existing map contents"
        );
        let datapath_maps =
            DatapathMaps::open_pinned(&settings.bpffs).context("opening the conntrack map")?;
        Ok(Self {
            dp,
            sync: SyncState::new(applied, Limits::default()),
            settings,
            node_addrs: BTreeSet::new(),
            datapath_maps,
            metrics,
            health,
            pruned_stale_pins: false,
            needs_resync: false,
            ready_logged: false,
            generation: 0,
        })
    }

    /// Attaches to new uplinks and pod interfaces, lets go of the gone ones,
    /// refreshes the uplink SNAT addresses and the NodePort addresses.
    /// Returns whether the NodePort addresses changed.
    pub fn reconcile_interfaces(&mut self) -> Result<bool> {
        let links = netlink::list_links().context("listing interfaces")?;
        let uplinks: BTreeSet<String> = if self.settings.uplinks.is_empty() {
            let idx = netlink::default_route_interfaces().context("listing routes")?;
            links
                .iter()
                .filter(|l| idx.contains(&l.index))
                .map(|l| l.name.clone())
                .collect()
        } else {
            for u in &self.settings.uplinks {
                if !links.iter().any(|l| &l.name == u) {
                    warn!(uplink = %u, "uplink interface does not exist (yet)");
                }
            }
            self.settings.uplinks.iter().cloned().collect()
        };
        let want = interfaces_to_attach(&links, &uplinks, &self.settings.pod_pattern);
        for e in self.dp.sync_interfaces(&want) {
            error!(error = %error_chain(&e), "attach failed; will retry");
        }
        if !self.pruned_stale_pins {
            self.dp.remove_stale_link_pins(&links);
            self.pruned_stale_pins = true;
        }
        let addrs = netlink::list_ipv4_addrs().context("listing addresses")?;
        let snat = uplink_addrs(self.dp.attached(), &addrs);
        if self
            .dp
            .set_uplink_addrs(&snat)
            .context("writing uplink addresses")?
        {
            info!(uplinks = ?snat, "uplink SNAT addresses");
        }
        let node_addrs = nodeport_addrs(&addrs, &self.settings.nodeport_cidrs);
        let changed = node_addrs != self.node_addrs;
        if changed {
            info!(addresses = ?node_addrs, "NodePort addresses");
            self.node_addrs = node_addrs;
        }
        for role in [Role::Uplink, Role::Pod] {
            let n = self.dp.attached().values().filter(|r| **r == role).count();
            self.metrics
                .set_attached_interfaces(role.as_str(), n as u64);
        }
        Ok(changed)
    }

    /// Rebuilds the planner's mirror from the maps if an earlier apply failed.
    pub fn resync_if_needed(&mut self) -> Result<()> {
        if self.needs_resync {
            let contents = self.dp.maps.read_contents().context("re-reading maps")?;
            self.sync = SyncState::new(contents, Limits::default());
            self.needs_resync = false;
        }
        Ok(())
    }

    /// Executes a plan; `started` is when the change it programs was seen
    /// (network programming latency); `scope` says what was planned ("full"
    /// diff, or only some service "ports"). Returns the number of map writes.
    pub fn apply(&mut self, plan: Plan, started: Instant, scope: &str) -> Result<usize> {
        for e in &plan.errors {
            error!("{e}");
        }
        let n = plan.ops.len();
        let t0 = Instant::now();
        if let Err(e) = self.dp.maps.apply_all(&plan.ops) {
            // Some of the plan may be in the maps: re-read them before the
            // next plan.
            self.needs_resync = true;
            return Err(anyhow::anyhow!("map writes failed: {}", error_chain(&e)));
        }
        for op in &plan.ops {
            self.sync.apply(op);
        }
        self.metrics.observe_sync(t0.elapsed());
        self.health.updated();
        if n > 0 {
            self.generation += 1;
            self.metrics
                .add_service_changes(plan.service_changes as u64);
            self.metrics
                .add_endpoint_changes(plan.endpoint_changes as u64);
            self.metrics.observe_network_programming(started.elapsed());
            info!(
                generation = self.generation,
                scope,
                map_writes = n,
                service_changes = plan.service_changes,
                endpoint_changes = plan.endpoint_changes,
                elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
                "maps updated"
            );
        }
        // Ready once the whole desired state has been programmed (not after
        // a first node-address write).
        if !self.ready_logged && scope == "full" {
            self.ready_logged = true;
            info!(
                frontends = self.sync.contents().services.len(),
                "lb-agent ready"
            );
        }
        Ok(n)
    }

    /// Programs a change of NodePort addresses alone.
    pub fn apply_node_addrs(&mut self) -> Result<()> {
        self.resync_if_needed()?;
        let plan = self.sync.plan_node_addrs(&self.node_addrs);
        self.apply(plan, Instant::now(), "node-addresses")
            .map(|_| ())
    }

    /// Deletes idle conntrack entries (both directions of a flow together).
    pub fn collect_conntrack(&mut self) {
        let entries = match self.datapath_maps.conntrack_entries() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %error_chain(&e), "conntrack scan failed");
                return;
            }
        };
        self.metrics.set_conntrack_entries(entries.len() as u64);
        let expired =
            conntrack_gc::expired_keys(&entries, &self.settings.config, inspect::boottime_ns());
        if expired.is_empty() {
            return;
        }
        match self.datapath_maps.delete_conntrack(&expired) {
            Ok(n) => debug!(
                deleted = n,
                total = entries.len(),
                "conntrack entries expired"
            ),
            Err(e) => warn!(error = %error_chain(&e), "conntrack cleanup failed"),
        }
    }

    /// Datapath counters and map fill into the metrics.
    pub fn refresh_metrics(&mut self) {
        match self.datapath_maps.stats() {
            Ok(s) => self.metrics.set_datapath_counters(&s),
            Err(e) => debug!(error = %error_chain(&e), "reading counters"),
        }
        let c = self.sync.contents();
        for (map, entries, capacity) in [
            (
                lb_common::map_names::SERVICES,
                c.services.len(),
                lb_common::MAX_SERVICES,
            ),
            (
                lb_common::map_names::BACKENDS,
                c.backends.len(),
                lb_common::MAX_BACKENDS,
            ),
            (
                lb_common::map_names::BACKEND_SLOTS,
                c.slots.len(),
                lb_common::MAX_BACKEND_SLOTS,
            ),
        ] {
            self.metrics
                .set_map_fill(map, entries as u64, u64::from(capacity));
        }
    }
}

/// Binds the health (/healthz, /livez) and metrics (/metrics, /proxyMode)
/// servers; an empty address disables one.
pub async fn start_http(
    healthz: &str,
    metrics_addr: &str,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    if !healthz.is_empty() {
        let l = tokio::net::TcpListener::bind(healthz)
            .await
            .with_context(|| format!("--healthz-bind-address {healthz}"))?;
        info!(address = healthz, "serving /healthz and /livez");
        tokio::spawn(lb_userspace::health::serve_health(l, health));
    }
    if !metrics_addr.is_empty() {
        let l = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("--metrics-bind-address {metrics_addr}"))?;
        info!(address = metrics_addr, "serving /metrics and /proxyMode");
        tokio::spawn(lb_userspace::metrics::serve_metrics(l, metrics));
    }
    Ok(())
}

/// Periodic work shared by both modes.
pub struct Ticks {
    pub poll: tokio::time::Interval,
    pub gc: tokio::time::Interval,
    pub refresh: tokio::time::Interval,
}

impl Ticks {
    pub fn new(poll: Duration, gc: Duration, refresh: Duration) -> Self {
        let mk = |d: Duration| {
            let mut i = tokio::time::interval(d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        Self {
            poll: mk(poll),
            gc: mk(gc),
            refresh: mk(refresh),
        }
    }
}

/// Wakes the loop when links or addresses change (a pod's veth appears).
pub fn spawn_netlink_watcher(changed: Arc<tokio::sync::Notify>) -> Result<()> {
    let sub = netlink::ChangeSubscription::new().context("subscribing to netlink")?;
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || loop {
            match sub.wait() {
                Ok(()) => changed.notify_one(),
                Err(e) => {
                    warn!(error = %e, "netlink watch failed; relying on polling");
                    return;
                }
            }
        })
        .context("spawning the netlink thread")?;
    Ok(())
}

pub fn cleanup(bpffs: &std::path::Path) -> Result<()> {
    dataplane::cleanup(bpffs).with_context(|| format!("cleaning up {}", bpffs.display()))
}
