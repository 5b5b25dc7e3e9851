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
    /// Idle lifetime of an established TCP flow (kube-proxy's flag; its
    /// default, 24 h, is what kube-proxy sets on a node).
    #[arg(long, alias = "conntrack-tcp-established-timeout", default_value = "24h", value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle lifetime of a TCP flow closed in one direction after it was
    /// established (kube-proxy's flag and default, 1 h).
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle lifetime of a TCP flow whose opening packet was not answered
    /// yet [default: 120s, the kernel's].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_syn_sent: Option<Duration>,
    /// Idle lifetime of a TCP flow that was answered, handshake not
    /// complete [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_syn_recv: Option<Duration>,
    /// Idle lifetime of a TCP flow closed before its handshake completed
    /// [default: 120s].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_fin_wait: Option<Duration>,
    /// Idle lifetime of a TCP flow closed in both directions [default: 120s].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_time_wait: Option<Duration>,
    /// Idle lifetime of a reset TCP flow [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_close: Option<Duration>,
    /// Shorthand: the idle lifetime of every TCP state but established
    /// (syn-sent, syn-recv, fin-wait, close-wait, time-wait, close); a
    /// state's own flag wins over it.
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_transient_timeout: Option<Duration>,
    /// Idle lifetime of a UDP flow without a stream (kube-proxy's flag;
    /// default 30 s, the kernel's).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Idle lifetime of a UDP stream: a flow that was answered and is at
    /// least 2 s old (kube-proxy's flag; default 120 s, the kernel's).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    conntrack_udp_timeout_stream: Duration,
    /// Source ports of SNAT'ed flows and remapped client ports, MIN-MAX.
    /// Must not overlap the NodePort range (30000-32767).
    #[arg(long, default_value = "10000-29999", value_name = "MIN-MAX")]
    snat_port_range: String,
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
            cluster_cidr_addr,
            cluster_cidr_mask,
            hairpin_addr: lb_common::ipv4_to_net(args.hairpin_address.octets()),
            ..datapath_timeouts(&args)?
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

/// The conntrack lifetimes and the SNAT port range of the command line:
/// a state's own flag, else `--conntrack-tcp-transient-timeout` for the
/// TCP states but established, else the default.
fn datapath_timeouts(args: &Args) -> Result<DatapathConfig> {
    let d = DatapathConfig::DEFAULT;
    let ns = |flag: &str, v: Duration| -> Result<u64> {
        let n = u64::try_from(v.as_nanos()).ok().filter(|n| *n > 0);
        n.with_context(|| format!("--{flag}: must be more than 0 and less than 584 years"))
    };
    let transient = args.conntrack_tcp_transient_timeout;
    let state = |flag: &str, own: Option<Duration>, def: u64| -> Result<u64> {
        match own.or(transient) {
            Some(v) => ns(flag, v),
            None => Ok(def),
        }
    };
    let (snat_port_min, snat_port_max) =
        agent::parse_port_range(&args.snat_port_range, "--snat-port-range", NODE_PORT_RANGE)
            .map_err(anyhow::Error::msg)?;
    Ok(DatapathConfig {
        ct_tcp_syn_sent_ns: state(
            "conntrack-tcp-timeout-syn-sent",
            args.conntrack_tcp_timeout_syn_sent,
            d.ct_tcp_syn_sent_ns,
        )?,
        ct_tcp_syn_recv_ns: state(
            "conntrack-tcp-timeout-syn-recv",
            args.conntrack_tcp_timeout_syn_recv,
            d.ct_tcp_syn_recv_ns,
        )?,
        ct_tcp_established_ns: ns(
            "conntrack-tcp-timeout-established",
            args.conntrack_tcp_timeout_established,
        )?,
        ct_tcp_fin_wait_ns: state(
            "conntrack-tcp-timeout-fin-wait",
            args.conntrack_tcp_timeout_fin_wait,
            d.ct_tcp_fin_wait_ns,
        )?,
        ct_tcp_close_wait_ns: state(
            "conntrack-tcp-timeout-close-wait",
            args.conntrack_tcp_timeout_close_wait,
            d.ct_tcp_close_wait_ns,
        )?,
        ct_tcp_time_wait_ns: state(
            "conntrack-tcp-timeout-time-wait",
            args.conntrack_tcp_timeout_time_wait,
            d.ct_tcp_time_wait_ns,
        )?,
        ct_tcp_close_ns: state(
            "conntrack-tcp-timeout-close",
            args.conntrack_tcp_timeout_close,
            d.ct_tcp_close_ns,
        )?,
        ct_udp_ns: ns("conntrack-udp-timeout", args.conntrack_udp_timeout)?,
        ct_udp_stream_ns: ns(
            "conntrack-udp-timeout-stream",
            args.conntrack_udp_timeout_stream,
        )?,
        snat_port_min,
        snat_port_max,
        ..d
    })
}

/// The NodePort range the SNAT port range must stay out of: the API
/// server's default (--service-node-port-range), which lb does not read.
const NODE_PORT_RANGE: (u16, u16) = (30_000, 32_767);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<DatapathConfig> {
        let mut argv = vec!["lb-agent", "--node-name", "n1"];
        argv.extend_from_slice(extra);
        datapath_timeouts(&Args::try_parse_from(argv)?)
    }

    #[test]
    fn defaults_are_kube_proxys() {
        let c = parse(&[]).unwrap();
        assert_eq!(c, DatapathConfig::DEFAULT);
        assert_eq!(c.ct_tcp_established_ns, 86_400 * 1_000_000_000);
        assert_eq!(c.ct_tcp_close_wait_ns, 3_600 * 1_000_000_000);
        assert_eq!((c.snat_port_min, c.snat_port_max), (10_000, 29_999));
    }

    #[test]
    fn state_flags_win_over_the_transient_shorthand() {
        let c = parse(&[
            "--conntrack-tcp-transient-timeout=7s",
            "--conntrack-tcp-timeout-close=3s",
            "--conntrack-tcp-timeout-established=2h",
            "--conntrack-udp-timeout=5s",
            "--conntrack-udp-timeout-stream=9s",
        ])
        .unwrap();
        let s = 1_000_000_000;
        assert_eq!(c.ct_tcp_syn_sent_ns, 7 * s);
        assert_eq!(c.ct_tcp_syn_recv_ns, 7 * s);
        assert_eq!(c.ct_tcp_fin_wait_ns, 7 * s);
        assert_eq!(c.ct_tcp_close_wait_ns, 7 * s);
        assert_eq!(c.ct_tcp_time_wait_ns, 7 * s);
        assert_eq!(c.ct_tcp_close_ns, 3 * s);
        assert_eq!(c.ct_tcp_established_ns, 7_200 * s);
        assert_eq!((c.ct_udp_ns, c.ct_udp_stream_ns), (5 * s, 9 * s));
        // The old name of the established flag still works.
        let c = parse(&["--conntrack-tcp-established-timeout=1h"]).unwrap();
        assert_eq!(c.ct_tcp_established_ns, 3_600 * s);
        let c = parse(&[
            "--conntrack-tcp-timeout-syn-sent=1s",
            "--conntrack-tcp-timeout-syn-recv=2s",
            "--conntrack-tcp-timeout-fin-wait=3s",
            "--conntrack-tcp-timeout-close-wait=4s",
            "--conntrack-tcp-timeout-time-wait=5s",
        ])
        .unwrap();
        assert_eq!(
            [
                c.ct_tcp_syn_sent_ns,
                c.ct_tcp_syn_recv_ns,
                c.ct_tcp_fin_wait_ns,
                c.ct_tcp_close_wait_ns,
                c.ct_tcp_time_wait_ns,
                c.ct_tcp_close_ns,
            ],
            [s, 2 * s, 3 * s, 4 * s, 5 * s, 10 * s]
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (argv, flag) in [
            (&["--snat-port-range=20000-31000"][..], "--snat-port-range"),
            (&["--snat-port-range=30000-30000"][..], "--snat-port-range"),
            (&["--snat-port-range=5000-4000"][..], "--snat-port-range"),
            (&["--snat-port-range=0-100"][..], "--snat-port-range"),
            (&["--snat-port-range=abc"][..], "--snat-port-range"),
            (
                &["--conntrack-tcp-timeout-close=0s"][..],
                "--conntrack-tcp-timeout-close",
            ),
        ] {
            let e = format!("{:#}", parse(argv).unwrap_err());
            assert!(e.contains(flag), "{argv:?}: {e}");
        }
        let c = parse(&["--snat-port-range=40000-40099"]).unwrap();
        assert_eq!((c.snat_port_min, c.snat_port_max), (40_000, 40_099));
    }
}
