//! Host-network clients (SEMANTICS F2): processes of a node's own network
//! namespace reach Services through the agent's socket-level load balancing
//! (cgroup connect4, sendmsg4, recvmsg4, getpeername4), with the TC path's
//! backend rules.
//!
//! Each emulated node has its own cgroup v2 directory; its agent attaches
//! there (`--cgroup-path`, set by the topology), and a "host process" of the
//! node is a command run in the node's namespace *inside* that cgroup
//! (`host("node1")`, i.e. `node1:host`). Nothing in the node's namespace has
//! a default route, so a destination the hooks did not rewrite (a ClusterIP)
//! fails at once with "network unreachable": every answer below went through
//! the socket hooks (the tests also check the counters and that no conntrack
//! entry was made).
//!
//! BPF_PROG_TEST_RUN does not run cgroup sock_addr programs: end to end is
//! the proof. Each test builds its own topology; dropping it removes
//! processes, pins, cgroups and namespaces, also on failure. Run serially.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, Service, SessionAffinityConfig,
};
use lb_tests::objects::{
    endpoint_slice, manifest, service, Endpoint, Object, ServiceBuilder, ServicePort, ServiceType,
};
use lb_tests::require_privileges;
use lb_tests::topology::{host, run, Frontend, Topology};

const WARMUP: Duration = Duration::from_secs(10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// node1 and node2 with the given pods, no external client.
fn two_nodes(node1_pods: &[&str], node2_pods: &[&str]) -> Topology {
    let t = Topology::builder()
        .node("node1", node1_pods)
        .node("node2", node2_pods)
        .without_external_client()
        .build()
        .expect("building the topology");
    assert!(
        t.nodes().iter().all(|n| n.cgroup.is_some()),
        "this machine has no cgroup v2 hierarchy: socket LB cannot be tested"
    );
    std::fs::write(t.dir().join("probe.py"), PROBE_PY).unwrap();
    std::fs::write(t.dir().join("peer.py"), PEER_PY).unwrap();
    t
}

/// A Service built by `b`, then edited as a typed object (fields the
/// builder has no method for).
fn edited(b: ServiceBuilder, edit: impl FnOnce(&mut Service)) -> Object {
    let mut s = b.build();
    edit(&mut s);
    s.into()
}

/// `spec.sessionAffinity: ClientIP` with a timeout.
fn client_ip_affinity(s: &mut Service, timeout_seconds: i32) {
    let spec = s.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(timeout_seconds),
        }),
    });
}

/// `status.loadBalancer.ingress: [{ip}]`.
fn lb_ingress(s: &mut Service, ip: Ipv4Addr) {
    let status = s.status.as_mut().unwrap();
    status.load_balancer.as_mut().unwrap().ingress = Some(vec![LoadBalancerIngress {
        ip: Some(ip.to_string()),
        ..Default::default()
    }]);
}

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `probe.py HOST PORT tcp|udp-connect|udp-sendto`: what connect() or
/// sendto() says, as `ok` or the errno's name.
const PROBE_PY: &str = r#"
import errno, socket, sys
host, port, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if how == "tcp":
        socket.create_connection((host, port), timeout=3)
    elif how == "udp-connect":
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect((host, port))
    else:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x\n", (host, port))
    print("ok")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

/// `peer.py VIP TCP_PORT UDP_PORT`: the address getpeername() reports for
/// a TCP socket and a connected UDP socket, and the source recvfrom()
/// reports for UDP answers (unconnected and connected), each with the
/// backend's answer (`backend=... client=...`).
const PEER_PY: &str = r#"
import socket, sys
vip, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = socket.create_connection((vip, tport), timeout=5)
print("tcp_peer=%s:%d" % t.getpeername())
t.sendall(b"tcp\n")
print("tcp_answer:", t.makefile().readline().strip())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"udp\n", (vip, uport))
data, src = u.recvfrom(4096)
print("udp_from=%s:%d" % src)
print("udp_answer:", data.decode().strip())
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(5)
c.connect((vip, uport))
print("udp_peer=%s:%d" % c.getpeername())
c.send(b"connected\n")
data, src = c.recvfrom(4096)
print("udp_connected_from=%s:%d" % src)
print("udp_connected_answer:", data.decode().strip())
"#;

/// What `probe.py` prints for `target` from `who`, and how long it took.
fn probe(t: &Topology, who: &str, target: SocketAddrV4, how: &str) -> (String, Duration) {
    let script = t.dir().join("probe.py");
    let (ip, port) = (target.ip().to_string(), target.port().to_string());
    let t0 = Instant::now();
    let out = t
        .exec(
            who,
            &[python(), &script.to_string_lossy(), &ip, &port, how],
            Duration::from_secs(10),
        )
        .unwrap()
        .ok()
        .unwrap();
    (out.trim().to_string(), t0.elapsed())
}

/// `lbctl stats` of `node` as name -> count.
fn stats(t: &Topology, node: &str) -> BTreeMap<String, u64> {
    let v = t.lbctl_json(node, "stats").unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

fn stat(t: &Topology, node: &str, name: &str) -> u64 {
    stats(t, node).get(name).copied().unwrap_or(0)
}

/// The addresses `node` sends from: its uplink and its cni0 address.
fn node_addresses(t: &Topology, node: &str) -> [Ipv4Addr; 2] {
    let n = t.node(node);
    [n.address, n.gateway]
}

/// web1 on node1, web2 on node2, both behind `ports`.
fn web_endpoints(t: &Topology, svc: &str, ports: &[ServicePort]) -> Object {
    endpoint_slice(svc, &format!("{svc}-1"))
        .ports_of(ports)
        .endpoints([Endpoint::of(t.pod("web1")), Endpoint::of(t.pod("web2"))])
        .into()
}

fn backends_of(t: &Topology, pods: &[&str], port: u16) -> Vec<SocketAddrV4> {
    pods.iter().map(|p| sa(t.pod(p).ip, port)).collect()
}

/// F2: a host process of node1 curls a ClusterIP: both the local and the
/// remote backend answer over repeated requests, each sees one of the node's
/// own addresses, the socket hooks did it (counters), and no packet was
/// translated (no conntrack entry).
#[test]
fn f2_clusterip_tcp_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let http = [ServicePort::tcp("http", 80, 8080)];
    t.start_agents(&manifest(&[
        service("web", vip).ports(&http).into(),
        web_endpoints(&t, "web", &http),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &backends_of(&t, &["web1", "web2"], 8080),
    )
    .unwrap();

    let h1 = host("node1");
    let url = format!("http://{vip}/");
    t.request_eventually(&h1, &url, WARMUP).unwrap();
    let before = stat(&t, "node1", "sock_translated");
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = t.request(&h1, &url).unwrap();
        assert!(
            node_addresses(&t, "node1").contains(r.client.ip()),
            "the backend must see one of node1's addresses: {}",
            r.raw
        );
        seen.insert(r.backend);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web1".to_string(), "web2".to_string()]),
        "20 connections from the node must reach the local and the remote backend"
    );
    assert!(stat(&t, "node1", "sock_translated") >= before + 20);
    let ct = t.lbctl_json("node1", "conntrack").unwrap();
    assert_eq!(
        ct.as_array().map(Vec::len),
        Some(0),
        "socket LB translates no packet: {ct}"
    );
    // The same from node2.
    let r = t.request_eventually(&host("node2"), &url, WARMUP).unwrap();
    assert!(
        node_addresses(&t, "node2").contains(r.client.ip()),
        "{}",
        r.raw
    );
}

/// F2 over UDP: dig through a ClusterIP from the node to dnsmasq backends on
/// both nodes; every answer comes back (dig checks that it comes from the
/// address it asked: recvmsg4 shows the ClusterIP), both backends seen; DNS
/// over TCP through the same Service too.
#[test]
fn f2_udp_dns_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["dns1"], &["dns2"]);
    t.spawn_dns("dns1", 53).unwrap();
    t.spawn_dns("dns2", 53).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let dns = [
        ServicePort::udp("dns", 53, 53),
        ServicePort::tcp("dns-tcp", 53, 53),
    ];
    t.start_agents(&manifest(&[
        service("kube-dns", vip).ports(&dns).into(),
        endpoint_slice("kube-dns", "kube-dns-1")
            .ports_of(&dns)
            .endpoints([Endpoint::of(t.pod("dns1")), Endpoint::of(t.pod("dns2"))])
            .into(),
    ]))
    .unwrap();
    let backends = backends_of(&t, &["dns1", "dns2"], 53);
    t.wait_for_backends("node1", &Frontend::udp(vip, 53), &backends)
        .unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(vip, 53), &backends)
        .unwrap();

    let h1 = host("node1");
    let deadline = Instant::now() + WARMUP;
    while t.dig_whoami(&h1, vip, 53, false).is_err() {
        assert!(Instant::now() < deadline, "no DNS answer through {vip}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let who = t
            .dig_whoami(&h1, vip, 53, false)
            .unwrap_or_else(|e| panic!("query {i}: {e:#}"));
        seen.insert(who);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["dns1".to_string(), "dns2".to_string()]),
        "20 UDP queries from the node must reach both backends"
    );
    let who = t.dig_whoami(&h1, vip, 53, true).unwrap();
    assert!(who == "dns1" || who == "dns2", "{who}");
    assert!(stat(&t, "node1", "sock_rev_translated") >= 20);
}

/// F2 + F4: a host process reaches a NodePort on its own node's addresses
/// (the uplink's and cni0's: translated by its socket hooks, both backends)
/// and on the other node's address (untouched here: node2 translates it at
/// its uplink), over TCP and UDP.
#[test]
fn f2_nodeport_from_the_node_on_this_and_other_nodes_addresses() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    for w in ["web1", "web2"] {
        t.spawn_backend(w, &["http:8080", "udp:9000"]).unwrap();
    }
    let tcp = ServicePort::tcp("http", 80, 8080).node_port(30080);
    let udp = ServicePort::udp("echo", 9000, 9000).node_port(30090);
    let ports = [tcp, udp];
    t.start_agents(&manifest(&[
        service("np", Ipv4Addr::new(10, 96, 0, 20))
            .service_type(ServiceType::NodePort)
            .ports(&ports)
            .into(),
        web_endpoints(&t, "np", &ports),
    ]))
    .unwrap();
    for node in ["node1", "node2"] {
        t.wait_for_backends(
            node,
            &Frontend::node_port(30080, "TCP"),
            &backends_of(&t, &["web1", "web2"], 8080),
        )
        .unwrap();
        t.wait_for_backends(
            node,
            &Frontend::node_port(30090, "UDP"),
            &backends_of(&t, &["web1", "web2"], 9000),
        )
        .unwrap();
    }
    let h1 = host("node1");
    let (node1, node2) = (t.node("node1").clone(), t.node("node2").clone());

    // This node's addresses: the socket hooks.
    for addr in [node1.address, node1.gateway] {
        let url = format!("http://{addr}:30080/");
        t.request_eventually(&h1, &url, WARMUP).unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let r = t.request(&h1, &url).unwrap();
            assert!(
                node_addresses(&t, "node1").contains(r.client.ip()),
                "{}",
                r.raw
            );
            seen.insert(r.backend);
        }
        assert_eq!(seen.len(), 2, "{url}: both backends expected, saw {seen:?}");
        let r = t.socat_line(&h1, "udp", sa(addr, 30090), "np-udp").unwrap();
        assert_eq!(r.proto, "udp", "{}", r.raw);
    }

    // The other node's address: not ours to translate.
    let before = stat(&t, "node1", "sock_translated");
    let url = format!("http://{}:30080/", node2.address);
    t.request_eventually(&h1, &url, WARMUP).unwrap();
    for _ in 0..6 {
        let r = t.request(&h1, &url).unwrap();
        assert!(r.backend == "web1" || r.backend == "web2", "{}", r.raw);
    }
    let r = t
        .socat_line(&h1, "udp", sa(node2.address, 30090), "np-udp-remote")
        .unwrap();
    assert_eq!(r.proto, "udp", "{}", r.raw);
    assert_eq!(
        stat(&t, "node1", "sock_translated"),
        before,
        "node1's socket hooks must leave node2's NodePort alone"
    );
    assert!(stat(&t, "node2", "new_flow") > 0, "node2 translated them");
}

/// F2 + F5 + F6: externalIPs and LoadBalancer IPs from the node (no node
/// owns them, no route leads there: the hooks rewrite connect()). The
/// Service has externalTrafficPolicy=Local, yet the node itself uses the
/// cluster-wide set (M3 short-circuit): both backends answer, on its
/// NodePort too.
#[test]
fn f2_external_and_lb_ips_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let external_ip = Ipv4Addr::new(203, 0, 113, 20);
    let lb_ip = Ipv4Addr::new(203, 0, 113, 21);
    let http = [ServicePort::tcp("http", 80, 8080).node_port(30085)];
    t.start_agents(&manifest(&[
        edited(
            service("pub", Ipv4Addr::new(10, 96, 0, 30))
                .service_type(ServiceType::LoadBalancer)
                .ports(&http)
                .external_ip(external_ip)
                .external_traffic_policy_local()
                .health_check_node_port(32085),
            |s| lb_ingress(s, lb_ip),
        ),
        web_endpoints(&t, "pub", &http),
    ]))
    .unwrap();
    let both = backends_of(&t, &["web1", "web2"], 8080);
    t.wait_for_backends("node1", &Frontend::tcp(external_ip, 80), &both)
        .unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(lb_ip, 80), &both)
        .unwrap();

    let h1 = host("node1");
    let node1 = t.node("node1").address;
    for url in [
        format!("http://{external_ip}/"),
        format!("http://{lb_ip}/"),
        format!("http://{node1}:30085/"),
    ] {
        t.request_eventually(&h1, &url, WARMUP).unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let r = t.request(&h1, &url).unwrap();
            assert!(
                node_addresses(&t, "node1").contains(r.client.ip()),
                "{}",
                r.raw
            );
            seen.insert(r.backend);
        }
        assert_eq!(
            seen,
            BTreeSet::from(["web1".to_string(), "web2".to_string()]),
            "{url}: M3, the node itself uses the cluster-wide set"
        );
    }
}

/// F2: the application sees the address it asked for: getpeername() of a
/// TCP socket and of a connected UDP socket, and the source recvfrom()
/// reports for UDP answers, are the ClusterIP, while the backend answered.
#[test]
fn f2_getpeername_and_recvfrom_show_the_service_address() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["tcp:7000", "udp:7000"]).unwrap();
    t.spawn_backend("web2", &["tcp:7000", "udp:7000"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 40);
    let ports = [
        ServicePort::tcp("tcp", 7000, 7000),
        ServicePort::udp("udp", 7001, 7000),
    ];
    t.start_agents(&manifest(&[
        service("echo", vip).ports(&ports).into(),
        web_endpoints(&t, "echo", &ports),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::udp(vip, 7001),
        &backends_of(&t, &["web1", "web2"], 7000),
    )
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 7000),
        &backends_of(&t, &["web1", "web2"], 7000),
    )
    .unwrap();

    let script = t.dir().join("peer.py");
    let out = t
        .exec(
            &host("node1"),
            &[
                python(),
                &script.to_string_lossy(),
                &vip.to_string(),
                "7000",
                "7001",
            ],
            Duration::from_secs(20),
        )
        .unwrap()
        .ok()
        .unwrap();
    let field = |key: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("tcp_peer="), format!("{vip}:7000"), "{out}");
    assert_eq!(field("udp_from="), format!("{vip}:7001"), "{out}");
    assert_eq!(field("udp_peer="), format!("{vip}:7001"), "{out}");
    assert_eq!(field("udp_connected_from="), format!("{vip}:7001"), "{out}");
    for answer in ["tcp_answer:", "udp_answer:", "udp_connected_answer:"] {
        let a = field(answer);
        assert!(
            a.contains("backend=web1") || a.contains("backend=web2"),
            "{answer} {a}"
        );
    }
    assert!(stat(&t, "node1", "sock_rev_translated") >= 4);
}

/// E1 from the node: a Service without any usable endpoint refuses at once:
/// connect() (TCP and UDP) and sendto() fail with ECONNREFUSED, curl reports
/// a refused connection without waiting, dig gives up at once.
#[test]
fn e1_connection_refused_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &[]);
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let ports = [
        ServicePort::tcp("http", 80, 8080),
        ServicePort::udp("dns", 53, 53),
    ];
    t.start_agents(&manifest(&[
        service("empty", vip).ports(&ports).into(),
        // Its only endpoint is not ready: no usable endpoint at all.
        endpoint_slice("empty", "empty-1")
            .ports_of(&ports)
            .endpoint(Endpoint::of(t.pod("web1")).not_ready())
            .into(),
    ]))
    .unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(vip, 80), &[])
        .unwrap();
    t.wait_for_backends("node1", &Frontend::udp(vip, 53), &[])
        .unwrap();

    let h1 = host("node1");
    for (target, how) in [
        (sa(vip, 80), "tcp"),
        (sa(vip, 53), "udp-connect"),
        (sa(vip, 53), "udp-sendto"),
    ] {
        let (said, took) = probe(&t, &h1, target, how);
        assert_eq!(said, "ECONNREFUSED", "{how} to {target}");
        assert!(took < Duration::from_secs(2), "{how}: {took:?}");
    }
    let t0 = Instant::now();
    let curl = t
        .exec(
            &h1,
            &[
                "curl",
                "-sS",
                "--connect-timeout",
                "5",
                &format!("http://{vip}/"),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(!curl.success());
    assert!(
        curl.stderr.contains("refused") || curl.stderr.contains("Couldn't connect"),
        "{curl:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "curl waited");
    let t0 = Instant::now();
    let dig = t
        .exec(
            &h1,
            &[
                "dig",
                "+time=3",
                "+tries=1",
                &format!("@{vip}"),
                "whoami.test",
                "TXT",
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        !dig.stdout.contains("ANSWER SECTION"),
        "dig got an answer: {dig:?}"
    );
    assert!(
        format!("{}{}", dig.stdout, dig.stderr).contains("refused"),
        "dig must report the refusal: {dig:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "dig waited: {dig:?}");
    assert!(stat(&t, "node1", "sock_rejected") >= 5);
}

/// F8 from the node: with sessionAffinity ClientIP every connection of the
/// node goes to the same backend; when that backend leaves the Service the
/// node is moved to the other one and sticks there (C6: never to an
/// endpoint that is not, right now, one of the Service's).
#[test]
fn f8_affinity_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 60);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let with = |pods: &[&str]| {
        manifest(&[
            edited(service("sticky", vip).ports(&http), |s| {
                client_ip_affinity(s, 10800)
            }),
            endpoint_slice("sticky", "sticky-1")
                .ports_of(&http)
                .endpoints(pods.iter().map(|p| Endpoint::of(t.pod(p))))
                .into(),
        ])
    };
    t.start_agents(&with(&["web1", "web2"])).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &backends_of(&t, &["web1", "web2"], 8080),
    )
    .unwrap();

    let h1 = host("node1");
    let url = format!("http://{vip}/");
    let first = t.request_eventually(&h1, &url, WARMUP).unwrap().backend;
    for i in 0..15 {
        let r = t.request(&h1, &url).unwrap();
        assert_eq!(r.backend, first, "request {i}: affinity broken: {}", r.raw);
    }

    let other = if first == "web1" { "web2" } else { "web1" };
    t.write_manifests(&with(&[other])).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &backends_of(&t, &[other], 8080),
    )
    .unwrap();
    for i in 0..10 {
        let r = t.request(&h1, &url).unwrap();
        assert_eq!(
            r.backend, other,
            "request {i} after {first} left went to {}",
            r.backend
        );
    }
    // Back to both: the node stays with its new backend.
    t.write_manifests(&with(&["web1", "web2"])).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &backends_of(&t, &["web1", "web2"], 8080),
    )
    .unwrap();
    for i in 0..10 {
        let r = t.request(&h1, &url).unwrap();
        assert_eq!(r.backend, other, "request {i}: affinity broken: {}", r.raw);
    }
}

/// E5 from the node: internalTrafficPolicy=Local sends each node's own
/// connections to its local endpoints only; a node without one fails at
/// once with "no route to host" (the TC path drops, E2; a socket can only
/// fail, and fails fast, as with Cilium).
#[test]
fn e5_internal_traffic_policy_local_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 70);
    let remote_vip = Ipv4Addr::new(10, 96, 0, 71);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let local = |s: &mut Service| {
        s.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
    };
    t.start_agents(&manifest(&[
        edited(service("itp", vip).ports(&http), local),
        web_endpoints(&t, "itp", &http),
        edited(service("itp-remote", remote_vip).ports(&http), local),
        endpoint_slice("itp-remote", "itp-remote-1")
            .ports_of(&http)
            .endpoint(Endpoint::of(t.pod("web2")))
            .into(),
    ]))
    .unwrap();
    for node in ["node1", "node2"] {
        t.wait_for_backends(
            node,
            &Frontend::tcp(vip, 80),
            &backends_of(&t, &["web1", "web2"], 8080),
        )
        .unwrap();
        t.wait_for_backends(
            node,
            &Frontend::tcp(remote_vip, 80),
            &backends_of(&t, &["web2"], 8080),
        )
        .unwrap();
    }
    let url = format!("http://{vip}/");
    for (node, want) in [("node1", "web1"), ("node2", "web2")] {
        let h = host(node);
        t.request_eventually(&h, &url, WARMUP).unwrap();
        for i in 0..12 {
            let r = t.request(&h, &url).unwrap();
            assert_eq!(r.backend, want, "{node}, request {i}: {}", r.raw);
        }
    }
    let before = stat(&t, "node1", "drop_no_backend");
    let (said, took) = probe(&t, &host("node1"), sa(remote_vip, 80), "tcp");
    assert_eq!(
        said, "EHOSTUNREACH",
        "node1 has no local endpoint of itp-remote"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(stat(&t, "node1", "drop_no_backend") > before);
    let r = t
        .request(&host("node2"), &format!("http://{remote_vip}/"))
        .unwrap();
    assert_eq!(r.backend, "web2");
}

/// E4 for a connected UDP socket of the node: it was sent to one backend
/// at connect(); when that endpoint leaves the Service (its pod still runs
/// and would still answer), the agent destroys the socket, the client's
/// reconnect goes through connect4 again and every later answer comes from
/// the live backend.
#[test]
fn e4_connected_udp_socket_moves_when_its_backend_goes() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["udp:9000"]).unwrap();
    t.spawn_backend("web2", &["udp:9000"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 80);
    let udp = [ServicePort::udp("echo", 9000, 9000)];
    let with = |pods: &[&str]| {
        manifest(&[
            service("echo", vip).ports(&udp).into(),
            endpoint_slice("echo", "echo-1")
                .ports_of(&udp)
                .endpoints(pods.iter().map(|p| Endpoint::of(t.pod(p))))
                .into(),
        ])
    };
    t.start_agents(&with(&["web1", "web2"])).unwrap();
    t.wait_for_backends_everywhere(
        &Frontend::udp(vip, 9000),
        &backends_of(&t, &["web1", "web2"], 9000),
    )
    .unwrap();

    let mut conn = t.connect_udp(&host("node1"), sa(vip, 9000)).unwrap();
    let first = conn.send("one").unwrap();
    assert!(first.raw.ends_with("reconnects=0"), "{}", first.raw);
    for _ in 0..3 {
        let r = conn.send("same").unwrap();
        assert_eq!(
            r.backend, first.backend,
            "a connected socket keeps its backend"
        );
    }
    let gone = first.backend.clone();
    let keep = if gone == "web1" { "web2" } else { "web1" };

    t.write_manifests(&with(&[keep])).unwrap();
    t.wait_for_backends_everywhere(&Frontend::udp(vip, 9000), &backends_of(&t, &[keep], 9000))
        .unwrap();
    // The agent destroys the socket right after the plan; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let moved = loop {
        let r = conn.send("after").unwrap();
        if r.backend == keep {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the connected socket still talks to {gone}, which left the Service: {}\nagent log:\n{}",
            r.raw,
            t.log("agent-node1")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        moved.raw.ends_with("reconnects=1"),
        "the socket was destroyed once and reconnected: {}",
        moved.raw
    );
    for _ in 0..5 {
        let r = conn.send("still").unwrap();
        assert_eq!(r.backend, keep, "{}", r.raw);
        assert!(r.raw.ends_with("reconnects=1"), "{}", r.raw);
    }
    assert!(
        t.log("agent-node1")
            .contains("destroyed a connected UDP socket"),
        "{}",
        t.log("agent-node1")
    );
}

/// The cgroup hooks run for every process below the cgroup, pods included,
/// but translate only sockets of the node's own network namespace: a pod's
/// process inside node1's cgroup is left to the TC path (its own address
/// seen by the backend, a conntrack entry, no socket translation).
#[test]
fn f2_other_network_namespaces_are_not_translated() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 90);
    let http = [ServicePort::tcp("http", 80, 8080)];
    t.start_agents(&manifest(&[
        service("web", vip).ports(&http).into(),
        web_endpoints(&t, "web", &http),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &backends_of(&t, &["web1", "web2"], 8080),
    )
    .unwrap();
    let url = format!("http://{vip}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();

    let (sock0, flows0) = (
        stat(&t, "node1", "sock_translated"),
        stat(&t, "node1", "new_flow"),
    );
    let client_ip = t.pod("client1").ip;
    for _ in 0..5 {
        let out = t
            .exec_in_cgroup_of(
                "node1",
                "client1",
                &["curl", "-sS", "--max-time", "5", &url],
                Duration::from_secs(10),
            )
            .unwrap()
            .ok()
            .unwrap();
        let r = lb_tests::topology::Reply::parse(&out).unwrap();
        assert_eq!(*r.client.ip(), client_ip, "F1 through TC: {}", r.raw);
    }
    assert_eq!(
        stat(&t, "node1", "sock_translated"),
        sock0,
        "the cgroup hooks translated a pod's socket"
    );
    assert!(stat(&t, "node1", "new_flow") >= flows0 + 5, "TC did");
    let ct = t.lbctl_json("node1", "conntrack").unwrap().to_string();
    assert!(ct.contains(&client_ip.to_string()), "{ct}");
    // The control: the node's own process in the same cgroup is translated.
    t.request(&host("node1"), &url).unwrap();
    assert!(stat(&t, "node1", "sock_translated") > sock0);
}

/// F2 across an agent restart: the cgroup links are pinned, keep
/// translating while no agent runs, and the next agent swaps its programs
/// into the same links; `--cleanup` detaches them at once.
#[test]
fn f2_socket_lb_links_survive_a_restart_and_cleanup_detaches_them() {
    require_privileges!();
    let t = two_nodes(&["web1"], &[]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 100);
    let http = [ServicePort::tcp("http", 80, 8080)];
    t.start_agents(&manifest(&[
        service("web", vip).ports(&http).into(),
        endpoint_slice("web", "web-1")
            .ports_of(&http)
            .endpoint(Endpoint::of(t.pod("web1")))
            .into(),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &backends_of(&t, &["web1"], 8080),
    )
    .unwrap();
    let h1 = host("node1");
    let url = format!("http://{vip}/");
    t.request_eventually(&h1, &url, WARMUP).unwrap();

    let node = t.node("node1").clone();
    let links = node.bpffs.join("links");
    let link_ids = || -> BTreeMap<String, u64> {
        std::fs::read_dir(&links)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("cgroup-"))
            .map(|e| {
                // bpftool in this mount namespace: `ip netns exec` would
                // hide the bpffs (it mounts a fresh /sys).
                let pin = e.path().to_string_lossy().into_owned();
                let out = run(
                    &["bpftool", "-j", "link", "show", "pinned", &pin],
                    Duration::from_secs(10),
                )
                .unwrap()
                .ok()
                .unwrap();
                let v: serde_json::Value = serde_json::from_str(&out).unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    v["id"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = link_ids();
    let hooks: BTreeSet<String> = before
        .keys()
        .map(|k| k.rsplit('-').next().unwrap().to_string())
        .collect();
    assert_eq!(
        hooks,
        ["connect4", "getpeername4", "recvmsg4", "sendmsg4"]
            .map(String::from)
            .into(),
        "{before:?}"
    );

    let cgroup = node.cgroup.clone().unwrap();
    let attached = || {
        run(
            &["bpftool", "cgroup", "show", &cgroup.to_string_lossy()],
            Duration::from_secs(10),
        )
        .unwrap()
        .ok()
        .unwrap()
    };
    let progs = attached();
    for hook in ["connect4", "sendmsg4", "recvmsg4", "getpeername4"] {
        assert!(progs.contains(hook), "{hook} not attached: {progs}");
    }

    t.stop_agent("node1").unwrap();
    t.request(&h1, &url)
        .expect("no agent: the pinned cgroup links still translate");
    t.start_agent("node1", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.log("agent-node1").contains("lb-agent ready") {
        assert!(Instant::now() < deadline, "{}", t.log("agent-node1"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t.log("agent-node1").contains("adopted pinned cgroup links"),
        "{}",
        t.log("agent-node1")
    );
    assert_eq!(link_ids(), before, "the same links carry the new programs");
    t.request(&h1, &url).unwrap();

    t.stop_agent("node1").unwrap();
    let agent = lb_tests::artifacts::lb_agent_bin();
    let out = std::process::Command::new(&agent)
        .args(["--cleanup", "--bpffs"])
        .arg(&node.bpffs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Detached synchronously: the very next connect() is not translated
    // (and the node has no route to a ClusterIP).
    let (said, _) = probe(&t, &h1, sa(vip, 80), "tcp");
    assert_eq!(said, "ENETUNREACH");
    let progs = attached();
    assert!(
        !progs.contains("connect4") && !progs.contains("recvmsg4"),
        "still attached: {progs}"
    );
}

/// F7 from the node: a LoadBalancer IP with loadBalancerSourceRanges admits
/// the node's own connections only when a range holds a node address
/// (kube-proxy's allowFromNode); otherwise connect() fails at once (EPERM).
#[test]
fn f7_source_ranges_from_the_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &[]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    let (open_ip, closed_ip) = (
        Ipv4Addr::new(203, 0, 113, 31),
        Ipv4Addr::new(203, 0, 113, 32),
    );
    let lb = |name: &str, cluster_ip: Ipv4Addr, ip: Ipv4Addr, range: &str, np: u16| {
        let http = [ServicePort::tcp("http", 80, 8080).node_port(np)];
        let range = range.to_string();
        [
            edited(
                service(name, cluster_ip)
                    .service_type(ServiceType::LoadBalancer)
                    .ports(&http),
                move |s| {
                    lb_ingress(s, ip);
                    s.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec![range]);
                },
            ),
            endpoint_slice(name, &format!("{name}-1"))
                .ports_of(&http)
                .endpoint(Endpoint::of(t.pod("web1")))
                .into(),
        ]
    };
    let mut objects = Vec::new();
    // 198.18.0.0/24 holds node1's address: the node is let through.
    objects.extend(lb(
        "open",
        Ipv4Addr::new(10, 96, 0, 111),
        open_ip,
        "198.18.0.0/24",
        30111,
    ));
    objects.extend(lb(
        "closed",
        Ipv4Addr::new(10, 96, 0, 112),
        closed_ip,
        "192.0.2.0/24",
        30112,
    ));
    t.start_agents(&manifest(&objects)).unwrap();
    let web1 = backends_of(&t, &["web1"], 8080);
    t.wait_for_backends("node1", &Frontend::tcp(open_ip, 80), &web1)
        .unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(closed_ip, 80), &web1)
        .unwrap();

    let h1 = host("node1");
    let r = t
        .request_eventually(&h1, &format!("http://{open_ip}/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web1");
    let before = stat(&t, "node1", "drop_source_range");
    let (said, took) = probe(&t, &h1, sa(closed_ip, 80), "tcp");
    assert_eq!(said, "EPERM");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(stat(&t, "node1", "drop_source_range") > before);
    // Source ranges apply to the LoadBalancer IP only: its ClusterIP works.
    let r = t.request(&h1, "http://10.96.0.112/").unwrap();
    assert_eq!(r.backend, "web1");
}
