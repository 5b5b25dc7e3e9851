//! lb-agent: keeps this node's BPF maps equal to the desired state.
//!
//! Manifest mode: `lb-agent --manifest FILE --node-name NAME`. The file holds
//! Service and EndpointSlice documents; it is polled, and every change is
//! applied as a diff. Interfaces are attached as they appear (netlink).

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnet::Ipv4Net;
use lb_common::DatapathConfig;
use lb_userspace::agent::{interfaces_to_attach, nodeport_addrs, parse_cidrs, uplink_addrs};
use lb_userspace::dataplane::{self, DatapathMaps, Dataplane};
use lb_userspace::state::{DesiredState, MapContents};
use lb_userspace::{conntrack_gc, inspect, manifest, model, netlink, sync};
use regex::Regex;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "lb node agent: an eBPF replacement for kube-proxy"
)]
struct Args {
    /// Kubernetes YAML with Service and EndpointSlice documents (manifest mode).
    #[arg(long, value_name = "FILE", required_unless_present = "cleanup")]
    manifest: Option<PathBuf>,
    /// This node's name (endpoints with this nodeName are local).
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// Uplink interface (repeatable). Default: the interfaces of the default route.
    #[arg(long = "uplink", value_name = "IFACE")]
    uplinks: Vec<String>,
    /// Pod interfaces: host-side veths whose name matches this regex.
    #[arg(long, default_value = "^(veth|lxc|cali)")]
    pod_iface_pattern: String,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = dataplane::DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// Comma-separated CIDRs: NodePorts answer only on local addresses inside
    /// them (default: every non-loopback IPv4 address of the node).
    #[arg(long, value_name = "CIDR,...")]
    nodeport_addresses: Option<String>,
    /// How often the manifest and the interfaces are re-checked.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Idle timeout of an established TCP flow (kube-proxy's
    /// --conntrack-tcp-timeout-established).
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    conntrack_tcp_established_timeout: Duration,
    /// Idle timeout of a TCP flow that is opening or closing.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    conntrack_tcp_transient_timeout: Duration,
    /// Idle timeout of a UDP flow (kube-proxy's --conntrack-udp-timeout).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// How often idle conntrack entries are deleted.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    conntrack_gc_interval: Duration,
    /// Detach and unpin everything under --bpffs, then exit.
    #[arg(long)]
    cleanup: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration {s:?}: use e.g. 500ms, 30s, 5m or 6h")),
    }
}

/// Everything the loop keeps between rounds.
struct Agent {
    dp: Dataplane,
    manifest: PathBuf,
    node_name: String,
    uplinks_flag: Vec<String>,
    pod_pattern: Regex,
    nodeport_cidrs: Vec<Ipv4Net>,
    /// Hash of the manifest text last parsed (None: never read successfully).
    manifest_hash: Option<u64>,
    desired: Option<DesiredState>,
    node_addrs: BTreeSet<Ipv4Addr>,
    /// Mirror of the agent-owned maps, kept exact by applying the same ops.
    applied: MapContents,
    /// The last apply failed part way: re-read the maps and plan again.
    needs_resync: bool,
    ready_logged: bool,
    pruned_stale_pins: bool,
    last_read_error: Option<String>,
    generation: u64,
}

impl Agent {
    fn reconcile_interfaces(&mut self) -> Result<()> {
        let links = netlink::list_links().context("listing interfaces")?;
        let uplinks: BTreeSet<String> = if self.uplinks_flag.is_empty() {
            let idx = netlink::default_route_interfaces().context("listing routes")?;
            links
                .iter()
                .filter(|l| idx.contains(&l.index))
                .map(|l| l.name.clone())
                .collect()
        } else {
            for u in &self.uplinks_flag {
                if !links.iter().any(|l| &l.name == u) {
                    warn!(uplink = %u, "uplink interface does not exist (yet)");
                }
            }
            self.uplinks_flag.iter().cloned().collect()
        };
        let want = interfaces_to_attach(&links, &uplinks, &self.pod_pattern);
        for e in self.dp.sync_interfaces(&want) {
            error!(error = %dataplane::error_chain(&e), "attach failed; will retry");
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
        let node_addrs = nodeport_addrs(&addrs, &self.nodeport_cidrs);
        if node_addrs != self.node_addrs {
            info!(addresses = ?node_addrs, "NodePort addresses");
            self.node_addrs = node_addrs;
        }
        Ok(())
    }

    /// Re-reads the manifest when it changed. A file that does not parse, or
    /// whose objects the model rejects, changes nothing: the previous state stays.
    fn reconcile_manifest(&mut self) {
        let text = match std::fs::read_to_string(&self.manifest) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                if self.last_read_error.as_ref() != Some(&msg) {
                    error!(manifest = %self.manifest.display(), error = %msg, "cannot read manifest; keeping the current state");
                    self.last_read_error = Some(msg);
                }
                return;
            }
        };
        self.last_read_error = None;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if self.manifest_hash == Some(hash) {
            return;
        }
        self.manifest_hash = Some(hash);
        match compute_desired(&text, &self.node_name) {
            Ok(d) => {
                info!(manifest = %self.manifest.display(), service_ports = d.services.len(), "manifest loaded");
                self.desired = Some(d);
            }
            Err(errors) => {
                for e in &errors {
                    error!(manifest = %self.manifest.display(), "{e}");
                }
                error!(manifest = %self.manifest.display(), errors = errors.len(), "manifest rejected; keeping the current state");
            }
        }
    }

    fn reconcile_maps(&mut self) -> Result<()> {
        let Some(desired) = &self.desired else {
            return Ok(());
        };
        if self.needs_resync {
            self.applied = self.dp.maps.read_contents().context("re-reading maps")?;
            self.needs_resync = false;
        }
        let start = Instant::now();
        let plan =
            sync::plan(&self.applied, desired, &self.node_addrs).context("planning map updates")?;
        for e in &plan.errors {
            error!("{e}");
        }
        if plan.ops.is_empty() {
            self.log_ready();
            return Ok(());
        }
        let n = plan.ops.len();
        for op in &plan.ops {
            if let Err(e) = self.dp.maps.apply(op) {
                self.needs_resync = true;
                bail!("map write {op:?} failed: {e}");
            }
            op.apply_to(&mut self.applied);
        }
        self.generation += 1;
        info!(
            generation = self.generation,
            map_writes = n,
            service_changes = plan.service_changes,
            endpoint_changes = plan.endpoint_changes,
            elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
            "maps updated"
        );
        self.log_ready();
        Ok(())
    }

    fn log_ready(&mut self) {
        if !self.ready_logged {
            self.ready_logged = true;
            info!(frontends = self.applied.services.len(), "lb-agent ready");
        }
    }

    fn reconcile(&mut self) {
        if let Err(e) = self.reconcile_interfaces() {
            error!(
                error = format!("{e:#}"),
                "interface sync failed; will retry"
            );
        }
        self.reconcile_manifest();
        if let Err(e) = self.reconcile_maps() {
            error!(error = format!("{e:#}"), "map sync failed; will retry");
        }
    }
}

/// Manifest text -> desired state, or every error found (document, field).
fn compute_desired(text: &str, node_name: &str) -> Result<DesiredState, Vec<String>> {
    let objects = manifest::parse_manifest(text).map_err(|e| vec![e.to_string()])?;
    for ignored in &objects.ignored {
        debug!(object = %ignored, "ignoring object of a kind lb does not use");
    }
    let node = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let ctx = model::NodeContext::with_node(node_name, node);
    let out = model::desired_state(&ctx, &objects.services, &objects.endpoint_slices);
    if out.errors.is_empty() {
        Ok(out.state)
    } else {
        Err(out.errors.iter().map(ToString::to_string).collect())
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.cleanup {
        return dataplane::cleanup(&args.bpffs)
            .with_context(|| format!("cleaning up {}", args.bpffs.display()));
    }
    let (Some(manifest), Some(node_name)) = (args.manifest.clone(), args.node_name.clone()) else {
        bail!("--manifest and --node-name are required");
    };
    let pod_pattern = Regex::new(&args.pod_iface_pattern)
        .with_context(|| format!("--pod-iface-pattern {:?}", args.pod_iface_pattern))?;
    let nodeport_cidrs = match &args.nodeport_addresses {
        Some(s) => parse_cidrs(s).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args, manifest, node_name, pod_pattern, nodeport_cidrs))
}

async fn run(
    args: Args,
    manifest: PathBuf,
    node_name: String,
    pod_pattern: Regex,
    nodeport_cidrs: Vec<Ipv4Net>,
) -> Result<()> {
    let config = DatapathConfig {
        ct_tcp_established_ns: args.conntrack_tcp_established_timeout.as_nanos() as u64,
        ct_tcp_transient_ns: args.conntrack_tcp_transient_timeout.as_nanos() as u64,
        ct_udp_ns: args.conntrack_udp_timeout.as_nanos() as u64,
        ..DatapathConfig::DEFAULT
    };
    let dp = Dataplane::load(&args.bpffs, &config)
        .with_context(|| format!("loading the datapath into {}", args.bpffs.display()))?;
    // Start from what is in the maps (an earlier agent's work): the first
    // apply is a diff against it, never a flush.
    let applied = dp.maps.read_contents().context("reading pinned maps")?;
    info!(
        frontends = applied.services.len(),
        backends = applied.backends.len(),
        "adopted existing map contents"
    );
    let mut agent = Agent {
        dp,
        manifest,
        node_name,
        uplinks_flag: args.uplinks.clone(),
        pod_pattern,
        nodeport_cidrs,
        manifest_hash: None,
        desired: None,
        node_addrs: BTreeSet::new(),
        applied,
        needs_resync: false,
        ready_logged: false,
        pruned_stale_pins: false,
        last_read_error: None,
        generation: 0,
    };

    let changed = Arc::new(Notify::new());
    spawn_netlink_watcher(changed.clone())?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut datapath_maps =
        DatapathMaps::open_pinned(&args.bpffs).context("opening the conntrack map")?;
    let mut tick = tokio::time::interval(args.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc_tick = tokio::time::interval(args.conntrack_gc_interval);
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = changed.notified() => debug!("netlink change"),
            _ = gc_tick.tick() => {
                collect_conntrack(&mut datapath_maps, &config);
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        agent.reconcile();
    }
    info!(bpffs = %args.bpffs.display(), "stopping; programs stay attached and maps stay pinned for the next agent");
    Ok(())
}

/// Deletes idle conntrack entries (both directions of a flow together).
fn collect_conntrack(maps: &mut DatapathMaps<aya::maps::MapData>, config: &DatapathConfig) {
    let entries = match maps.conntrack_entries() {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %dataplane::error_chain(&e), "conntrack scan failed");
            return;
        }
    };
    let expired = conntrack_gc::expired_keys(&entries, config, inspect::boottime_ns());
    if expired.is_empty() {
        return;
    }
    match maps.delete_conntrack(&expired) {
        Ok(n) => debug!(
            deleted = n,
            total = entries.len(),
            "conntrack entries expired"
        ),
        Err(e) => warn!(error = %dataplane::error_chain(&e), "conntrack cleanup failed"),
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
