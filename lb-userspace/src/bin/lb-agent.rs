//! lb-agent: keeps this node's BPF maps equal to the desired state.
//!
//! Cluster mode (default): watches Services, EndpointSlices and its Node on
//! the API server (`--kubeconfig`, $KUBECONFIG, or the in-cluster service
//! account). Manifest mode: `--manifest FILE` with Service and EndpointSlice
//! documents, polled. The loop of both is `lb_userspace::agent`; this file
//! only reads the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use lb_common::DatapathConfig;
use lb_userspace::agent::{self, parse_cidrs, Mode, Settings, SocketLb};
use lb_userspace::dataplane::{self, MapSizes, TcAttach};
use regex::Regex;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "lb node agent: an eBPF replacement for kube-proxy"
)]
struct Args {
    /// Cluster mode: kubeconfig to reach the API server. Without it and
    /// without --manifest: $KUBECONFIG, then the in-cluster service account.
    #[arg(long, env = "KUBECONFIG", value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Manifest mode: Kubernetes YAML with Service and EndpointSlice
    /// documents (takes precedence over --kubeconfig and $KUBECONFIG).
    #[arg(long, value_name = "FILE")]
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
    /// How the TC programs are attached: tcx (pinned TCX links, Linux 6.6+),
    /// netlink (clsact bpf filters at pref 1 handle 0x4c42, which stay
    /// attached when the agent exits and are replaced in place by the next
    /// one), or auto (tcx where the kernel has it, netlink elsewhere).
    #[arg(long, default_value = "auto", value_name = "auto|tcx|netlink")]
    tc_attach: TcAttach,
    /// Comma-separated CIDRs: NodePorts answer only on local addresses inside
    /// them (default: every non-loopback IPv4 address of the node).
    #[arg(long, value_name = "CIDR,...")]
    nodeport_addresses: Option<String>,
    /// The cluster's pod CIDR(s), kube-proxy's --cluster-cidr: traffic to a
    /// ClusterIP from outside it is SNAT'ed to the node (M1). Without it,
    /// such traffic keeps its source, as with kube-proxy.
    #[arg(long, value_name = "CIDR,...")]
    cluster_cidr: Option<String>,
    /// The source address a pod sees when it reaches itself through its own
    /// Service (M4 hairpin). A link-local address nothing owns; pods route
    /// it to their gateway.
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_address: std::net::Ipv4Addr,
    /// cgroup v2 directory whose processes get socket-level load balancing
    /// (F2: host-network clients). Default: the cgroup v2 root of this
    /// machine, found in /proc/self/mountinfo.
    #[arg(long, value_name = "DIR")]
    cgroup_path: Option<PathBuf>,
    /// Turn socket-level load balancing off (host-network clients then reach
    /// no Service).
    #[arg(long)]
    no_socket_lb: bool,
    /// Capacity of LB_SERVICES: frontends (ClusterIPs, NodePorts, externalIPs
    /// and LB IPs times their ports). The planner keeps an eighth free.
    #[arg(long, default_value_t = lb_common::MAX_SERVICES)]
    max_frontends: u32,
    /// Capacity of LB_BACKENDS: endpoints of all service ports.
    #[arg(long, default_value_t = lb_common::MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of LB_BACKEND_SLOTS: endpoints of all service ports, per set.
    #[arg(long, default_value_t = lb_common::MAX_BACKEND_SLOTS)]
    max_backend_slots: u32,
    /// Capacity of LB_CONNTRACK (LRU, two entries per flow).
    #[arg(long, default_value_t = lb_common::MAX_CONNTRACK)]
    max_conntrack: u32,
    /// Capacity of LB_AFFINITY (LRU, one entry per client and service port).
    #[arg(long, default_value_t = lb_common::MAX_AFFINITY)]
    max_affinity: u32,
    /// Capacity of LB_SOURCE_RANGES (loadBalancerSourceRanges of all Services).
    #[arg(long, default_value_t = lb_common::MAX_SOURCE_RANGES)]
    max_source_ranges: u32,
    /// Capacity of LB_SOCK_REVNAT (LRU, host-network sockets socket LB sent
    /// to a backend).
    #[arg(long, default_value_t = lb_common::MAX_SOCK_REVNAT)]
    max_host_sockets: u32,
    /// /healthz and /livez (kube-proxy compatible); empty disables.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// /metrics and /proxyMode; empty disables.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    /// Idle timeout of an established TCP flow (kube-proxy's
    /// --conntrack-tcp-timeout-established).
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    conntrack_tcp_established_timeout: Duration,
    /// Idle timeout of a TCP flow that is opening or closing.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    conntrack_tcp_transient_timeout: Duration,
    /// Idle timeout of a UDP flow (kube-proxy's --conntrack-udp-timeout).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    conntrack_udp_timeout: Duration,
    /// How often idle conntrack entries are deleted.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    conntrack_gc_interval: Duration,
    /// Period of the metrics refresh and of the no-op sync that keeps
    /// /healthz's lastUpdated moving; /healthz turns 503 when a change has
    /// waited longer than twice this (kube-proxy's rule).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    sync_period: Duration,
    /// Manifest mode: how often the file and the interfaces are re-checked
    /// (cluster mode re-checks interfaces on netlink events and this period).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Datapath events (drops with their reason, rejects, new translations,
    /// conntrack evictions) into a ring buffer pinned under --bpffs, for
    /// `lbctl monitor`. Off: the verifier removes the code, no per-packet
    /// cost; changing it takes a restart.
    #[arg(long)]
    monitor: bool,
    /// Debug lines from the datapath (aya-log: each event above, as text),
    /// logged at debug level under the target `datapath` (add
    /// `--log-level=info,datapath=debug`). Off: no per-packet cost.
    #[arg(long)]
    datapath_debug_log: bool,
    /// Detach and unpin everything under --bpffs, then exit.
    #[arg(long)]
    cleanup: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.cleanup {
        return agent::cleanup(&args.bpffs);
    }
    let node_name = args
        .node_name
        .clone()
        .context("--node-name (or NODE_NAME) is required")?;
    let pod_pattern = Regex::new(&args.pod_iface_pattern)
        .with_context(|| format!("--pod-iface-pattern {:?}", args.pod_iface_pattern))?;
    let nodeport_cidrs = match &args.nodeport_addresses {
        Some(s) => parse_cidrs(s, "--nodeport-addresses").map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let cluster_cidr = match &args.cluster_cidr {
        Some(s) => parse_cidrs(s, "--cluster-cidr").map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    if cluster_cidr.len() > 1 {
        anyhow::bail!("--cluster-cidr: give one IPv4 CIDR (IPv6 is not supported yet)");
    }
    let (cluster_cidr_addr, cluster_cidr_mask) = cluster_cidr
        .first()
        .map(|n| {
            (
                lb_common::ipv4_to_net(n.network().octets()),
                lb_common::ipv4_to_net(n.netmask().octets()),
            )
        })
        .unwrap_or((0, 0));
    let map_sizes = MapSizes {
        frontends: args.max_frontends,
        backends: args.max_backends,
        backend_slots: args.max_backend_slots,
        conntrack: args.max_conntrack,
        affinity: args.max_affinity,
        source_ranges: args.max_source_ranges,
        host_sockets: args.max_host_sockets,
    };
    map_sizes
        .validate()
        .map_err(|e| anyhow::anyhow!("--max-*: {e}"))?;
    let settings = Settings {
        map_sizes,
        tc_attach: args.tc_attach,
        node_name,
        bpffs: args.bpffs.clone(),
        uplinks: args.uplinks.clone(),
        pod_pattern,
        nodeport_cidrs,
        datapath: DatapathConfig {
            ct_tcp_established_ns: args.conntrack_tcp_established_timeout.as_nanos() as u64,
            ct_tcp_transient_ns: args.conntrack_tcp_transient_timeout.as_nanos() as u64,
            ct_udp_ns: args.conntrack_udp_timeout.as_nanos() as u64,
            cluster_cidr_addr,
            cluster_cidr_mask,
            hairpin_addr: lb_common::ipv4_to_net(args.hairpin_address.octets()),
            ..DatapathConfig::DEFAULT
        },
        socket_lb: match (args.no_socket_lb, &args.cgroup_path) {
            (true, _) => SocketLb::Off,
            (false, None) => SocketLb::CgroupRoot,
            (false, Some(dir)) => SocketLb::Cgroup(dir.clone()),
        },
        healthz_bind_address: args.healthz_bind_address.clone(),
        metrics_bind_address: args.metrics_bind_address.clone(),
        sync_period: args.sync_period,
        poll_interval: args.poll_interval,
        conntrack_gc_interval: args.conntrack_gc_interval,
        observe: dataplane::Observe {
            events: args.monitor,
            debug_log: args.datapath_debug_log,
        },
    };
    // Two workers: the watchers decode lists (JSON) while the main loop
    // programs; more would only contend on a small node.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let mode = match args.manifest {
            Some(path) => Mode::Manifest(path),
            None => Mode::Cluster {
                client: kube_client(args.kubeconfig.as_deref()).await?,
                watch_timeout: Duration::from_secs(290),
            },
        };
        agent::run(settings, mode).await
    })
}

/// A client from `--kubeconfig` (also $KUBECONFIG), else in-cluster config.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no --kubeconfig and no in-cluster service account")?,
    };
    info!(server = %config.cluster_url, "cluster mode");
    kube::Client::try_from(config).context("creating the Kubernetes client")
}
