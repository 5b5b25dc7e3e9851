//! The test topology of DESIGN.md, built from network namespaces, as an RAII value.
//!
//! ```text
//!  ext (198.18.0.100/24)              lan: bridge br0
//!        |                       ______/      \______
//!        +----------------------/                    \
//!   node1: eth0 198.18.0.11/24                  node2: eth0 198.18.0.12/24
//!          cni0 10.244.1.1/24                          cni0 10.244.2.1/24
//!          vethN -- pod (10.244.1.N/24)                vethN -- pod (10.244.2.N/24)
//!          route 10.244.2.0/24 via 198.18.0.12         route 10.244.1.0/24 via 198.18.0.11
//! ```
//!
//! With [`TopologyBuilder::second_lan`], a second lan (bridge br1 in the lan
//! namespace, 198.19.0.0/24) joins every node's second uplink `eth1`
//! (198.19.0.(10+N)) and the external client's `eth1` (198.19.0.100): nodes
//! with two uplinks, as on multi-homed machines ([`TopologyBuilder::second_lan_on`]:
//! only some nodes). The agents still get only `--uplink eth0` unless a
//! test passes `--uplink eth1` too.
//!
//! Every node is made like a kubeadm node: ip_forward=1, rp_filter off,
//! `net.bridge.bridge-nf-call-iptables=1` and
//! `iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP`.
//! No namespace has a default route except the pods (via their node's cni0):
//! nothing can leave the topology, which has no link to the root namespace.
//!
//! Names start with `lbt<pid>-<n>-` so that leftovers of a crashed run (its pid
//! gone) are recognized and removed when the next topology is built. Dropping a
//! [`Topology`] removes everything, also when the test panicked: processes
//! (agents get SIGTERM first), the agents' pinned state (`lb-agent --cleanup`),
//! pin directories, namespaces and the temp directory.
//!
//! One module per concern, each adding methods to [`Topology`]:
//! - `links`: namespaces, veths, bridges, routes, the kubeadm-like node setup;
//! - `processes`: running commands, background processes and their logs,
//!   killing them, cleaning up after crashed runs;
//! - `servers`: the backends in pods (python echo/HTTP servers, dnsmasq);
//! - `clients`: curl, dig, socat and long-lived connections, and the
//!   backends' [`Reply`];
//! - `agents`: one `lb-agent` per node (manifest or fake API server), lbctl,
//!   waiting for backends, diagnostics of a failed test;
//! - `cgroups`: one cgroup v2 directory per node for the agent's socket-LB
//!   hooks (F2), and host processes of a node in it.
//!
//! Hosts are named by node, pod, `ext` or `lan`; `<node>:host` (see
//! [`host`]) is a host-network process of a node: the node's namespace and
//! the node's cgroup, so its sockets go through the agent's cgroup hooks.
//! Commands in a node's plain name run in its namespace only, outside that
//! cgroup (setup, `ss`, `iptables`: nothing of lb applies to them).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::NamedNetns;

mod agents;
mod cgroups;
mod clients;
mod links;
mod processes;
mod servers;

pub use agents::Frontend;
pub use cgroups::cgroup2_root;
pub use clients::{Connection, Reply};
pub use processes::{cleanup_stale, exec_in, run, Output};

/// Every name this module creates starts with this.
pub const NAME_PREFIX: &str = "lbt";
/// Where the node agents pin their state: `<BPFFS_ROOT>/<prefix><node>`.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// The address of the external client on the lan.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The fake API server's address on the lan (the lan bridge's own address).
pub const API_SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The lan subnet of the node uplinks.
pub const LAN_CIDR: &str = "198.18.0.0/24";
/// The second lan's subnet ([`TopologyBuilder::second_lan`]).
pub const SECOND_LAN_CIDR: &str = "198.19.0.0/24";
/// The external client's address on the second lan.
pub const EXTERNAL_IP_2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 100);
/// Default time the `wait_*` helpers wait for the agents.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);
/// `<node>` + this names a host-network process of the node (see [`host`]).
pub const HOST_SUFFIX: &str = ":host";

/// The host name of a host-network process of `node`: its network namespace
/// and its cgroup (where the node's agent attaches socket LB).
pub fn host(node: &str) -> String {
    format!("{node}{HOST_SUFFIX}")
}

/// Tells topologies of one process apart.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// One emulated node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Kubernetes node name (`nodeName` of endpoints, `--node-name` of the agent).
    pub name: String,
    pub netns: String,
    /// 1-based: node N has 198.18.0.(10+N) and pod CIDR 10.244.N.0/24.
    pub index: u8,
    /// Address of the uplink `eth0`.
    pub address: Ipv4Addr,
    /// Address of `cni0`, the pods' default gateway.
    pub gateway: Ipv4Addr,
    pub pod_cidr: String,
    /// The agent's pin directory (`--bpffs`).
    pub bpffs: PathBuf,
    pub uplink: String,
    /// The second uplink (`eth1`) and its address on the second lan, with
    /// [`TopologyBuilder::second_lan`].
    pub second_uplink: Option<(String, Ipv4Addr)>,
    /// The node's cgroup v2 directory: the agent's `--cgroup-path`, and where
    /// [`host`] processes run. `None` without a cgroup v2 hierarchy (the
    /// agents then run with `--no-socket-lb`).
    pub cgroup: Option<PathBuf>,
}

/// One pod: a namespace attached to its node's cni0 by a veth.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The host-side veth in the node namespace (matches `^veth`).
    pub host_iface: String,
}

/// Builds a [`Topology`].
#[derive(Default)]
pub struct TopologyBuilder {
    nodes: Vec<(String, Vec<String>)>,
    no_external: bool,
    /// The nodes on the second lan (`None`: no second lan; empty: all).
    second_lan: Option<BTreeSet<String>>,
}

impl TopologyBuilder {
    /// Adds a node with pods (pod N of the list gets 10.244.<node>.<N+2>).
    pub fn node(mut self, name: &str, pods: &[&str]) -> Self {
        self.nodes.push((
            name.to_string(),
            pods.iter().map(|p| p.to_string()).collect(),
        ));
        self
    }

    /// Leaves out the external client namespace.
    pub fn without_external_client(mut self) -> Self {
        self.no_external = true;
        self
    }

    /// Adds a second lan: every node gets a second uplink `eth1`
    /// (198.19.0.(10+N)/24), the external client an `eth1` (198.19.0.100).
    pub fn second_lan(mut self) -> Self {
        self.second_lan = Some(BTreeSet::new());
        self
    }

    /// Adds a second lan with only `nodes` on it (each gets an `eth1`, the
    /// external client too): the other nodes have no route to it, as with
    /// an edge node's extra network.
    pub fn second_lan_on(mut self, nodes: &[&str]) -> Self {
        self.second_lan = Some(nodes.iter().map(|n| n.to_string()).collect());
        self
    }

    pub fn build(self) -> Result<Topology> {
        if self.nodes.is_empty() || self.nodes.len() > 200 {
            bail!("a topology needs 1..=200 nodes");
        }
        let mut seen = BTreeSet::new();
        for (n, pods) in &self.nodes {
            if !seen.insert(n.clone()) {
                bail!("duplicate name {n}");
            }
            if pods.len() > 200 {
                bail!("node {n}: at most 200 pods");
            }
            for p in pods {
                if !seen.insert(p.clone()) {
                    bail!("duplicate name {p}");
                }
            }
        }
        if let Some(on) = &self.second_lan {
            if let Some(n) = on
                .iter()
                .find(|n| !self.nodes.iter().any(|(name, _)| name == *n))
            {
                bail!("second lan: no node {n}");
            }
        }
        crate::privilege::ensure_bpffs().context("mounting bpffs at /sys/fs/bpf")?;
        cleanup_stale();

        let pid = std::process::id();
        let prefix = format!("{NAME_PREFIX}{pid}-{}-", SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        servers::install_scripts(&dir)?;
        clients::install_scripts(&dir)?;

        let cgroup = cgroups::cgroup2_root().map(|r| r.join(prefix.trim_end_matches('-')));
        let mut topo = Topology {
            second_lan: self.second_lan.clone(),
            cgroup,
            lan: format!("{prefix}lan"),
            external: (!self.no_external).then(|| format!("{prefix}ext")),
            prefix,
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            procs: Mutex::new(Vec::new()),
            kubeconfig: Mutex::new(None),
        };
        // From here on, Drop removes whatever was created.
        topo.create(&self.nodes)?;
        Ok(topo)
    }
}

/// A running topology. See the module documentation.
pub struct Topology {
    prefix: String,
    dir: PathBuf,
    /// The parent of the nodes' cgroups (`<cgroup2>/lbt<pid>-<n>`).
    cgroup: Option<PathBuf>,
    lan: String,
    /// The nodes on the second lan (bridge br1 in the lan namespace), all
    /// when empty; `None` without a second lan.
    second_lan: Option<BTreeSet<String>>,
    external: Option<String>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Every namespace created, in creation order.
    namespaces: Vec<NamedNetns>,
    procs: Mutex<Vec<processes::Proc>>,
    /// Set by [`Topology::start_api_server`]: agents start in cluster mode
    /// with this kubeconfig instead of a manifest.
    kubeconfig: Mutex<Option<PathBuf>>,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    // ---- names and lookups

    /// The `lbt<pid>-<n>-` prefix of every name of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The temp directory of this topology (manifests, logs, scripts).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the topology"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the topology"))
    }

    /// The namespace of the external client.
    pub fn external(&self) -> &str {
        self.external
            .as_deref()
            .expect("the topology was built without an external client")
    }

    pub fn lan(&self) -> &str {
        &self.lan
    }

    /// The namespace of a node, a pod, or `ext`/`lan`.
    pub fn netns(&self, name: &str) -> String {
        let name = name.strip_suffix(HOST_SUFFIX).unwrap_or(name);
        if let Some(n) = self.nodes.iter().find(|n| n.name == name) {
            return n.netns.clone();
        }
        if let Some(p) = self.pods.iter().find(|p| p.name == name) {
            return p.netns.clone();
        }
        match name {
            "ext" | "external" => self.external().to_string(),
            "lan" => self.lan.clone(),
            _ => panic!("no host {name} in the topology"),
        }
    }

    // ---- teardown

    /// Removes everything, in the order that lets each step work: processes
    /// (agents gracefully, so they leave their pins), the agents' pinned
    /// state (cleaned up inside each node, which must still exist), the
    /// nodes' cgroups, then the namespaces, newest first.
    fn teardown(&mut self) {
        self.stop_processes();
        for n in &self.nodes {
            processes::cleanup_pins(&n.bpffs, Some(&n.netns));
        }
        // After the pins: the agents' cgroup links are detached by then.
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cgroups::remove(cg) {
                eprintln!("warning: {e:#}");
            }
        }
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== topology {} diagnostics (the test failed) ====\n{}",
                self.prefix,
                self.diagnostics()
            );
        }
        self.teardown();
    }
}
