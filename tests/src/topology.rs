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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::artifacts;

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
/// Default time the `wait_*` helpers wait for the agents.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Python backend server: `server.py NAME SPEC...`, SPEC = `http:PORT`,
/// `tcp:PORT` (line echo) or `udp:PORT` (datagram echo). Every answer names the
/// backend and the peer it saw: `backend=NAME proto=P client=IP:PORT ...`.
const SERVER_PY: &str = r#"
import http.server, socket, socketserver, sys, threading
name = sys.argv[1]

class Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ip, port = self.client_address[:2]
        body = f"backend={name} proto=http client={ip}:{port} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        sys.stderr.write("http %s %s\n" % (self.client_address[0], fmt % args))

class Line(socketserver.StreamRequestHandler):
    def handle(self):
        ip, port = self.client_address[:2]
        for raw in self.rfile:
            line = raw.decode(errors="replace").strip()
            self.wfile.write(f"backend={name} proto=tcp client={ip}:{port} line={line}\n".encode())
            self.wfile.flush()

class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        ip, port = self.client_address[:2]
        line = data.decode(errors="replace").strip()
        sock.sendto(f"backend={name} proto=udp client={ip}:{port} line={line}\n".encode(), self.client_address)

class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class HttpServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

servers = []
for spec in sys.argv[2:]:
    kind, port = spec.split(":")
    port = int(port)
    if kind == "http":
        servers.append(HttpServer(("0.0.0.0", port), Http))
    elif kind == "tcp":
        servers.append(TcpServer(("0.0.0.0", port), Line))
    elif kind == "udp":
        servers.append(socketserver.ThreadingUDPServer(("0.0.0.0", port), Udp))
    else:
        sys.exit(f"unknown server kind {kind}")
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Python client holding one TCP connection: each stdin line is sent, each
/// answer line printed; `EOF`/`ERROR ...` when the connection breaks.
const CLIENT_PY: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    f = s.makefile("rw")
    print("connected", flush=True)
    for line in sys.stdin:
        f.write(line)
        f.flush()
        answer = f.readline()
        if not answer:
            print("EOF", flush=True)
            sys.exit(1)
        print(answer.strip(), flush=True)
except Exception as e:
    print(f"ERROR {e}", flush=True)
    sys.exit(1)
"#;

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

/// The result of a command run with a timeout.
#[derive(Debug)]
pub struct Output {
    /// `None` when the command was killed at its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Stdout when the command succeeded, an error with everything otherwise.
    pub fn ok(self) -> Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(anyhow!(
                "`{}` {}: stdout: {:?} stderr: {:?}",
                self.command,
                match self.status {
                    Some(s) => format!("failed ({s})"),
                    None => "timed out".to_string(),
                },
                self.stdout.trim(),
                self.stderr.trim()
            ))
        }
    }
}

/// What a backend started by [`Topology::spawn_backend`] answered: parsed from
/// `backend=NAME proto=P client=IP:PORT ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub proto: String,
    pub client: SocketAddrV4,
    pub raw: String,
}

impl Reply {
    pub fn parse(text: &str) -> Result<Reply> {
        let line = text
            .lines()
            .find(|l| l.contains("backend="))
            .ok_or_else(|| anyhow!("not a backend answer: {text:?}"))?;
        let mut fields = BTreeMap::new();
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                fields.insert(k, v);
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| anyhow!("no {k}= in backend answer {line:?}"))
        };
        Ok(Reply {
            backend: get("backend")?.to_string(),
            proto: get("proto")?.to_string(),
            client: get("client")?
                .parse()
                .with_context(|| format!("client= in {line:?}"))?,
            raw: line.to_string(),
        })
    }
}

/// A frontend as `lbctl services -o json` reports it. `address: None` is a NodePort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub protocol: &'static str,
}

impl Frontend {
    pub fn tcp(address: Ipv4Addr, port: u16) -> Self {
        Frontend {
            address: Some(address),
            port,
            protocol: "TCP",
        }
    }
    pub fn udp(address: Ipv4Addr, port: u16) -> Self {
        Frontend {
            address: Some(address),
            port,
            protocol: "UDP",
        }
    }
    pub fn node_port(port: u16, protocol: &'static str) -> Self {
        Frontend {
            address: None,
            port,
            protocol,
        }
    }

    fn matches(&self, svc: &serde_json::Value) -> bool {
        let port_ok = svc["port"].as_u64() == Some(u64::from(self.port));
        let proto_ok = svc["protocol"]
            .as_str()
            .is_some_and(|p| p.eq_ignore_ascii_case(self.protocol));
        let addr_ok = match self.address {
            Some(a) => svc["address"].as_str() == Some(a.to_string().as_str()),
            None => svc["kind"].as_str() == Some("NodePort"),
        };
        port_ok && proto_ok && addr_ok
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            Some(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            None => write!(f, "<nodeport>:{}/{}", self.port, self.protocol),
        }
    }
}

/// A spawned background process, killed when the topology goes.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set for agents: the node they serve (stopped with SIGTERM first).
    agent_of: Option<String>,
}

/// Builds a [`Topology`].
#[derive(Default)]
pub struct TopologyBuilder {
    nodes: Vec<(String, Vec<String>)>,
    no_external: bool,
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

    pub fn build(self) -> Result<Topology> {
        if self.nodes.is_empty() || self.nodes.len() > 200 {
            bail!("a topology needs 1..=200 nodes");
        }
        let mut seen = std::collections::BTreeSet::new();
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
        crate::privilege::ensure_bpffs().context("mounting bpffs at /sys/fs/bpf")?;
        cleanup_stale();

        let pid = std::process::id();
        let prefix = format!("{NAME_PREFIX}{pid}-{}-", SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("server.py"), SERVER_PY)?;
        std::fs::write(dir.join("client.py"), CLIENT_PY)?;

        let mut topo = Topology {
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
    lan: String,
    external: Option<String>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Every namespace created, in creation order.
    namespaces: Vec<String>,
    procs: Mutex<Vec<Proc>>,
    /// Set by [`Topology::start_api_server`]: agents start in cluster mode
    /// with this kubeconfig instead of a manifest.
    kubeconfig: Mutex<Option<PathBuf>>,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    fn create(&mut self, spec: &[(String, Vec<String>)]) -> Result<()> {
        let lan = self.lan.clone();
        self.add_netns(&lan)?;
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan, "link", "set", "br0", "up"])?;
        // Where a fake API server listens (cluster-mode tests).
        ip(&[
            "-n",
            &lan,
            "addr",
            "add",
            &format!("{API_SERVER_IP}/24"),
            "dev",
            "br0",
        ])?;

        for (i, (name, pods)) in spec.iter().enumerate() {
            let index = u8::try_from(i + 1).expect("at most 200 nodes");
            let netns = format!("{}{name}", self.prefix);
            let node = Node {
                name: name.clone(),
                netns: netns.clone(),
                index,
                address: Ipv4Addr::new(198, 18, 0, 10 + index),
                gateway: Ipv4Addr::new(10, 244, index, 1),
                pod_cidr: format!("10.244.{index}.0/24"),
                bpffs: Path::new(BPFFS_ROOT).join(format!("{}{name}", self.prefix)),
                uplink: "eth0".to_string(),
            };
            self.add_netns(&netns)?;
            // kubeadm-like node settings (br_netfilter sysctls are per namespace).
            sysctl(
                &netns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.bridge.bridge-nf-call-iptables=1",
                ],
            )?;
            exec_ok(
                &netns,
                &[
                    "iptables",
                    "-A",
                    "FORWARD",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "INVALID",
                    "-j",
                    "DROP",
                ],
            )?;
            // Uplink: eth0 in the node, its peer (named after the node) on the lan bridge.
            let lan_port = format!("n{index}");
            ip(&[
                "-n", &lan, "link", "add", &lan_port, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ])?;
            ip(&["-n", &lan, "link", "set", &lan_port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", node.address),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            // cni0 bridge for the pods.
            ip(&["-n", &netns, "link", "add", "cni0", "type", "bridge"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", node.gateway),
                "dev",
                "cni0",
            ])?;
            ip(&["-n", &netns, "link", "set", "cni0", "up"])?;
            self.nodes.push(node);
            for pod_name in pods {
                self.add_pod(name, pod_name)?;
            }
        }
        // host-gw routes between the nodes' pod CIDRs.
        for a in &self.nodes {
            for b in &self.nodes {
                if a.index != b.index {
                    ip(&[
                        "-n",
                        &a.netns,
                        "route",
                        "add",
                        &b.pod_cidr,
                        "via",
                        &b.address.to_string(),
                    ])?;
                }
            }
        }
        if let Some(ext) = self.external.clone() {
            self.add_netns(&ext)?;
            ip(&[
                "-n", &lan, "link", "add", "ext", "type", "veth", "peer", "name", "eth0", "netns",
                &ext,
            ])?;
            ip(&["-n", &lan, "link", "set", "ext", "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ext,
                "addr",
                "add",
                &format!("{EXTERNAL_IP}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
        }
        // rp_filter off on every interface of the nodes (max(all, iface) applies).
        for n in &self.nodes {
            exec_ok(
                &n.netns,
                &[
                    "sh",
                    "-c",
                    "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
                ],
            )?;
        }
        Ok(())
    }

    /// Adds a pod to `node`'s cni0 (also while agents run: they attach to its
    /// veth as it appears). Pod k of a node gets 10.244.<node>.<k+2>.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        if self.pods.iter().any(|p| p.name == name) || self.nodes.iter().any(|n| n.name == name) {
            bail!("duplicate name {name}");
        }
        let n = self.node(node).clone();
        let used: std::collections::BTreeSet<Ipv4Addr> = self.pods.iter().map(|p| p.ip).collect();
        let host = (2..=250u8)
            .find(|h| !used.contains(&Ipv4Addr::new(10, 244, n.index, *h)))
            .ok_or_else(|| anyhow!("node {node}: no free pod address"))?;
        let pod = Pod {
            name: name.to_string(),
            node: node.to_string(),
            netns: format!("{}{node}-{name}", self.prefix),
            ip: Ipv4Addr::new(10, 244, n.index, host),
            host_iface: format!("veth{host}"),
        };
        self.add_netns(&pod.netns)?;
        let h = &pod.host_iface;
        ip(&[
            "-n", &n.netns, "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns",
            &pod.netns,
        ])?;
        ip(&["-n", &n.netns, "link", "set", h, "master", "cni0", "up"])?;
        ip(&[
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &pod.netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &pod.netns,
            "route",
            "add",
            "default",
            "via",
            &n.gateway.to_string(),
        ])?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Removes a pod: its processes, its namespace and so its veth.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name}"))?;
        let pod = self.pods.remove(i);
        kill_netns_pids(&pod.netns);
        ip(&["netns", "del", &pod.netns])?;
        self.namespaces.retain(|n| n != &pod.netns);
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // IPv6 off: keeps captures quiet (no DAD, no router solicitations).
        let _ = sysctl(
            name,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        Ok(())
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

    // ---- running things

    /// Runs `argv` in the namespace of host `who` (node, pod, `ext`) with `ip netns exec`.
    pub fn exec(&self, who: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
        exec_in(&self.netns(who), argv, timeout)
    }

    /// Like [`exec`](Self::exec), stdout on success, an error otherwise.
    pub fn sh(&self, who: &str, script: &str) -> Result<String> {
        self.exec(who, &["sh", "-c", script], Duration::from_secs(30))?
            .ok()
    }

    /// Adds a route in `who`'s namespace (e.g. an external IP via a node).
    pub fn add_route(&self, who: &str, cidr: &str, via: Ipv4Addr) -> Result<()> {
        ip(&[
            "-n",
            &self.netns(who),
            "route",
            "add",
            cidr,
            "via",
            &via.to_string(),
        ])
    }

    /// `curl` from `who`; the body on success.
    pub fn curl(&self, who: &str, url: &str) -> Result<String> {
        self.exec(
            who,
            &[
                "curl",
                "-sS",
                "--connect-timeout",
                "3",
                "--max-time",
                "5",
                url,
            ],
            Duration::from_secs(10),
        )?
        .ok()
    }

    /// `curl` to one of our backends; which backend answered and what it saw.
    pub fn request(&self, who: &str, url: &str) -> Result<Reply> {
        Reply::parse(&self.curl(who, url)?)
    }

    /// Retries [`request`](Self::request) until it works (the first flow after
    /// the agent published a frontend may race the attachment of programs).
    pub fn request_eventually(&self, who: &str, url: &str, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.request(who, url) {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{who} -> {url}: no answer within {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Sends one line over UDP or TCP with socat from `who`; the answer line.
    pub fn socat_line(
        &self,
        who: &str,
        proto: &str,
        target: SocketAddrV4,
        line: &str,
    ) -> Result<Reply> {
        let script = format!(
            "echo {line} | socat -t 2 -T 3 - {}:{target}",
            match proto {
                "udp" | "UDP" => "UDP4",
                _ => "TCP4",
            }
        );
        let out = self
            .exec(who, &["sh", "-c", &script], Duration::from_secs(10))?
            .ok()?;
        Reply::parse(&out)
    }

    /// `dig TXT whoami.test @server` from `who` (answered by [`spawn_dns`](Self::spawn_dns)
    /// backends with `backend=NAME`): the backend name.
    pub fn dig_whoami(&self, who: &str, server: Ipv4Addr, port: u16, tcp: bool) -> Result<String> {
        let at = format!("@{server}");
        let p = port.to_string();
        let mut argv = vec![
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "-p",
            &p,
            &at,
            "whoami.test",
            "TXT",
        ];
        if tcp {
            argv.push("+tcp");
        }
        let out = self.exec(who, &argv, Duration::from_secs(10))?.ok()?;
        let answer = out.trim().trim_matches('"');
        answer
            .strip_prefix("backend=")
            .map(str::to_string)
            .ok_or_else(|| anyhow!("dig from {who} to {server}:{port}: unexpected answer {out:?}"))
    }

    /// Spawns a background process in `who`'s namespace (its own process group,
    /// killed with the topology and when the spawning thread dies). Output goes
    /// to `<dir>/<name>.log`.
    pub fn spawn(&self, who: &str, name: &str, argv: &[&str]) -> Result<()> {
        let netns = self.netns(who);
        let mut full = vec!["ip", "netns", "exec", netns.as_str()];
        full.extend_from_slice(argv);
        self.spawn_raw(name, &full, None)
    }

    fn spawn_raw(&self, name: &str, argv: &[&str], agent_of: Option<&str>) -> Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        background(&mut c);
        let child = c
            .spawn()
            .with_context(|| format!("spawning {}", argv.join(" ")))?;
        self.procs.lock().unwrap().push(Proc {
            name: name.to_string(),
            child,
            log,
            agent_of: agent_of.map(str::to_string),
        });
        Ok(())
    }

    /// The log of a process spawned under `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Fails when the process spawned as `name` has exited.
    pub fn check_running(&self, name: &str) -> Result<()> {
        let mut procs = self.procs.lock().unwrap();
        let p = procs
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("no process {name}"))?;
        if let Some(status) = p.child.try_wait()? {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            bail!("{name} exited ({status}); its log:\n{}", tail(&log, 40));
        }
        Ok(())
    }

    /// Starts the python backend in pod `pod`: `servers` like `["http:8080",
    /// "tcp:9000", "udp:9000"]`; waits until every port listens.
    pub fn spawn_backend(&self, pod: &str, servers: &[&str]) -> Result<()> {
        let script = self.dir.join("server.py");
        let script = script.to_string_lossy();
        let mut argv = vec![python(), &script, pod];
        argv.extend_from_slice(servers);
        let name = format!("server-{pod}");
        self.spawn(pod, &name, &argv)?;
        for s in servers {
            let (kind, port) = s
                .split_once(':')
                .ok_or_else(|| anyhow!("bad server spec {s}"))?;
            let port: u16 = port.parse()?;
            self.wait_listening(pod, &name, if kind == "udp" { "udp" } else { "tcp" }, port)?;
        }
        Ok(())
    }

    /// Starts dnsmasq in pod `pod` on UDP and TCP `port`, answering
    /// `whoami.test TXT "backend=<pod>"`.
    pub fn spawn_dns(&self, pod: &str, port: u16) -> Result<()> {
        let name = format!("dnsmasq-{pod}");
        let port_arg = format!("--port={port}");
        let txt = format!("--txt-record=whoami.test,backend={pod}");
        self.spawn(
            pod,
            &name,
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--pid-file",
                "--user=root",
                &port_arg,
                &txt,
            ],
        )?;
        self.wait_listening(pod, &name, "udp", port)?;
        self.wait_listening(pod, &name, "tcp", port)
    }

    fn wait_listening(&self, who: &str, proc_name: &str, proto: &str, port: u16) -> Result<()> {
        let flag = if proto == "udp" { "-Hlun" } else { "-Hltn" };
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.exec(who, &["ss", flag, &filter], Duration::from_secs(5))?;
            if out.success() && !out.stdout.trim().is_empty() {
                return Ok(());
            }
            self.check_running(proc_name)?;
            if Instant::now() >= deadline {
                bail!("{proc_name} does not listen on {proto}/{port} in {who}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens a long-lived TCP connection from `who` to `target` (a python
    /// client): send lines and read answers over the same connection.
    pub fn connect(&self, who: &str, target: SocketAddrV4) -> Result<Connection> {
        let netns = self.netns(who);
        let script = self.dir.join("client.py");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns, python()])
            .arg(&script)
            .arg(target.ip().to_string())
            .arg(target.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        background(&mut c);
        let mut child = c.spawn().context("spawning the TCP client")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut conn = Connection {
            child,
            stdin: Some(stdin),
            lines: rx,
            target,
        };
        let first = conn.read_line(Duration::from_secs(12))?;
        if first != "connected" {
            bail!("{who} -> {target}: {first}");
        }
        Ok(conn)
    }

    // ---- the agents

    /// Where the manifest of `node`'s agent is.
    pub fn manifest_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("manifest-{node}.yaml"))
    }

    /// Writes `yaml` as the manifest of every node (atomically: the agents poll).
    pub fn write_manifests(&self, yaml: &str) -> Result<()> {
        for n in &self.nodes {
            let path = self.manifest_path(&n.name);
            let tmp = path.with_extension("yaml.tmp");
            std::fs::write(&tmp, yaml)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Starts a fake API server on the lan ([`API_SERVER_IP`]:6443, inside the
    /// lan namespace) and switches the agents to cluster mode with a
    /// kubeconfig for it.
    pub fn start_api_server(&self) -> Result<crate::fake_apiserver::FakeApiServer> {
        let listener = crate::fake_apiserver::bind_in_netns(
            Some(&self.lan),
            std::net::SocketAddr::from((API_SERVER_IP, 6443)),
        );
        let server = crate::fake_apiserver::FakeApiServer::start(listener);
        let kubeconfig = server.write_kubeconfig(&self.dir);
        *self.kubeconfig.lock().unwrap() = Some(kubeconfig);
        Ok(server)
    }

    /// Starts one agent per node (cluster mode after [`Topology::start_api_server`]).
    pub fn start_all_agents(&self) -> Result<()> {
        for n in &self.nodes {
            self.start_agent(&n.name, &[])?;
        }
        Ok(())
    }

    /// Writes the manifests and starts one agent per node.
    pub fn start_agents(&self, yaml: &str) -> Result<()> {
        self.write_manifests(yaml)?;
        for n in &self.nodes {
            self.start_agent(&n.name, &[])?;
        }
        Ok(())
    }

    /// Starts `lb-agent` for `node` inside its network namespace with
    /// `nsenter --net` (the root mount namespace, so /sys/fs/bpf is the real one).
    pub fn start_agent(&self, node: &str, extra_args: &[&str]) -> Result<()> {
        let n = self.node(node).clone();
        let agent = artifacts::lb_agent_bin();
        if !agent.exists() {
            bail!(
                "the agent {} does not exist: run `cargo xtask build` (or `cargo xtask test`)",
                agent.display()
            );
        }
        let (source_flag, source) = match self.kubeconfig.lock().unwrap().clone() {
            Some(k) => ("--kubeconfig", k),
            None => ("--manifest", self.manifest_path(node)),
        };
        let net = format!("--net=/run/netns/{}", n.netns);
        let agent_s = agent.to_string_lossy();
        let source_s = source.to_string_lossy();
        let bpffs_s = n.bpffs.to_string_lossy();
        let mut argv = vec![
            "nsenter",
            net.as_str(),
            "--",
            &agent_s,
            source_flag,
            &source_s,
            "--node-name",
            node,
            "--uplink",
            &n.uplink,
            "--bpffs",
            &bpffs_s,
        ];
        argv.extend_from_slice(extra_args);
        let name = format!("agent-{node}");
        {
            let mut procs = self.procs.lock().unwrap();
            if let Some(old) = procs.iter_mut().find(|p| p.name == name) {
                if old.child.try_wait()?.is_none() {
                    bail!("the agent of {node} is already running");
                }
            }
            procs.retain(|p| p.name != name);
        }
        // A restarted agent logs to the same file name; keep the old log.
        let log = self.dir.join(format!("{name}.log"));
        if log.exists() {
            let mut i = 1;
            while self.dir.join(format!("{name}.{i}.log")).exists() {
                i += 1;
            }
            std::fs::rename(&log, self.dir.join(format!("{name}.{i}.log")))?;
        }
        self.spawn_raw(&name, &argv, Some(node))
    }

    /// Stops `node`'s agent with SIGTERM (pinned state stays); error if it
    /// does not exit within 10 s or exits non-zero.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        let name = format!("agent-{node}");
        let mut procs = self.procs.lock().unwrap();
        let i = procs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no agent for {node}"))?;
        let mut p = procs.remove(i);
        drop(procs);
        let status = terminate(&mut p.child, Duration::from_secs(10));
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!("agent of {node} exited with {s}"),
            None => bail!("agent of {node} did not stop within 10 s of SIGTERM"),
        }
    }

    /// Runs `lbctl ARGS --bpffs <node's pin dir>` in the node's namespace.
    pub fn lbctl(&self, node: &str, args: &[&str]) -> Result<String> {
        let n = self.node(node);
        let lbctl = artifacts::lbctl_bin();
        let net = format!("--net=/run/netns/{}", n.netns);
        let lbctl_s = lbctl.to_string_lossy();
        let bpffs_s = n.bpffs.to_string_lossy();
        let mut argv = vec!["nsenter", net.as_str(), "--", &lbctl_s];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--bpffs", &bpffs_s]);
        run(&argv, Duration::from_secs(15))?.ok()
    }

    /// `lbctl WHAT -o json` parsed.
    pub fn lbctl_json(&self, node: &str, what: &str) -> Result<serde_json::Value> {
        let out = self.lbctl(node, &[what, "-o", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("lbctl {what} -o json printed {out:?}"))
    }

    /// Polls `lbctl services -o json` on `node` until `frontend` is there with
    /// exactly `backends` (address:port); fails fast if the agent died.
    pub fn wait_for_backends(
        &self,
        node: &str,
        frontend: &Frontend,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        let mut want: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        want.sort();
        let mut last;
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            match self.lbctl_json(node, "services") {
                Ok(services) => {
                    let svc = services
                        .as_array()
                        .and_then(|a| a.iter().find(|s| frontend.matches(s)));
                    match svc {
                        Some(svc) => {
                            let mut have: Vec<String> = svc["backends"]
                                .as_array()
                                .map(|bs| {
                                    bs.iter()
                                        .map(|b| {
                                            format!(
                                                "{}:{}",
                                                b["address"].as_str().unwrap_or("?"),
                                                b["port"]
                                            )
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            have.sort();
                            if have == want {
                                return Ok(());
                            }
                            last = format!("{frontend} has backends {have:?}");
                        }
                        None => last = format!("{frontend} not in lbctl services"),
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            self.check_running(&format!("agent-{node}"))?;
            if Instant::now() >= deadline {
                bail!(
                    "{node}: {frontend} did not get backends {want:?} within {AGENT_TIMEOUT:?}; last: {last}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// [`wait_for_backends`](Self::wait_for_backends) on every node.
    pub fn wait_for_backends_everywhere(
        &self,
        frontend: &Frontend,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        for n in &self.nodes {
            self.wait_for_backends(&n.name, frontend, backends)?;
        }
        Ok(())
    }

    /// What a failing test should show: agent logs, lbctl views, addresses.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let procs: Vec<(String, PathBuf)> = self
            .procs
            .lock()
            .map(|p| p.iter().map(|p| (p.name.clone(), p.log.clone())).collect())
            .unwrap_or_default();
        for (name, log) in procs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = writeln!(
                s,
                "---- log of {name} (last lines) ----\n{}",
                tail(&text, 30)
            );
        }
        if artifacts::lbctl_bin().exists() {
            for n in &self.nodes {
                if !n.bpffs.exists() {
                    continue;
                }
                for what in ["services", "stats", "conntrack"] {
                    let out = self
                        .lbctl(&n.name, &[what])
                        .unwrap_or_else(|e| format!("{e:#}"));
                    let _ = writeln!(s, "---- {}: lbctl {what} ----\n{}", n.name, tail(&out, 40));
                }
            }
        }
        s
    }

    // ---- teardown

    fn teardown(&mut self) {
        let mut procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|e| e.into_inner()));
        // Agents first, gracefully (they leave pinned state; cleaned below).
        for p in procs.iter_mut().filter(|p| p.agent_of.is_some()) {
            terminate(&mut p.child, Duration::from_secs(5));
        }
        for p in procs.iter_mut() {
            kill_group(&mut p.child);
        }
        for n in &self.nodes {
            cleanup_pins(&n.bpffs, Some(&n.netns));
        }
        for ns in self.namespaces.iter().rev() {
            kill_netns_pids(ns);
            let _ = ip(&["netns", "del", ns]);
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

/// A long-lived TCP connection opened by [`Topology::connect`].
pub struct Connection {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub target: SocketAddrV4,
}

impl Connection {
    fn read_line(&mut self, timeout: Duration) -> Result<String> {
        self.lines
            .recv_timeout(timeout)
            .map_err(|e| anyhow!("connection to {}: no answer ({e})", self.target))
    }

    /// Sends `line` and returns the backend's answer.
    pub fn send(&mut self, line: &str) -> Result<Reply> {
        let stdin = self.stdin.as_mut().expect("open");
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let answer = self.read_line(Duration::from_secs(12))?;
        Reply::parse(&answer).with_context(|| format!("connection to {}", self.target))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.stdin.take();
        kill_group(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// k8s manifests (as `kubectl get -o yaml` prints them)

/// One port of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn tcp(name: &'static str, port: u16, target_port: u16) -> Self {
        ServicePort {
            name,
            protocol: "TCP",
            port,
            target_port,
            node_port: None,
        }
    }
    pub fn udp(name: &'static str, port: u16, target_port: u16) -> Self {
        ServicePort {
            protocol: "UDP",
            ..Self::tcp(name, port, target_port)
        }
    }
    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }
}

/// A Service. `kind` is `ClusterIP`, `NodePort` or `LoadBalancer`;
/// `extra_spec` is added verbatim under `spec:` (indent 2), e.g.
/// `"  externalTrafficPolicy: Local\n"`.
pub fn service_yaml(
    name: &str,
    kind: &str,
    cluster_ip: Ipv4Addr,
    ports: &[ServicePort],
    extra_spec: &str,
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {name}\n\
         spec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  clusterIPs:\n  - {cluster_ip}\n\
         \x20 internalTrafficPolicy: Cluster\n  ipFamilies:\n  - IPv4\n  ipFamilyPolicy: SingleStack\n\
         \x20 sessionAffinity: None\n  selector:\n    app: {name}\n  ports:\n"
    );
    for p in ports {
        let _ = writeln!(
            s,
            "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}",
            p.name, p.protocol, p.port, p.target_port
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(s, "    nodePort: {np}");
        }
    }
    if kind != "ClusterIP" && !extra_spec.contains("externalTrafficPolicy") {
        s.push_str("  externalTrafficPolicy: Cluster\n");
    }
    s.push_str(extra_spec);
    s.push_str("status:\n  loadBalancer: {}\n");
    s
}

/// An endpoint of an EndpointSlice: a pod of the topology.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: String,
    pub pod: String,
    pub ready: bool,
}

impl Endpoint {
    pub fn of(pod: &Pod) -> Self {
        Endpoint {
            ip: pod.ip,
            node: pod.node.clone(),
            pod: pod.name.clone(),
            ready: true,
        }
    }
}

/// An EndpointSlice of Service `service` with `ports` (name, protocol, port).
pub fn endpoint_slice_yaml(
    service: &str,
    slice: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[Endpoint],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: {service}\n\
         \x20   endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: IPv4\n"
    );
    if endpoints.is_empty() {
        s.push_str("endpoints: []\n");
    } else {
        s.push_str("endpoints:\n");
    }
    for e in endpoints {
        let _ = writeln!(
            s,
            "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: false\n  \
             nodeName: {}\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: default",
            e.ip, e.ready, e.ready, e.node, e.pod
        );
    }
    s.push_str("ports:\n");
    for (name, protocol, port) in ports {
        let _ = writeln!(s, "- name: {name}\n  protocol: {protocol}\n  port: {port}");
    }
    s
}

/// Joins YAML documents with `---`.
pub fn manifest(docs: &[String]) -> String {
    docs.iter()
        .map(|d| format!("---\n{d}"))
        .collect::<Vec<_>>()
        .concat()
}

// ---------------------------------------------------------------------------
// helpers

fn python() -> &'static str {
    // Debian's python3 (installed by `cargo xtask setup`): no version-manager shims.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Own process group, and SIGKILL when the spawning thread dies.
fn background(c: &mut Command) {
    c.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain kill(2) on the group we created for this child.
        unsafe {
            libc::kill(-(child.id() as i32), libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

/// SIGTERM, wait up to `grace`, then SIGKILL. The exit status if it exited in time.
fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_group(child);
    None
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `argv` with a timeout, capturing stdout and stderr.
pub fn run(argv: &[&str], timeout: Duration) -> Result<Output> {
    let command = argv.join(" ");
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.process_group(0);
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run `{command}`"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            kill_group(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        command,
    })
}

/// `ip netns exec NETNS argv...` with a timeout.
pub fn exec_in(netns: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
    let mut full = vec!["ip", "netns", "exec", netns];
    full.extend_from_slice(argv);
    run(&full, timeout)
}

fn exec_ok(netns: &str, argv: &[&str]) -> Result<String> {
    exec_in(netns, argv, Duration::from_secs(30))?.ok()
}

fn ip(args: &[&str]) -> Result<()> {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    run(&argv, Duration::from_secs(30))?.ok().map(|_| ())
}

fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(settings);
    exec_ok(netns, &argv).map(|_| ())
}

fn kill_netns_pids(netns: &str) {
    if let Ok(out) = run(&["ip", "netns", "pids", netns], Duration::from_secs(10)) {
        for pid in out
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2); these processes live in a namespace we own.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `lb-agent --cleanup` for a pin directory (inside the node's namespace
/// when it still exists), then removes the directory.
fn cleanup_pins(bpffs: &Path, netns: Option<&str>) {
    if !bpffs.exists() {
        return;
    }
    let agent = artifacts::lb_agent_bin();
    if agent.exists() {
        let agent_s = agent.to_string_lossy();
        let bpffs_s = bpffs.to_string_lossy();
        let net = netns
            .filter(|ns| Path::new("/run/netns").join(ns).exists())
            .map(|ns| format!("--net=/run/netns/{ns}"));
        let mut argv: Vec<&str> = Vec::new();
        if let Some(net) = &net {
            argv.extend_from_slice(&["nsenter", net, "--"]);
        }
        argv.extend_from_slice(&[&agent_s, "--cleanup", "--bpffs", &bpffs_s]);
        match run(&argv, Duration::from_secs(20)) {
            Ok(o) if o.success() => {}
            Ok(o) => eprintln!("warning: {}: {}", o.command, o.stderr.trim()),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    if let Err(e) = std::fs::remove_dir_all(bpffs) {
        if bpffs.exists() {
            eprintln!("warning: removing {}: {e}", bpffs.display());
        }
    }
}

/// The pid in a name `lbt<pid>-...` when that process is gone (a crashed run).
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('-') {
        return None;
    }
    let pid: u32 = digits.parse().ok()?;
    let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
    (!alive).then_some(pid)
}

/// Removes namespaces, pin directories and temp directories left by runs
/// whose process is gone.
pub fn cleanup_stale() {
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| stale_owner(n).is_some())
                .collect()
        })
        .unwrap_or_default();
    if let Ok(d) = std::fs::read_dir(BPFFS_ROOT) {
        for e in d.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale_owner(&name).is_some() {
                eprintln!("removing stale pin directory {}", e.path().display());
                cleanup_pins(&e.path(), Some(&name));
            }
        }
    }
    for ns in &netns {
        eprintln!("removing stale network namespace {ns}");
        kill_netns_pids(ns);
        let _ = ip(&["netns", "del", ns]);
    }
    if let Ok(d) = std::fs::read_dir(std::env::temp_dir()) {
        for e in d.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale_owner(&name).is_some() && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_replies() {
        let r = Reply::parse("backend=web1 proto=http client=10.244.1.2:40000 path=/\n").unwrap();
        assert_eq!(r.backend, "web1");
        assert_eq!(r.proto, "http");
        assert_eq!(r.client, "10.244.1.2:40000".parse().unwrap());
        assert!(Reply::parse("<html>").is_err());
    }

    #[test]
    fn recognizes_only_dead_owners() {
        let me = std::process::id();
        assert_eq!(stale_owner(&format!("lbt{me}-0-lan")), None);
        assert_eq!(stale_owner("lbt4000000000-0-lan"), Some(4_000_000_000));
        assert_eq!(stale_owner("lbtx-lan"), None);
        assert_eq!(stale_owner("lb"), None);
        assert_eq!(stale_owner("lbt123"), None);
    }

    #[test]
    fn manifests_look_like_kubectl_output() {
        let svc = service_yaml(
            "web",
            "NodePort",
            Ipv4Addr::new(10, 96, 0, 10),
            &[ServicePort::tcp("http", 80, 8080).node_port(30080)],
            "",
        );
        assert!(svc.contains("  clusterIP: 10.96.0.10\n"));
        assert!(svc.contains("    nodePort: 30080\n"));
        assert!(svc.contains("  externalTrafficPolicy: Cluster\n"));
        let eps = endpoint_slice_yaml(
            "web",
            "web-1",
            &[("http", "TCP", 8080)],
            &[Endpoint {
                ip: Ipv4Addr::new(10, 244, 1, 2),
                node: "node1".into(),
                pod: "web1".into(),
                ready: true,
            }],
        );
        assert!(eps.contains("kubernetes.io/service-name: web\n"));
        assert!(eps.contains("  nodeName: node1\n"));
        let m = manifest(&[svc, eps]);
        assert_eq!(m.matches("---\n").count(), 2);
    }
}
