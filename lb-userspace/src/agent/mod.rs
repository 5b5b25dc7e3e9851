//! The agent: the control loop that keeps this node's BPF maps equal to the
//! desired state, in both modes.
//!
//! ```text
//! source (watchers | manifest) --Changes--> planner --Plan--> dataplane
//!       ^ validated inputs, model output         (lb-core)     (aya)
//! ```
//!
//! One loop: wait for input (watch updates, the poll tick, a netlink change),
//! bring interfaces and NodePort addresses up to date, ask the source what
//! changed, plan that scope (a full diff after a list, a relist or a new
//! manifest; the changed service ports otherwise), execute the plan, report
//! what was rejected (a log line, a metric and, in cluster mode, one
//! Kubernetes Event per problem and change). The conntrack collector and the
//! metrics refresh run on their own ticks in the same loop.

mod events;
mod interfaces;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use aya::maps::MapData;
use ipnet::Ipv4Net;
use lb_common::DatapathConfig;
use lb_core::desired::DesiredPorts;
use lb_core::model::ObjectKind;
use lb_core::plan::{Plan, PlanError, Planner, Scope};
use lb_core::MapOp;
use regex::Regex;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

pub use events::EventSink;
pub use interfaces::{
    interfaces_to_attach, nodeport_addrs, parse_cidrs, parse_port_range, uplink_addrs,
};

use crate::dataplane::cgroup;
use crate::dataplane::conntrack_gc;
use crate::dataplane::netlink;
use crate::dataplane::sockets::SocketReaper;
use crate::dataplane::{self, error_chain, DatapathMaps, Dataplane, MapSizes, Role, TcAttach};
use crate::observe::health::{self, ProxyHealth, ServiceHealthServers};
use crate::observe::metrics::{self, Metrics};
use crate::observe::views;
use crate::source::cluster::ClusterSource;
use crate::source::manifest::ManifestSource;
use crate::source::{Changes, Source};

/// Plans with at least this many ops update the planner's mirror alongside
/// the map writes instead of after them.
const MIRROR_ALONGSIDE: usize = 10_000;

/// What the agent is told on its command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name (endpoints with this nodeName are local).
    pub node_name: String,
    pub bpffs: PathBuf,
    /// Uplinks by name; empty: the interfaces of the default route.
    pub uplinks: Vec<String>,
    /// Pods' host-side interfaces.
    pub pod_pattern: Regex,
    /// NodePorts answer only on addresses inside these (empty: all).
    pub nodeport_cidrs: Vec<Ipv4Net>,
    /// Globals of the datapath (conntrack lifetimes, SNAT ports, cluster
    /// CIDR, hairpin address). `netns_cookie` is the agent's to fill in: its
    /// own network namespace's when socket LB is on.
    pub datapath: DatapathConfig,
    /// F2: socket-level load balancing for host-network processes.
    pub socket_lb: SocketLb,
    /// Capacities of the maps.
    pub map_sizes: MapSizes,
    /// How the TC programs are attached: TCX, clsact filters, or TCX where
    /// the kernel has it.
    pub tc_attach: TcAttach,
    /// `/healthz`, `/livez`; empty disables.
    pub healthz_bind_address: String,
    /// `/metrics`, `/proxyMode`; empty disables.
    pub metrics_bind_address: String,
    /// Metrics refresh and no-op sync; the health timeout is twice this.
    pub sync_period: Duration,
    /// Manifest mode: how often the file is re-read. Interfaces are
    /// re-checked on netlink events and at this period (at most every 5 s
    /// in cluster mode).
    pub poll_interval: Duration,
    pub conntrack_gc_interval: Duration,
    /// `--monitor` and `--datapath-debug-log`.
    pub observe: crate::dataplane::Observe,
}

/// F2: which processes get socket-level load balancing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketLb {
    Off,
    /// Every process of the machine's cgroup v2 hierarchy (found in
    /// /proc/self/mountinfo), limited to this node's network namespace.
    CgroupRoot,
    /// The processes of this cgroup v2 directory (tests: one per emulated
    /// node).
    Cgroup(PathBuf),
}

/// Where the desired state comes from.
pub enum Mode {
    /// Service and EndpointSlice documents from a file, polled.
    Manifest(PathBuf),
    /// The Kubernetes API server.
    Cluster {
        client: kube::Client,
        watch_timeout: Duration,
    },
}

/// Runs the agent until SIGTERM or SIGINT. Programs stay attached and maps
/// pinned when it returns: the next agent adopts them.
pub async fn run(settings: Settings, mode: Mode) -> Result<()> {
    // First of all: a SIGTERM while the agent starts (a rollout that moves
    // on quickly) must stop it cleanly, not kill it half way.
    let signals = Signals {
        term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
    };
    let metrics = Metrics::new();
    let health = ProxyHealth::new(2 * settings.sync_period);
    let (source, events, poll) = match mode {
        Mode::Manifest(path) => {
            metrics.set_agent_source("manifest");
            let source = ManifestSource::new(path, settings.node_name.clone());
            (Source::Manifest(source), None, settings.poll_interval)
        }
        Mode::Cluster {
            client,
            watch_timeout,
        } => {
            metrics.set_agent_source("cluster");
            let events = EventSink::new(client.clone(), &settings.node_name);
            let source = ClusterSource::start(client, &settings.node_name, watch_timeout);
            let poll = settings.poll_interval.max(Duration::from_secs(5));
            (Source::Cluster(source), Some(events), poll)
        }
    };
    // Load and attach first: a node whose datapath cannot load is not healthy.
    let mut agent = Agent::new(settings, metrics, health, events)?;
    agent.serve_http().await?;
    let changed = Arc::new(Notify::new());
    spawn_netlink_watcher(changed.clone())?;
    let ticks = Ticks::new(
        poll,
        agent.settings.conntrack_gc_interval,
        agent.settings.sync_period,
    );
    let result = agent.run(source, ticks, changed, signals).await;
    info!(bpffs = %agent.settings.bpffs.display(), "stopping; programs stay attached and maps stay pinned for the next agent");
    result
}

/// `lb-agent --cleanup`: detach and unpin everything under `bpffs`.
pub fn cleanup(bpffs: &std::path::Path) -> Result<()> {
    dataplane::cleanup(bpffs).with_context(|| format!("cleaning up {}", bpffs.display()))
}

/// The signals that stop the agent, registered before anything else.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Periodic work of the loop.
struct Ticks {
    poll: tokio::time::Interval,
    gc: tokio::time::Interval,
    refresh: tokio::time::Interval,
}

impl Ticks {
    fn new(poll: Duration, gc: Duration, refresh: Duration) -> Self {
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

/// The conntrack garbage collector on a thread of its own: a pass every
/// `interval` ([`conntrack_gc::gc_pass`]), so that a pass over a map of a
/// million entries never delays the control loop. It has its own handle on
/// the pinned conntrack map. Dropping this stops the thread (at once when
/// it waits; after its pass when it runs one).
struct ConntrackGc {
    _stop: std::sync::mpsc::Sender<()>,
}

impl ConntrackGc {
    fn spawn(
        mut maps: DatapathMaps<MapData>,
        cfg: lb_common::DatapathConfig,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || loop {
                match stopped.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                match conntrack_gc::gc_pass(&mut maps, &cfg, views::boottime_ns()) {
                    Ok(p) => {
                        metrics.observe_conntrack_gc(
                            p.entries as u64,
                            p.deleted as u64,
                            p.duration,
                        );
                        debug!(
                            deleted = p.deleted,
                            total = p.entries,
                            ms = p.duration.as_millis() as u64,
                            "conntrack GC pass"
                        );
                    }
                    Err(e) => warn!(error = %error_chain(&e), "conntrack GC pass failed"),
                }
            })
            .context("starting the conntrack GC thread")?;
        Ok(Self { _stop: stop })
    }
}

/// Wakes the loop when links or addresses change (a pod's veth appears).
fn spawn_netlink_watcher(changed: Arc<Notify>) -> Result<()> {
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

/// Changes waiting to be programmed.
#[derive(Default)]
struct Pending {
    /// When the oldest change not yet programmed was seen.
    since: Option<Instant>,
    /// The earliest EndpointSlice trigger time among them.
    trigger: Option<SystemTime>,
    /// A full diff is due (the first one, or a failed plan is redone whole).
    full: bool,
    /// The NodePort addresses changed.
    node_addrs: bool,
}

/// The agent's state between iterations of its loop.
struct Agent {
    settings: Settings,
    dp: Dataplane,
    datapath_maps: DatapathMaps<MapData>,
    /// The conntrack GC's thread: stops when this is dropped.
    _conntrack_gc: ConntrackGc,
    planner: Planner,
    node_addrs: BTreeSet<Ipv4Addr>,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    health_servers: ServiceHealthServers,
    events: Option<EventSink>,
    pending: Pending,
    /// F2 + E4: destroys connected UDP sockets of the node whose backend
    /// left (socket LB on).
    sockets: Option<SocketReaper>,
    /// An apply failed part way: rebuild the mirror from the maps first.
    needs_resync: bool,
    pruned_stale_pins: bool,
    ready_logged: bool,
    generation: u64,
}

impl Agent {
    fn new(
        mut settings: Settings,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
        events: Option<EventSink>,
    ) -> Result<Self> {
        // F2: the socket hooks translate the sockets of this network
        // namespace only, the node's (the agent runs with hostNetwork).
        let cgroup = match &settings.socket_lb {
            SocketLb::Off => None,
            SocketLb::CgroupRoot => Some(
                cgroup::find_cgroup2_root().context("finding the cgroup v2 root for socket LB")?,
            ),
            SocketLb::Cgroup(dir) => Some(dir.clone()),
        };
        settings.datapath.netns_cookie = if cgroup.is_some() {
            cgroup::own_netns_cookie().context(
                "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+) for \
                 socket LB; --no-socket-lb runs without it",
            )?
        } else {
            0
        };
        let mut dp = Dataplane::load(
            &settings.bpffs,
            &settings.datapath,
            &settings.map_sizes,
            &settings.observe,
            settings.tc_attach,
        )
        .with_context(|| format!("loading the datapath into {}", settings.bpffs.display()))?;
        match dp
            .sync_socket_lb(cgroup.as_deref())
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
            .context("setting up socket-level load balancing (F2; --no-socket-lb turns it off)")?
        {
            Some(a) => info!(
                cgroup = %a.cgroup.display(),
                netns_cookie = settings.datapath.netns_cookie,
                "socket LB for host-network processes {}",
                if a.adopted {
                    "adopted pinned cgroup links (programs swapped in place)"
                } else {
                    "attached to the cgroup"
                }
            ),
            None => info!("socket LB off: host-network processes reach no Service"),
        }
        let sockets = match &cgroup {
            Some(_) => Some(
                SocketReaper::open(&settings.bpffs).context("opening the socket rev-NAT map")?,
            ),
            None => None,
        };
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
        let conntrack_gc = ConntrackGc::spawn(
            DatapathMaps::open_pinned(&settings.bpffs).context("opening the conntrack map")?,
            settings.datapath,
            settings.conntrack_gc_interval,
            metrics.clone(),
        )?;
        Ok(Self {
            dp,
            datapath_maps,
            _conntrack_gc: conntrack_gc,
            planner: Planner::adopt(applied, settings.map_sizes.planner_limits()),
            node_addrs: BTreeSet::new(),
            health_servers: ServiceHealthServers::new(health.clone(), Vec::new()),
            metrics,
            health,
            events,
            pending: Pending {
                full: true,
                ..Pending::default()
            },
            settings,
            sockets,
            needs_resync: false,
            pruned_stale_pins: false,
            ready_logged: false,
            generation: 0,
        })
    }

    /// Binds the health (/healthz, /livez) and metrics (/metrics,
    /// /proxyMode) servers; an empty address disables one.
    async fn serve_http(&self) -> Result<()> {
        let healthz = &self.settings.healthz_bind_address;
        if !healthz.is_empty() {
            let l = tokio::net::TcpListener::bind(healthz)
                .await
                .with_context(|| format!("--healthz-bind-address {healthz}"))?;
            info!(address = %healthz, "serving /healthz and /livez");
            tokio::spawn(health::serve_health(l, self.health.clone()));
        }
        let addr = &self.settings.metrics_bind_address;
        if !addr.is_empty() {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-bind-address {addr}"))?;
            info!(address = %addr, "serving /metrics and /proxyMode");
            tokio::spawn(metrics::serve_metrics(l, self.metrics.clone()));
        }
        Ok(())
    }

    async fn run(
        &mut self,
        mut source: Source,
        mut ticks: Ticks,
        changed: Arc<Notify>,
        signals: Signals,
    ) -> Result<()> {
        let Signals { mut term, mut int } = signals;
        let mut connected = !source.is_cluster();
        self.metrics.set_apiserver_connected(connected);
        loop {
            tokio::select! {
                batch = source.recv() => {
                    let Some(batch) = batch else { anyhow::bail!("the watchers stopped") };
                    if let Some(node) = &batch.node {
                        // A1: /healthz turns 503 while this node is being deleted.
                        self.health.sync_node(node);
                    }
                    if let Some(c) = batch.connected {
                        if c != connected {
                            connected = c;
                            self.metrics.set_apiserver_connected(c);
                            if c {
                                info!("API server reachable");
                            }
                        }
                    }
                    if batch.changed {
                        self.queued(batch.trigger);
                    }
                }
                _ = ticks.poll.tick() => {
                    if source.poll() {
                        self.queued(None);
                    }
                }
                _ = changed.notified() => debug!("netlink change"),
                _ = ticks.gc.tick() => { self.collect_conntrack(); continue; }
                _ = ticks.refresh.tick() => {
                    self.refresh_metrics();
                    // Nothing pending and in contact: record a (no-op) sync, as
                    // kube-proxy's periodic sync does, so lastUpdated advances.
                    if connected && self.pending.since.is_none() && source.synced() {
                        self.health.updated();
                    }
                    continue;
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            match self.reconcile_interfaces() {
                Ok(addrs_changed) => self.pending.node_addrs |= addrs_changed,
                Err(e) => error!(
                    error = format!("{e:#}"),
                    "interface sync failed; will retry"
                ),
            }
            if !source.synced() {
                continue; // never program from half a picture
            }
            let changes = source.take_changes();
            self.report_rejected(&changes);
            if !changes.full
                && changes.ports.is_empty()
                && !self.pending.full
                && !self.pending.node_addrs
            {
                if self.pending.since.take().is_some() {
                    // Events that changed nothing count as programmed.
                    self.pending.trigger = None;
                    self.health.updated();
                }
                continue;
            }
            // A change of node addresses is rare and touches every port whose
            // source ranges let the node through (F7): a full diff.
            let full = changes.full || self.pending.full || self.pending.node_addrs;
            let scope = if full {
                Scope::Full
            } else {
                Scope::Ports(&changes.ports)
            };
            match self.program(source.desired(), scope, &changes) {
                Ok(rejected) => {
                    self.pending = Pending::default();
                    self.report_plan_errors(&source, &rejected);
                    for e in self.health_servers.sync(&source.health_checks()).await {
                        warn!("{e}");
                    }
                }
                Err(e) => {
                    // Whatever the failed plan covered is redone as a full diff.
                    self.pending.full = true;
                    self.pending.since.get_or_insert_with(Instant::now);
                    error!(error = format!("{e:#}"), "map sync failed; will retry");
                }
            }
        }
        Ok(())
    }

    /// A change arrived (kube-proxy `QueuedUpdate`).
    fn queued(&mut self, trigger: Option<SystemTime>) {
        self.pending.since.get_or_insert_with(Instant::now);
        if let Some(t) = trigger {
            self.pending.trigger = Some(self.pending.trigger.map_or(t, |p| p.min(t)));
        }
        self.health.queued_update();
        self.metrics.set_last_queued(SystemTime::now());
    }

    /// Plans `scope` and executes the plan. Returns what the plan refused
    /// that no earlier plan did.
    fn program(
        &mut self,
        desired: &dyn DesiredPorts,
        scope: Scope<'_>,
        changes: &Changes,
    ) -> Result<Vec<PlanError>> {
        if self.needs_resync {
            let contents = self.dp.maps.read_contents().context("re-reading maps")?;
            self.planner = Planner::adopt(contents, *self.planner.limits());
            self.needs_resync = false;
        }
        let t_plan = Instant::now();
        let plan = self
            .planner
            .plan(desired, &self.node_addrs, scope)
            .context("planning")?;
        if plan.full {
            info!(
                services_touched = changes.services_touched,
                service_ports = plan.ports_planned,
                plan_ms = t_plan.elapsed().as_secs_f64() * 1e3,
                "full diff planned"
            );
        }
        self.execute(&plan)?;
        Ok(plan.new_errors)
    }

    /// Executes a plan and records it (metrics, health, log).
    fn execute(&mut self, plan: &Plan) -> Result<()> {
        for e in &plan.new_errors {
            error!("{e}");
        }
        // E4 (socket LB): the backends this plan deletes or rewrites, as they
        // were; those that leave their service port are swept below.
        let touched: Vec<(u32, lb_common::BackendValue)> = match &self.sockets {
            Some(_) => {
                let before = &self.planner.contents().backends;
                plan.ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::PutBackend(id, _) | MapOp::DeleteBackend(id) => {
                            before.get(id).map(|b| (*id, *b))
                        }
                        _ => None,
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let t0 = Instant::now();
        let maps = &mut self.dp.maps;
        let planner = &mut self.planner;
        let written = if plan.ops.len() >= MIRROR_ALONGSIDE {
            // A big plan (the first one): the maps are written on another
            // thread (nearly all kernel time) while this one brings the
            // planner's mirror up to date (its allocations stay in this
            // thread's malloc arena). If a write fails the mirror is thrown
            // away below (resync), as it would be if it had not been touched.
            std::thread::scope(|s| {
                let writer = s.spawn(|| maps.apply_all(&plan.ops));
                for op in &plan.ops {
                    planner.apply(op);
                }
                writer
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
        } else {
            let r = maps.apply_all(&plan.ops);
            if r.is_ok() {
                for op in &plan.ops {
                    planner.apply(op);
                }
            }
            r
        };
        if let Err(e) = written {
            // Some of the plan may be in the maps: re-read them before the
            // next plan.
            self.needs_resync = true;
            anyhow::bail!("map writes failed: {}", error_chain(&e));
        }
        self.metrics.observe_sync(t0.elapsed());
        self.health.updated();
        if let Some(reaper) = &mut self.sockets {
            if reaper.note_left(&touched, &self.planner.contents().backends) {
                self.destroy_stale_udp_sockets();
            }
        }
        let n = plan.ops.len();
        if n > 0 {
            self.generation += 1;
            self.metrics
                .add_service_changes(plan.service_changes as u64);
            self.metrics
                .add_endpoint_changes(plan.endpoint_changes as u64);
            // kube-proxy's network programming latency: from the EndpointSlice
            // controller's trigger time when there is one, else from when
            // the agent saw the change.
            let latency = match self.pending.trigger {
                Some(t) => SystemTime::now().duration_since(t).unwrap_or_default(),
                None => self.pending.since.map(|s| s.elapsed()).unwrap_or_default(),
            };
            self.metrics.observe_network_programming(latency);
            info!(
                generation = self.generation,
                scope = if plan.full { "full" } else { "ports" },
                service_ports = plan.ports_planned,
                map_writes = n,
                service_changes = plan.service_changes,
                endpoint_changes = plan.endpoint_changes,
                elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
                "maps updated"
            );
        }
        // Ready once the whole desired state has been programmed.
        if !self.ready_logged && plan.full {
            self.ready_logged = true;
            info!(
                frontends = self.planner.contents().services.len(),
                "lb-agent ready"
            );
        }
        Ok(())
    }

    /// Objects the model rejected: a log line, a metric, an Event.
    fn report_rejected(&self, changes: &Changes) {
        for r in &changes.rejected {
            warn!(object = %format!("{}/{}", r.object.namespace, r.object.name), "{}", r.error);
            self.metrics.inc_rejected_object(r.kind.as_str());
            if let Some(events) = &self.events {
                events.warn(r.kind, &r.object, &r.error.to_string());
            }
        }
    }

    /// The planner's new rejections (a frontend taken, no room, too many
    /// backends): a metric and an Event on their Service, once per change.
    fn report_plan_errors(&self, source: &Source, rejected: &[PlanError]) {
        for e in rejected {
            let Some(port) = e.port() else { continue };
            self.metrics.inc_rejected_object("Service");
            if let (Some(events), Some(object)) =
                (&self.events, source.service_object(&port.service()))
            {
                events.warn(ObjectKind::Service, object, &e.to_string());
            }
        }
    }

    /// Attaches to new uplinks and pod interfaces, lets go of the gone ones,
    /// refreshes the uplink SNAT addresses and the NodePort addresses.
    /// Returns whether the NodePort addresses changed.
    fn reconcile_interfaces(&mut self) -> Result<bool> {
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

    /// E4 for the node's connected UDP sockets: destroys those socket LB
    /// sent to a backend that left its service (`dataplane::sockets`). Run
    /// after every plan that took endpoints out and on the GC tick.
    fn destroy_stale_udp_sockets(&mut self) {
        let Some(reaper) = &mut self.sockets else {
            return;
        };
        match reaper.destroy_stale_udp(&self.planner.contents().backends) {
            Ok(r) if r.destroyed > 0 => info!(
                destroyed = r.destroyed,
                checked = r.checked,
                "connected UDP sockets moved off removed backends"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot list or destroy stale UDP sockets (E4); will retry")
            }
        }
    }

    /// Periodic socket cleanup (E4). Idle conntrack entries are deleted
    /// by [`ConntrackGc`] on its own thread.
    fn collect_conntrack(&mut self) {
        self.destroy_stale_udp_sockets();
    }

    /// Datapath counters and map fill into the metrics.
    fn refresh_metrics(&mut self) {
        match self.datapath_maps.stats() {
            Ok(s) => self.metrics.set_datapath_counters(&s),
            Err(e) => debug!(error = %error_chain(&e), "reading counters"),
        }
        // The maps' real capacities (the planner fills at most 7/8 of them).
        let c = self.planner.contents();
        let sizes = &self.settings.map_sizes;
        for (map, entries, capacity) in [
            (
                lb_common::map_names::SERVICES,
                c.services.len(),
                sizes.frontends,
            ),
            (
                lb_common::map_names::BACKENDS,
                c.backends.len(),
                sizes.backends,
            ),
            (
                lb_common::map_names::BACKEND_SLOTS,
                c.slots.len(),
                sizes.backend_slots,
            ),
            (
                lb_common::map_names::SOURCE_RANGES,
                c.source_ranges.len(),
                sizes.source_ranges,
            ),
        ] {
            self.metrics
                .set_map_fill(map, entries as u64, u64::from(capacity));
        }
    }
}
