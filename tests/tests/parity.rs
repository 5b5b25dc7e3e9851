//! Parity with kube-proxy, end to end: one test per contract id of the
//! "drop-in for kube-proxy" work item (#7), each proven with real clients
//! and servers in the two-node network-namespace topology (see
//! `lb_tests::topology`), agents in manifest mode.
//!
//! Where kube-proxy's own e2e tests (test/e2e/network/service.go, listed in
//! SEMANTICS.md) are mirrored:
//!
//! | kube e2e test | lb test |
//! |---|---|
//! | should serve a basic endpoint from pods | e2e `f1_f3_cluster_ip_from_pod_keeps_pod_source_ip` |
//! | should serve multiport endpoints from pods | e2e `manifest_edit_applies_live_and_keeps_open_connections` (two TCP ports), `f3_udp_dns_through_cluster_ip` (UDP and TCP ports) |
//! | should preserve source pod IP for traffic thru service cluster IP | e2e `f1_f3_cluster_ip_from_pod_keeps_pod_source_ip`; here `m1_cluster_ip_from_outside_the_cluster_cidr_is_snated` (pods keep it with --cluster-cidr too) |
//! | should allow pods to hairpin back to themselves through services | `m4_pod_reaches_itself_through_its_service_only_endpoint`, `m4_pod_reaches_itself_through_its_service_one_of_several` |
//! | should be able to up and down services | cluster `w1_f1_f3_traffic_follows_the_api_server` (a deleted Service stops answering), e2e `manifest_edit_applies_live_and_keeps_open_connections` |
//! | should be able to create a functioning NodePort service | `f4_node_port_everywhere`; e2e `f4_m2_node_port_from_external_client` |
//! | should be possible to connect to a service via ExternalIP when the external IP is not assigned to a node | e2e `f5_external_ip_from_pod_and_external_client`; here `m2_...`, `m3_...` |
//! | should have session affinity work for service with type clusterIP / NodePort | `f8_affinity_timeout_and_switch_from_pods_and_outside`; hostnet `f8_affinity_from_the_node` |
//! | should have session affinity timeout work for service with type clusterIP / NodePort | `f8_affinity_timeout_and_switch_from_pods_and_outside` |
//! | should be able to switch session affinity for service with type clusterIP / NodePort | `f8_affinity_timeout_and_switch_from_pods_and_outside` |
//! | should be rejected when no endpoints exist | `e1_refused_on_every_frontend_from_pods_and_outside`; hostnet `e1_connection_refused_from_the_node` |
//! | should respect internalTrafficPolicy=Local Pod to Pod / Pod (hostNetwork) to Pod | `e5_internal_traffic_policy_local_from_pods`; hostnet `e5_internal_traffic_policy_local_from_the_node` |
//! | should fallback to terminating endpoints when there are no ready endpoints (internal/external traffic policy Cluster/Local) | `e3_h1_terminating_endpoints_serve_when_none_is_ready_and_fail_the_health_check` |
//! | should fail health check node port if there are only terminating endpoints | `e3_h1_terminating_endpoints_serve_when_none_is_ready_and_fail_the_health_check` |
//! | should serve endpoints on same port and different protocols | e2e `f9_tcp_and_udp_on_the_same_port` |
//! | should implement service.kubernetes.io/service-proxy-name / headless | cluster `w1_f1_f3_traffic_follows_the_api_server` |
//!
//! Other ids proven here: F3 (a new connection on a reused source port),
//! F4, F7, E2, E4, E6, C6, M1, M2 (also from a second uplink), M3.
//!
//! Every test builds its own topology; dropping it removes everything, also
//! when the test fails. Run serially (`--test-threads=1`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::objects::{
    endpoint_slice, manifest, node, service, Endpoint, Object, ServiceBuilder, ServicePort,
    ServiceType,
};
use lb_tests::require_privileges;
use lb_tests::topology::{host, Frontend, Reply, Topology, EXTERNAL_IP, EXTERNAL_IP_2};

const WARMUP: Duration = Duration::from_secs(10);
/// The pod CIDR of the topology (node N has 10.244.N.0/24).
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The agent's default `--hairpin-address`.
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// node1 and node2 with the given pods, and the external client.
fn two_nodes(node1_pods: &[&str], node2_pods: &[&str]) -> Topology {
    let t = Topology::builder()
        .node("node1", node1_pods)
        .node("node2", node2_pods)
        .build()
        .expect("building the topology");
    install_probe(&t);
    t
}

fn install_probe(t: &Topology) {
    std::fs::write(t.dir().join("probe.py"), PROBE_PY).unwrap();
}

/// Writes the manifest and starts every node's agent with `args`.
fn start_agents_with(t: &Topology, yaml: &str, args: &[&str]) {
    t.write_manifests(yaml).unwrap();
    for n in t.nodes() {
        t.start_agent(&n.name, args).unwrap();
    }
}

/// Restarts every node's agent with `args` (pinned state stays) and waits
/// until each says it is ready again.
fn restart_agents_with(t: &Topology, args: &[&str]) {
    for n in t.nodes() {
        t.stop_agent(&n.name).unwrap();
        t.start_agent(&n.name, args).unwrap();
    }
    for n in t.nodes() {
        let name = format!("agent-{}", n.name);
        let deadline = Instant::now() + WARMUP;
        while !t.log(&name).contains("lb-agent ready") {
            t.check_running(&name).unwrap();
            assert!(Instant::now() < deadline, "{name}:\n{}", t.log(&name));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn pods_at(t: &Topology, pods: &[&str], port: u16) -> Vec<SocketAddrV4> {
    pods.iter().map(|p| sa(t.pod(p).ip, port)).collect()
}

fn slice_of(t: &Topology, svc: &str, ports: &[ServicePort], pods: &[&str]) -> Object {
    endpoint_slice(svc, &format!("{svc}-1"))
        .ports_of(ports)
        .endpoints(pods.iter().map(|p| Endpoint::of(t.pod(p))))
        .into()
}

/// curl from `who`, from `source` (`--interface`) and `local_port` if
/// given.
fn curl_from(
    t: &Topology,
    who: &str,
    source: Option<Ipv4Addr>,
    local_port: Option<u16>,
    url: &str,
) -> anyhow::Result<Reply> {
    let src = source.map(|s| s.to_string());
    let port = local_port.map(|p| p.to_string());
    let mut argv = vec!["curl", "-sS", "--connect-timeout", "3", "--max-time", "5"];
    if let Some(s) = &src {
        argv.extend_from_slice(&["--interface", s]);
    }
    if let Some(p) = &port {
        argv.extend_from_slice(&["--local-port", p]);
    }
    argv.push(url);
    let out = t.exec(who, &argv, Duration::from_secs(10))?.ok()?;
    Reply::parse(&out)
}

/// `probe.py HOST PORT tcp|udp TIMEOUT`: connect() (TCP), or a connected
/// UDP socket's send() and recv(); prints `ok`, `ok <answer>`, `timeout` or
/// the errno's name, then `elapsed=<seconds>` of the socket calls alone.
const PROBE_PY: &str = r#"
import errno, socket, sys, time
host, port, proto, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
t0 = time.monotonic()
try:
    if proto == "tcp":
        socket.create_connection((host, port), timeout=timeout).close()
        result = "ok"
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(b"probe\n")
        result = "ok " + s.recv(4096).decode().strip()
except socket.timeout:
    result = "timeout"
except OSError as e:
    result = errno.errorcode.get(e.errno, str(e.errno))
print("%s elapsed=%.3f" % (result, time.monotonic() - t0))
"#;

/// What `probe.py` said from `who` about `target`.
#[derive(Debug)]
struct Probe {
    result: String,
    elapsed: Duration,
}

fn probe(t: &Topology, who: &str, target: SocketAddrV4, proto: &str, timeout: f64) -> Probe {
    let script = t.dir().join("probe.py");
    let out = t
        .exec(
            who,
            &[
                python(),
                &script.to_string_lossy(),
                &target.ip().to_string(),
                &target.port().to_string(),
                proto,
                &timeout.to_string(),
            ],
            Duration::from_secs(15),
        )
        .unwrap()
        .ok()
        .unwrap();
    let line = out.trim();
    let (result, elapsed) = line
        .rsplit_once(" elapsed=")
        .unwrap_or_else(|| panic!("probe printed {line:?}"));
    Probe {
        result: result.to_string(),
        elapsed: Duration::from_secs_f64(elapsed.parse().unwrap()),
    }
}

/// One UDP request (a connected socket: send a datagram, read the answer)
/// from `who` to `target`; faster than socat, which lingers after EOF.
fn udp_request(t: &Topology, who: &str, target: SocketAddrV4) -> anyhow::Result<Reply> {
    let p = probe(t, who, target, "udp", 3.0);
    match p.result.strip_prefix("ok ") {
        Some(answer) => Reply::parse(answer),
        None => anyhow::bail!("{who} -> {target}/udp: {p:?}"),
    }
}

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `lbctl stats` counter `name` of `node`.
fn stat(t: &Topology, node: &str, name: &str) -> u64 {
    t.lbctl_json(node, "stats").unwrap()[name]
        .as_u64()
        .unwrap_or(0)
}

/// The backend ids of `frontend`'s cluster-wide set on `node`, by address.
fn backend_ids(t: &Topology, node: &str, frontend: &Frontend) -> BTreeMap<Ipv4Addr, u64> {
    let row = t.frontend_row(node, frontend).unwrap().unwrap();
    row["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().parse().unwrap(),
                b["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn has_flag(row: &serde_json::Value, flag: &str) -> bool {
    row["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(flag)))
}

/// The addresses of the node-local set of a `lbctl services` row.
fn local_backends(row: &serde_json::Value) -> BTreeSet<String> {
    row["local_backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| format!("{}:{}", b["address"].as_str().unwrap_or("?"), b["port"]))
                .collect()
        })
        .unwrap_or_default()
}

/// The backends that answered `n` requests of `who` to `url`; each answer
/// is checked by `check`.
fn backends_seen(
    t: &Topology,
    who: &str,
    url: &str,
    n: usize,
    check: impl Fn(&Reply),
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let r = t
            .request(who, url)
            .unwrap_or_else(|e| panic!("{who} -> {url}, request {i}: {e:#}"));
        check(&r);
        seen.insert(r.backend);
    }
    seen
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------- M4

/// M4 (kube e2e "should allow pods to hairpin back to themselves through
/// services"): web1 is the only endpoint of its Service; its own requests to
/// the ClusterIP come back to it, from the hairpin address 169.254.42.1
/// (its own address as source would be a martian to its kernel), over TCP
/// (new connections, and one long-lived connection) and UDP; so do its
/// requests to the Service's NodePort on its node and to its externalIP
/// (kube-proxy masquerades every hairpin flow, whatever the frontend).
#[test]
fn m4_pod_reaches_itself_through_its_service_only_endpoint() {
    require_privileges!();
    let t = two_nodes(&["web1"], &[]);
    t.spawn_backend("web1", &["http:8080", "tcp:7000", "udp:9000"])
        .unwrap();
    let vip = Ipv4Addr::new(10, 96, 1, 10);
    let external_ip = Ipv4Addr::new(203, 0, 113, 10);
    let ports = [
        ServicePort::tcp("http", 80, 8080).node_port(30100),
        ServicePort::tcp("line", 7000, 7000),
        ServicePort::udp("echo", 9000, 9000).node_port(30101),
    ];
    t.start_agents(&manifest(&[
        service("self", vip)
            .service_type(ServiceType::NodePort)
            .ports(&ports)
            .external_ip(external_ip)
            .into(),
        slice_of(&t, "self", &ports, &["web1"]),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &pods_at(&t, &["web1"], 8080),
    )
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::udp(vip, 9000),
        &pods_at(&t, &["web1"], 9000),
    )
    .unwrap();

    let node1 = t.node("node1").address;
    for url in [
        format!("http://{vip}/"),
        format!("http://{node1}:30100/"),
        format!("http://{external_ip}/"),
    ] {
        t.request_eventually("web1", &url, WARMUP).unwrap();
        for i in 0..3 {
            let r = t.request("web1", &url).unwrap();
            assert_eq!(r.backend, "web1", "{url}, request {i}: {}", r.raw);
            assert_eq!(
                *r.client.ip(),
                HAIRPIN,
                "M4: the pod must see its hairpin connection to {url} from the hairpin address: {}",
                r.raw
            );
        }
    }
    let mut conn = t.connect("web1", sa(vip, 7000)).unwrap();
    let first = conn.send("one").unwrap();
    assert_eq!(
        (first.backend.as_str(), *first.client.ip()),
        ("web1", HAIRPIN),
        "{}",
        first.raw
    );
    for i in 0..5 {
        let r = conn.send(&format!("line{i}")).unwrap();
        assert_eq!(r.client, first.client, "one connection: {}", r.raw);
    }
    for target in [sa(vip, 9000), sa(node1, 30101), sa(external_ip, 9000)] {
        for i in 0..3 {
            let r = udp_request(&t, "web1", target)
                .unwrap_or_else(|e| panic!("UDP hairpin to {target}, {i}: {e:#}"));
            assert_eq!(
                (r.backend.as_str(), *r.client.ip()),
                ("web1", HAIRPIN),
                "{target}: {}",
                r.raw
            );
        }
    }
}

/// M4 with several endpoints (web1 on node1, web2 on node2): web1's requests
/// to its Service reach both over repeated requests; when it reaches itself
/// it sees the hairpin address, when it reaches web2 web2 sees web1's own
/// address (F1). TCP and UDP.
#[test]
fn m4_pod_reaches_itself_through_its_service_one_of_several() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    for w in ["web1", "web2"] {
        t.spawn_backend(w, &["http:8080", "udp:9000"]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 96, 1, 11);
    let ports = [
        ServicePort::tcp("http", 80, 8080),
        ServicePort::udp("echo", 9000, 9000),
    ];
    t.start_agents(&manifest(&[
        service("many", vip).ports(&ports).into(),
        slice_of(&t, "many", &ports, &["web1", "web2"]),
    ]))
    .unwrap();
    let both = ["web1", "web2"];
    t.wait_for_backends("node1", &Frontend::tcp(vip, 80), &pods_at(&t, &both, 8080))
        .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::udp(vip, 9000),
        &pods_at(&t, &both, 9000),
    )
    .unwrap();

    let web1_ip = t.pod("web1").ip;
    let check = |r: &Reply| {
        let want = if r.backend == "web1" {
            HAIRPIN
        } else {
            web1_ip
        };
        assert_eq!(*r.client.ip(), want, "{}", r.raw);
    };
    let url = format!("http://{vip}/");
    t.request_eventually("web1", &url, WARMUP).unwrap();
    let seen = backends_seen(&t, "web1", &url, 20, check);
    assert_eq!(seen, set(&both), "TCP: 20 requests must reach both");

    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let r = udp_request(&t, "web1", sa(vip, 9000))
            .unwrap_or_else(|e| panic!("UDP request {i}: {e:#}"));
        check(&r);
        seen.insert(r.backend);
    }
    assert_eq!(seen, set(&both), "UDP: 20 requests must reach both");
}

// ---------------------------------------------------------------- E1, E2

/// E1 (kube e2e "should be rejected when no endpoints exist"): a
/// LoadBalancer Service whose only endpoint is not ready, with a TCP and a
/// UDP port. Every frontend refuses at once: from a pod, the ClusterIP, the
/// NodePort on this node's addresses and on the other node's, the
/// externalIP and the LB IP; from the external client, the NodePorts, the
/// externalIP and the LB IP (routed to node1). TCP gets ECONNREFUSED (a
/// reset), UDP an ICMP port unreachable (ECONNREFUSED on a connected
/// socket), each well under a second, and the refusing node counted it (so
/// it was lb, not a kernel without a listener). A Service with both
/// traffic policies Local and no endpoint anywhere refuses too (its
/// ClusterIP from a pod, its NodePort from outside).
#[test]
fn e1_refused_on_every_frontend_from_pods_and_outside() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &[]);
    let vip = Ipv4Addr::new(10, 96, 1, 20);
    let external_ip = Ipv4Addr::new(203, 0, 113, 20);
    let lb_ip = Ipv4Addr::new(203, 0, 113, 21);
    let ports = [
        ServicePort::tcp("http", 80, 8080).node_port(30200),
        ServicePort::udp("echo", 90, 9000).node_port(30201),
    ];
    let local_vip = Ipv4Addr::new(10, 96, 1, 22);
    let local_port = ServicePort::tcp("http", 80, 8080).node_port(30202);
    t.start_agents(&manifest(&[
        service("empty", vip)
            .service_type(ServiceType::LoadBalancer)
            .ports(&ports)
            .external_ip(external_ip)
            .load_balancer_ip(lb_ip)
            .into(),
        endpoint_slice("empty", "empty-1")
            .ports_of(&ports)
            .endpoint(Endpoint::of(t.pod("web1")).not_ready())
            .into(),
        // Both traffic policies Local, no endpoint anywhere: still E1, not
        // E2's drop (kube-proxy rejects when no endpoint exists at all).
        service("empty-local", local_vip)
            .service_type(ServiceType::NodePort)
            .port(local_port.clone())
            .external_traffic_policy_local()
            .internal_traffic_policy_local()
            .into(),
        endpoint_slice("empty-local", "empty-local-1")
            .ports_of(&[local_port])
            .into(),
    ]))
    .unwrap();
    for node in ["node1", "node2"] {
        for f in [
            Frontend::tcp(local_vip, 80),
            Frontend::node_port(30202, "TCP"),
            Frontend::tcp(lb_ip, 80),
            Frontend::udp(lb_ip, 90),
            Frontend::node_port(30200, "TCP"),
            Frontend::node_port(30201, "UDP"),
        ] {
            t.wait_for_backends(node, &f, &[]).unwrap();
        }
    }
    t.add_route("ext", "203.0.113.0/24", t.node("node1").address)
        .unwrap();
    let (node1, node2) = (t.node("node1").clone(), t.node("node2").clone());

    // (client, address, refusing node)
    let mut cases: Vec<(&str, Ipv4Addr, &str)> = vec![
        ("client1", vip, "node1"),
        ("client1", external_ip, "node1"),
        ("client1", lb_ip, "node1"),
        ("ext", external_ip, "node1"),
        ("ext", lb_ip, "node1"),
    ];
    for (who, addr, refuser) in [
        ("client1", node1.address, "node1"),
        ("client1", node1.gateway, "node1"),
        ("client1", node2.address, "node2"),
        ("ext", node1.address, "node1"),
        ("ext", node2.address, "node2"),
    ] {
        cases.push((who, addr, refuser));
    }
    let mut failures = Vec::new();
    let mut probes: Vec<(&str, SocketAddrV4, &str, &str)> = Vec::new();
    for (who, addr, refuser) in cases {
        let node_port = addr != vip && addr != external_ip && addr != lb_ip;
        for (proto, port) in [
            ("tcp", if node_port { 30200 } else { 80 }),
            ("udp", if node_port { 30201 } else { 90 }),
        ] {
            probes.push((who, sa(addr, port), proto, refuser));
        }
    }
    probes.push(("client1", sa(local_vip, 80), "tcp", "node1"));
    probes.push(("ext", sa(node1.address, 30202), "tcp", "node1"));
    for (who, target, proto, refuser) in probes {
        let before = stat(&t, refuser, "reject_no_endpoint");
        let p = probe(&t, who, target, proto, 3.0);
        let counted = stat(&t, refuser, "reject_no_endpoint") > before;
        if p.result != "ECONNREFUSED" || p.elapsed >= Duration::from_secs(1) || !counted {
            failures.push(format!(
                "{who} -> {target}/{proto}: {} after {:?}, {refuser} counted a reject: {counted}",
                p.result, p.elapsed
            ));
        }
    }
    // curl says it too (the kube e2e test looks for a refused connection),
    // in its own time (not counting the process start).
    let out = t
        .exec(
            "client1",
            &[
                "curl",
                "-sS",
                "--connect-timeout",
                "5",
                "-w",
                "time_total=%{time_total}",
                &format!("http://{vip}/"),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    let took = out
        .stdout
        .trim()
        .strip_prefix("time_total=")
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::MAX);
    if out.status.and_then(|s| s.code()) != Some(7) || took >= 1.0 {
        failures.push(format!("curl to the ClusterIP: {out:?}"));
    }
    assert!(
        failures.is_empty(),
        "E1: every frontend of a port without endpoints must refuse at once:\n{}",
        failures.join("\n")
    );
}

/// E2: externalTrafficPolicy=Local and no endpoint on the receiving node:
/// traffic from outside is dropped (the client times out, it is not
/// refused), on the NodePort and the externalIP, TCP and UDP; node2, which
/// has the endpoint, serves the same client. Pods of node1 are
/// short-circuited to the cluster-wide set (M3) and are served.
#[test]
fn e2_local_policy_without_local_endpoint_drops() {
    require_privileges!();
    let t = two_nodes(&["client1"], &["web2"]);
    t.spawn_backend("web2", &["http:8080", "udp:9000"]).unwrap();
    let external_ip = Ipv4Addr::new(203, 0, 113, 30);
    let ports = [
        ServicePort::tcp("http", 80, 8080).node_port(30300),
        ServicePort::udp("echo", 90, 9000).node_port(30301),
    ];
    t.start_agents(&manifest(&[
        service("local", Ipv4Addr::new(10, 96, 1, 30))
            .service_type(ServiceType::NodePort)
            .ports(&ports)
            .external_ip(external_ip)
            .external_traffic_policy_local()
            .into(),
        slice_of(&t, "local", &ports, &["web2"]),
    ]))
    .unwrap();
    let web2 = pods_at(&t, &["web2"], 8080);
    for node in ["node1", "node2"] {
        t.wait_for_backends(node, &Frontend::node_port(30300, "TCP"), &web2)
            .unwrap();
    }
    t.add_route("ext", &format!("{external_ip}/32"), t.node("node1").address)
        .unwrap();
    let (node1, node2) = (t.node("node1").address, t.node("node2").address);

    // The control: node2 has the endpoint (and keeps the client's address, M3).
    let r = t
        .request_eventually("ext", &format!("http://{node2}:30300/"), WARMUP)
        .unwrap();
    assert_eq!((r.backend.as_str(), *r.client.ip()), ("web2", EXTERNAL_IP));
    let p = probe(&t, "ext", sa(node2, 30301), "udp", 2.0);
    assert!(p.result.starts_with("ok backend=web2"), "{p:?}");

    for (target, proto) in [
        (sa(node1, 30300), "tcp"),
        (sa(node1, 30301), "udp"),
        (sa(external_ip, 80), "tcp"),
        (sa(external_ip, 90), "udp"),
    ] {
        let before = stat(&t, "node1", "drop_no_backend");
        let p = probe(&t, "ext", target, proto, 2.0);
        assert_eq!(
            p.result, "timeout",
            "E2: ext -> {target}/{proto} must be dropped (a timeout), not refused: {p:?}"
        );
        assert!(
            stat(&t, "node1", "drop_no_backend") > before,
            "{target}/{proto}"
        );
    }

    // M3: a pod of node1 uses the cluster-wide set.
    let r = t
        .request_eventually("client1", &format!("http://{node1}:30300/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web2", "{}", r.raw);
}

// ---------------------------------------------------------------- F7

/// F7: a LoadBalancer Service whose loadBalancerSourceRanges hold only
/// 192.0.2.0/24: the external client (198.18.0.100) gets nothing on the LB
/// IP (dropped: a timeout), while the NodePort and the ClusterIP of the same
/// port still serve. A live manifest edit adding the client's /32 opens the
/// LB IP; removing it again closes it.
#[test]
fn f7_source_ranges_restrict_lb_ips_not_node_ports() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &[]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 1, 40);
    let lb_ip = Ipv4Addr::new(203, 0, 113, 40);
    let http = [ServicePort::tcp("http", 80, 8080).node_port(30400)];
    let with = |ranges: &[&str]| {
        manifest(&[
            service("fw", vip)
                .service_type(ServiceType::LoadBalancer)
                .ports(&http)
                .load_balancer_ip(lb_ip)
                .load_balancer_source_ranges(ranges)
                .into(),
            slice_of(&t, "fw", &http, &["web1"]),
        ])
    };
    t.start_agents(&with(&["192.0.2.0/24"])).unwrap();
    t.wait_for_frontend("node1", &Frontend::tcp(lb_ip, 80), "filtered", |r| {
        has_flag(r, "source-ranges") && r["backends"].as_array().is_some_and(|b| b.len() == 1)
    })
    .unwrap();
    t.add_route("ext", &format!("{lb_ip}/32"), t.node("node1").address)
        .unwrap();
    let node1 = t.node("node1").address;
    let lb_url = format!("http://{lb_ip}/");

    // The NodePort of the same port is not filtered.
    let r = t
        .request_eventually("ext", &format!("http://{node1}:30400/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web1");
    // Nor is the ClusterIP.
    let r = t
        .request_eventually("client1", &format!("http://{vip}/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web1");

    let before = stat(&t, "node1", "drop_source_range");
    let p = probe(&t, "ext", sa(lb_ip, 80), "tcp", 2.0);
    assert_eq!(
        p.result, "timeout",
        "F7: the LB IP must drop 198.18.0.100: {p:?}"
    );
    assert!(stat(&t, "node1", "drop_source_range") > before);

    // The client's range added: the LB IP opens.
    t.write_manifests(&with(&["192.0.2.0/24", "198.18.0.100/32"]))
        .unwrap();
    let r = t.request_eventually("ext", &lb_url, WARMUP).unwrap();
    assert_eq!(r.backend, "web1");
    for _ in 0..3 {
        assert_eq!(t.request("ext", &lb_url).unwrap().backend, "web1");
    }

    // And removed again: closed again.
    t.write_manifests(&with(&["192.0.2.0/24"])).unwrap();
    let deadline = Instant::now() + WARMUP;
    loop {
        let p = probe(&t, "ext", sa(lb_ip, 80), "tcp", 1.0);
        if p.result == "timeout" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the LB IP stays open after the range was removed: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = t.request("ext", &format!("http://{node1}:30400/")).unwrap();
    assert_eq!(r.backend, "web1", "the NodePort stays open");
}

// ---------------------------------------------------------------- F8, C6

/// F8 (kube e2e "should have session affinity work / timeout work / be able
/// to switch", ClusterIP and NodePort): sessionAffinity ClientIP with
/// timeoutSeconds 3, backends web1 (node1) and web2 (node2). Clients are 16
/// source addresses of a pod (to the ClusterIP) and 16 of the external
/// client (to node1's NodePort), each an affinity client of its own:
/// - each sticks to one backend over repeated requests, and the choice is
///   random per client (both backends chosen by some);
/// - after more than 3 s idle, the choice is made anew: some client (of
///   16, each changing with probability 1/2) lands on the other backend;
/// - switched to None: one client's new flows spread over both backends;
/// - switched back to ClientIP: every client sticks again.
#[test]
fn f8_affinity_timeout_and_switch_from_pods_and_outside() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 1, 50);
    let http = [ServicePort::tcp("http", 80, 8080).node_port(30500)];
    let with = |affinity: bool| {
        let mut s = service("sticky", vip)
            .service_type(ServiceType::NodePort)
            .ports(&http);
        if affinity {
            s = s.session_affinity_client_ip(Some(3));
        }
        manifest(&[s.into(), slice_of(&t, "sticky", &http, &["web1", "web2"])])
    };
    t.start_agents(&with(true)).unwrap();
    let both = ["web1", "web2"];
    let cluster_ip = Frontend::tcp(vip, 80);
    let node_port = Frontend::node_port(30500, "TCP");
    for f in [&cluster_ip, &node_port] {
        t.wait_for_backends("node1", f, &pods_at(&t, &both, 8080))
            .unwrap();
        t.wait_for_frontend("node1", f, "sticky for 3 s", |r| {
            has_flag(r, "affinity") && r["affinity_timeout_sec"] == 3
        })
        .unwrap();
    }

    // 16 source addresses each: the pod's (10.244.1.200-215) and the
    // external client's (198.18.0.200-215).
    let node1 = t.node("node1").address;
    let mut clients: Vec<(&str, Ipv4Addr, String)> = Vec::new();
    for i in 0..16u8 {
        let pod_src = Ipv4Addr::new(10, 244, 1, 200 + i);
        let ext_src = Ipv4Addr::new(198, 18, 0, 200 + i);
        t.sh("client1", &format!("ip addr add {pod_src}/32 dev eth0"))
            .unwrap();
        t.sh("ext", &format!("ip addr add {ext_src}/32 dev eth0"))
            .unwrap();
        clients.push(("client1", pod_src, format!("http://{vip}/")));
        clients.push(("ext", ext_src, format!("http://{node1}:30500/")));
    }
    for (who, src, url) in &clients[..2] {
        let deadline = Instant::now() + WARMUP;
        while curl_from(&t, who, Some(*src), None, url).is_err() {
            assert!(
                Instant::now() < deadline,
                "{who} ({src}) -> {url}: no answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Every request from a source port of its own: a port reused while
    // the conntrack entry of its closed connection lives is another
    // matter (see `f3_new_connection_on_the_port_of_a_closed_one_is_a_new_flow`).
    let next_port = std::cell::Cell::new(20000u16);
    let ask = |who: &str, src: Ipv4Addr, url: &str| -> String {
        let port = next_port.get();
        next_port.set(port + 1);
        let r = curl_from(&t, who, Some(src), Some(port), url)
            .unwrap_or_else(|e| panic!("{who} ({src}:{port}) -> {url}: {e:#}"));
        if who == "client1" {
            assert_eq!(*r.client.ip(), src, "F1: {}", r.raw);
        }
        r.backend
    };
    // Each client sticks; returns each client's backend, and when it was
    // last used.
    let sticky_round = |n: usize| -> (Vec<String>, Instant) {
        let mut chosen = Vec::new();
        for (who, src, url) in &clients {
            let first = ask(who, *src, url);
            for i in 1..n {
                let again = ask(who, *src, url);
                assert_eq!(
                    again, first,
                    "F8: {who} from {src} -> {url}: request {i} left its backend"
                );
            }
            chosen.push(first);
        }
        (chosen, Instant::now())
    };
    let by_kind = |chosen: &[String], kind: &str| -> BTreeSet<String> {
        clients
            .iter()
            .zip(chosen)
            .filter(|((who, _, _), _)| *who == kind)
            .map(|(_, b)| b.clone())
            .collect()
    };

    let (before, last_use) = sticky_round(4);
    for kind in ["client1", "ext"] {
        assert_eq!(
            by_kind(&before, kind),
            set(&both),
            "F8: 16 clients ({kind}) must not all be sent to one backend"
        );
    }

    // Idle for longer than the timeout: a new choice for each client.
    std::thread::sleep(
        (last_use + Duration::from_millis(3600)).saturating_duration_since(Instant::now()),
    );
    let (after, _) = sticky_round(2);
    for kind in ["client1", "ext"] {
        let changed = clients
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|((who, _, _), (b, a))| *who == kind && b != a)
            .count();
        assert!(
            changed > 0,
            "F8: after the 3 s timeout no {kind} client of 16 got a new backend (before {before:?}, after {after:?})"
        );
    }

    // Switched to None: new flows of one client spread.
    t.write_manifests(&with(false)).unwrap();
    for f in [&cluster_ip, &node_port] {
        t.wait_for_frontend("node1", f, "without affinity", |r| !has_flag(r, "affinity"))
            .unwrap();
    }
    for (who, src, url) in &clients[..2] {
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            seen.insert(ask(who, *src, url));
        }
        assert_eq!(
            seen,
            set(&both),
            "F8: switched to None, {who} ({src}) -> {url} must reach both in 20 requests"
        );
    }

    // Switched back: sticky again.
    t.write_manifests(&with(true)).unwrap();
    for f in [&cluster_ip, &node_port] {
        t.wait_for_frontend("node1", f, "sticky again", |r| has_flag(r, "affinity"))
            .unwrap();
    }
    sticky_round(4);
}

/// C6: affinity never sends a client to an endpoint that is not, right now,
/// one of the Service's. Service A (ClientIP affinity, a1 and a2) and
/// Service B (b1). client1 sticks to one of A's endpoints; that endpoint
/// leaves A (its backend id is freed), then B gains b2, which gets the freed
/// id (smallest free id first). client1's next requests to A reach A's
/// other endpoint, never b2.
#[test]
fn c6_affinity_never_follows_a_reused_backend_id() {
    require_privileges!();
    let t = two_nodes(&["client1", "a1"], &["a2", "b1", "b2"]);
    for p in ["a1", "a2", "b1", "b2"] {
        t.spawn_backend(p, &["http:8080"]).unwrap();
    }
    let (vip_a, vip_b) = (Ipv4Addr::new(10, 96, 1, 60), Ipv4Addr::new(10, 96, 1, 61));
    let http = [ServicePort::tcp("http", 80, 8080)];
    let with = |a: &[&str], b: &[&str]| {
        manifest(&[
            service("a", vip_a)
                .ports(&http)
                .session_affinity_client_ip(None)
                .into(),
            slice_of(&t, "a", &http, a),
            service("b", vip_b).ports(&http).into(),
            slice_of(&t, "b", &http, b),
        ])
    };
    let (fa, fb) = (Frontend::tcp(vip_a, 80), Frontend::tcp(vip_b, 80));
    t.start_agents(&with(&["a1", "a2"], &["b1"])).unwrap();
    t.wait_for_backends("node1", &fa, &pods_at(&t, &["a1", "a2"], 8080))
        .unwrap();
    t.wait_for_backends("node1", &fb, &pods_at(&t, &["b1"], 8080))
        .unwrap();

    let url = format!("http://{vip_a}/");
    let sticky = t
        .request_eventually("client1", &url, WARMUP)
        .unwrap()
        .backend;
    for i in 0..5 {
        assert_eq!(
            t.request("client1", &url).unwrap().backend,
            sticky,
            "request {i}"
        );
    }
    let other = if sticky == "a1" { "a2" } else { "a1" };
    let freed = backend_ids(&t, "node1", &fa)[&t.pod(&sticky).ip];

    // The sticky endpoint leaves A: its id is freed (not reused in the same
    // plan); then B gains b2.
    t.write_manifests(&with(&[other], &["b1"])).unwrap();
    t.wait_for_backends("node1", &fa, &pods_at(&t, &[other], 8080))
        .unwrap();
    t.write_manifests(&with(&[other], &["b1", "b2"])).unwrap();
    t.wait_for_backends("node1", &fb, &pods_at(&t, &["b1", "b2"], 8080))
        .unwrap();
    let b2_id = backend_ids(&t, "node1", &fb)[&t.pod("b2").ip];
    assert_eq!(
        b2_id, freed,
        "the test needs b2 to get {sticky}'s freed backend id (smallest free id first)"
    );

    let stale = stat(&t, "node1", "affinity_stale");
    for i in 0..10 {
        let r = t.request("client1", &url).unwrap();
        assert_eq!(
            r.backend, other,
            "C6: request {i} to Service a went to {} (a's endpoints: {other})",
            r.backend
        );
    }
    assert!(stat(&t, "node1", "affinity_stale") > stale);
}

/// `fixed_port.py HOST PORT SPORT`: one HTTP request from local port SPORT
/// (SO_REUSEADDR), closed with a reset (SO_LINGER 0, as load balancers'
/// health checkers and connection pools abort connections), so the port
/// is free again at once; prints the answer's last line.
const FIXED_PORT_PY: &str = r#"
import socket, struct, sys
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.bind(("0.0.0.0", sport))
s.settimeout(3)
try:
    s.connect((host, port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        data += d
    print(data.decode().splitlines()[-1])
except Exception as e:
    print("ERROR", e)
s.close()
"#;

/// F3 (and what makes F8's switch and every endpoint removal effective):
/// a new TCP connection is a new flow even when it reuses the source port
/// of a connection that is closed (reset) but whose conntrack entry still
/// lives. netfilter treats a SYN on a CLOSE/TIME_WAIT entry as a new
/// connection and makes a new NAT decision. client1 connects 16 times from
/// port 40000 to a ClusterIP with web1 and web2: both must be chosen. Then
/// the backend of the last of them leaves the Service (its pod still
/// runs): the next connection from port 40000 must reach the endpoint
/// that is left.
#[test]
fn f3_new_connection_on_the_port_of_a_closed_one_is_a_new_flow() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let vip = Ipv4Addr::new(10, 96, 1, 150);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let with = |pods: &[&str]| {
        manifest(&[
            service("web", vip).ports(&http).into(),
            slice_of(&t, "web", &http, pods),
        ])
    };
    t.start_agents(&with(&["web1", "web2"])).unwrap();
    let front = Frontend::tcp(vip, 80);
    t.wait_for_backends("node1", &front, &pods_at(&t, &["web1", "web2"], 8080))
        .unwrap();
    t.request_eventually("client1", &format!("http://{vip}/"), WARMUP)
        .unwrap();
    let script = t.dir().join("fixed_port.py");
    std::fs::write(&script, FIXED_PORT_PY).unwrap();
    let from_40000 = || -> Reply {
        let out = t
            .exec(
                "client1",
                &[
                    python(),
                    &script.to_string_lossy(),
                    &vip.to_string(),
                    "80",
                    "40000",
                ],
                Duration::from_secs(10),
            )
            .unwrap()
            .ok()
            .unwrap();
        Reply::parse(&out).unwrap_or_else(|e| panic!("{e:#}"))
    };
    let mut seen = Vec::new();
    for _ in 0..16 {
        let r = from_40000();
        assert_eq!(r.client.port(), 40000, "{}", r.raw);
        seen.push(r.backend);
    }
    let last = seen.last().unwrap().clone();
    let distinct: BTreeSet<&String> = seen.iter().collect();

    let keep = if last == "web1" { "web2" } else { "web1" };
    t.write_manifests(&with(&[keep])).unwrap();
    t.wait_for_backends("node1", &front, &pods_at(&t, &[keep], 8080))
        .unwrap();
    let after: Vec<String> = (0..3).map(|_| from_40000().backend).collect();
    let ct = t.lbctl("node1", &["conntrack"]).unwrap();
    assert!(
        distinct.len() == 2 && after.iter().all(|b| b == keep),
        "F3: each new connection from port 40000 must be a new flow:\n\
         16 connections went to {seen:?}\n\
         after {last} left the Service, 3 more went to {after:?} (must be {keep})\n\
         node1 conntrack:\n{ct}"
    );
}

// ---------------------------------------------------------------- E4

/// E4: a pod's UDP flow (one connected socket: the same source port
/// throughout, a datagram every 100 ms) to Service A. Its endpoint leaves A
/// but stays an endpoint of Service B (so the pod still answers and its
/// address:port still is a backend of this node). Every datagram sent
/// after the maps show A without it reaches A's other endpoint: the flow
/// moved at once, on the same source port.
#[test]
fn e4_udp_flow_moves_at_once_even_if_the_endpoint_still_serves_another_service() {
    require_privileges!();
    let t = two_nodes(&["client1", "u1"], &["u2"]);
    t.spawn_backend("u1", &["udp:9000"]).unwrap();
    t.spawn_backend("u2", &["udp:9000"]).unwrap();
    let (vip_a, vip_b) = (Ipv4Addr::new(10, 96, 1, 70), Ipv4Addr::new(10, 96, 1, 71));
    let udp = [ServicePort::udp("echo", 9000, 9000)];
    let with = |a: &[&str]| {
        manifest(&[
            service("a", vip_a).ports(&udp).into(),
            slice_of(&t, "a", &udp, a),
            service("b", vip_b).ports(&udp).into(),
            slice_of(&t, "b", &udp, &["u1", "u2"]),
        ])
    };
    let both = ["u1", "u2"];
    let (fa, fb) = (Frontend::udp(vip_a, 9000), Frontend::udp(vip_b, 9000));
    t.start_agents(&with(&both)).unwrap();
    t.wait_for_backends("node1", &fa, &pods_at(&t, &both, 9000))
        .unwrap();
    t.wait_for_backends("node1", &fb, &pods_at(&t, &both, 9000))
        .unwrap();
    let deadline = Instant::now() + WARMUP;
    while udp_request(&t, "client1", sa(vip_a, 9000)).is_err() {
        assert!(Instant::now() < deadline, "no UDP answer through {vip_a}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut conn = t.connect_udp("client1", sa(vip_a, 9000)).unwrap();
    let first = conn.send("first").unwrap();
    let old = first.backend.clone();
    let keep = if old == "u1" { "u2" } else { "u1" };

    // A datagram every 100 ms, on the same socket, in the background.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut log: Vec<(Instant, Result<Reply, String>)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                log.push((
                    sent,
                    conn.send(&format!("n{i}")).map_err(|e| format!("{e:#}")),
                ));
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            log
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let moved_before = stat(&t, "node1", "flow_moved");
    let written = Instant::now();
    t.write_manifests(&with(&[keep])).unwrap();
    t.wait_for_backends("node1", &fa, &pods_at(&t, &[keep], 9000))
        .unwrap();
    let applied = Instant::now();
    // B still has the old endpoint.
    t.wait_for_backends("node1", &fb, &pods_at(&t, &both, 9000))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let log = sender.join().unwrap();

    let mut failures = Vec::new();
    let mut first_moved = None;
    for (sent, r) in &log {
        match r {
            Ok(r) => {
                if r.client != first.client || !r.raw.ends_with("reconnects=0") {
                    failures.push(format!("not the same flow: {}", r.raw));
                }
                if r.backend == keep && first_moved.is_none() {
                    first_moved = Some(*sent);
                }
                if *sent >= applied && r.backend != keep {
                    failures.push(format!(
                        "sent {:?} after the maps changed, answered by {}: {}",
                        sent.duration_since(applied),
                        r.backend,
                        r.raw
                    ));
                }
            }
            Err(e) => failures.push(format!(
                "sent {:?} after the edit: {e}",
                sent.saturating_duration_since(written)
            )),
        }
    }
    let before_count = log.iter().filter(|(s, _)| *s < written).count();
    assert!(before_count >= 3, "the flow ran before the edit: {log:?}");
    assert!(
        failures.is_empty(),
        "E4: the UDP flow must leave {old} at once when it leaves Service a (it still serves b):\n{}",
        failures.join("\n")
    );
    let first_moved = first_moved.expect("the flow never moved");
    assert!(
        first_moved.saturating_duration_since(applied) < Duration::from_secs(1),
        "moved {:?} after the maps changed",
        first_moved.saturating_duration_since(applied)
    );
    assert!(stat(&t, "node1", "flow_moved") > moved_before);
}

// ---------------------------------------------------------------- M1, M2, M3

/// M1: the external client routes the Service CIDR to node1 and calls
/// ClusterIPs. Without --cluster-cidr (kube-proxy without a cluster CIDR
/// does not masquerade it either) a local backend sees the client's
/// address; with --cluster-cidr 10.244.0.0/16 it sees node1's address,
/// while pods (inside the cluster CIDR) keep theirs. A backend on another
/// node sees node1's address either way (its reply must come back through
/// node1).
#[test]
fn m1_cluster_ip_from_outside_the_cluster_cidr_is_snated() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (local_vip, remote_vip) = (Ipv4Addr::new(10, 96, 1, 90), Ipv4Addr::new(10, 96, 1, 91));
    let http = [ServicePort::tcp("http", 80, 8080)];
    t.start_agents(&manifest(&[
        service("m1-local", local_vip).ports(&http).into(),
        slice_of(&t, "m1-local", &http, &["web1"]),
        service("m1-remote", remote_vip).ports(&http).into(),
        slice_of(&t, "m1-remote", &http, &["web2"]),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(local_vip, 80),
        &pods_at(&t, &["web1"], 8080),
    )
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(remote_vip, 80),
        &pods_at(&t, &["web2"], 8080),
    )
    .unwrap();
    let node1 = t.node("node1").address;
    t.add_route("ext", "10.96.0.0/12", node1).unwrap();
    let (local_url, remote_url) = (
        format!("http://{local_vip}/"),
        format!("http://{remote_vip}/"),
    );
    let client1 = t.pod("client1").ip;

    // Without --cluster-cidr.
    let r = t.request_eventually("ext", &local_url, WARMUP).unwrap();
    assert_eq!(
        (r.backend.as_str(), *r.client.ip()),
        ("web1", EXTERNAL_IP),
        "no --cluster-cidr: the client's address is kept: {}",
        r.raw
    );
    let r = t.request_eventually("ext", &remote_url, WARMUP).unwrap();
    assert_eq!(
        (r.backend.as_str(), *r.client.ip()),
        ("web2", node1),
        "{}",
        r.raw
    );

    restart_agents_with(&t, &["--cluster-cidr", CLUSTER_CIDR]);
    for i in 0..3 {
        let r = t.request("ext", &local_url).unwrap();
        assert_eq!(
            (r.backend.as_str(), *r.client.ip()),
            ("web1", node1),
            "M1: request {i} from outside the cluster CIDR must be SNATed to node1: {}",
            r.raw
        );
        let r = t.request("ext", &remote_url).unwrap();
        assert_eq!(
            (r.backend.as_str(), *r.client.ip()),
            ("web2", node1),
            "{}",
            r.raw
        );
        for url in [&local_url, &remote_url] {
            let r = t.request("client1", url).unwrap();
            assert_eq!(
                *r.client.ip(),
                client1,
                "F1: a pod keeps its address: {}",
                r.raw
            );
        }
    }
}

/// M2: externalTrafficPolicy Cluster, from the external client: NodePort,
/// externalIP and LB IP, with the backend on the receiving node and on the
/// other one; the backend always sees the receiving node's address.
#[test]
fn m2_external_traffic_policy_cluster_snats_local_and_remote() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let mut objects = Vec::new();
    let mut cases = Vec::new();
    for (i, (name, pod)) in [("m2-local", "web1"), ("m2-remote", "web2")]
        .into_iter()
        .enumerate()
    {
        let i = i as u8;
        let np = 30610 + u16::from(i);
        let (external_ip, lb_ip) = (
            Ipv4Addr::new(203, 0, 113, 60 + 2 * i),
            Ipv4Addr::new(203, 0, 113, 61 + 2 * i),
        );
        let http = [ServicePort::tcp("http", 80, 8080).node_port(np)];
        objects.push(
            service(name, Ipv4Addr::new(10, 96, 1, 100 + i))
                .service_type(ServiceType::LoadBalancer)
                .ports(&http)
                .external_ip(external_ip)
                .load_balancer_ip(lb_ip)
                .into(),
        );
        objects.push(slice_of(&t, name, &http, &[pod]));
        cases.push((pod, np, external_ip, lb_ip));
    }
    t.start_agents(&manifest(&objects)).unwrap();
    for &(pod, np, _, lb_ip) in &cases {
        t.wait_for_backends(
            "node1",
            &Frontend::tcp(lb_ip, 80),
            &pods_at(&t, &[pod], 8080),
        )
        .unwrap();
        t.wait_for_backends(
            "node2",
            &Frontend::node_port(np, "TCP"),
            &pods_at(&t, &[pod], 8080),
        )
        .unwrap();
    }
    let (node1, node2) = (t.node("node1").address, t.node("node2").address);
    t.add_route("ext", "203.0.113.0/24", node1).unwrap();
    for (pod, np, external_ip, lb_ip) in cases {
        for (url, via) in [
            (format!("http://{node1}:{np}/"), node1),
            (format!("http://{node2}:{np}/"), node2),
            (format!("http://{external_ip}/"), node1),
            (format!("http://{lb_ip}/"), node1),
        ] {
            t.request_eventually("ext", &url, WARMUP).unwrap();
            for _ in 0..3 {
                let r = t.request("ext", &url).unwrap();
                assert_eq!(
                    (r.backend.as_str(), *r.client.ip()),
                    (pod, via),
                    "M2: {url} must be SNATed to the receiving node's address: {}",
                    r.raw
                );
            }
        }
    }
}

/// M2 on a node with a second uplink that the other nodes cannot reach
/// (only node1 is on the second lan, 198.19.0.0/24, as an edge node's
/// extra network): external traffic to node1's second-uplink address, for
/// a NodePort and for an externalIP routed there, whose backend is on
/// node2. kube-proxy masquerades to the address of the interface the packet
/// leaves by towards the backend (node1's eth0, 198.18.0.11), which node2
/// reaches, so the connection works; the same Service through node1's eth0
/// is the control.
#[test]
fn m2_snat_from_a_second_uplink_to_a_remote_backend_uses_an_address_the_backend_reaches() {
    require_privileges!();
    let t = Topology::builder()
        .node("node1", &["web1"])
        .node("node2", &["web2"])
        .second_lan_on(&["node1"])
        .build()
        .expect("building the topology");
    install_probe(&t);
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let external_ip = Ipv4Addr::new(203, 0, 113, 90);
    let http = [ServicePort::tcp("http", 80, 8080).node_port(30900)];
    let yaml = manifest(&[
        service("remote", Ipv4Addr::new(10, 96, 1, 160))
            .service_type(ServiceType::NodePort)
            .ports(&http)
            .external_ip(external_ip)
            .into(),
        slice_of(&t, "remote", &http, &["web2"]),
    ]);
    t.write_manifests(&yaml).unwrap();
    t.start_agent("node1", &["--uplink", "eth1"]).unwrap();
    t.start_agent("node2", &[]).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30900, "TCP"),
        &pods_at(&t, &["web2"], 8080),
    )
    .unwrap();
    let n1 = t.node("node1").clone();
    let n1_eth1 = n1.second_uplink.as_ref().unwrap().1;
    assert!(t.node("node2").second_uplink.is_none());
    t.add_route("ext", &format!("{external_ip}/32"), n1_eth1)
        .unwrap();

    let r = t
        .request_eventually("ext", &format!("http://{}:30900/", n1.address), WARMUP)
        .unwrap();
    assert_eq!((r.backend.as_str(), *r.client.ip()), ("web2", n1.address));
    let mut failures = Vec::new();
    for url in [
        format!("http://{n1_eth1}:30900/"),
        format!("http://{external_ip}/"),
    ] {
        match t.request_eventually("ext", &url, Duration::from_secs(4)) {
            Ok(r) if r.backend == "web2" => {}
            Ok(r) => failures.push(format!("{url}: {}", r.raw)),
            Err(e) => failures.push(format!("{url}: {e:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "M2: a flow from node1's second uplink to a backend on node2 must be SNATed to an \
         address node2 can answer (kube-proxy: the egress interface's, 198.18.0.11):\n{}\n\
         node1 conntrack:\n{}",
        failures.join("\n"),
        t.lbctl("node1", &["conntrack"]).unwrap_or_default()
    );
}

/// M3: externalTrafficPolicy Local (LoadBalancer with an externalIP and an
/// LB IP, endpoints web1 on node1 and web2 on node2): from the external
/// client every frontend of node1 reaches web1 only and node2's NodePort
/// web2 only, each seeing the client's own address; a pod of node1 is
/// short-circuited to the cluster-wide set (both backends).
#[test]
fn m3_external_traffic_policy_local_keeps_the_client_address() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let external_ip = Ipv4Addr::new(203, 0, 113, 70);
    let lb_ip = Ipv4Addr::new(203, 0, 113, 71);
    let http = [ServicePort::tcp("http", 80, 8080).node_port(30700)];
    t.start_agents(&manifest(&[
        service("m3", Ipv4Addr::new(10, 96, 1, 110))
            .service_type(ServiceType::LoadBalancer)
            .ports(&http)
            .external_ip(external_ip)
            .load_balancer_ip(lb_ip)
            .external_traffic_policy_local()
            .health_check_node_port(32700)
            .into(),
        slice_of(&t, "m3", &http, &["web1", "web2"]),
    ]))
    .unwrap();
    let both = ["web1", "web2"];
    for node in ["node1", "node2"] {
        t.wait_for_backends(
            node,
            &Frontend::node_port(30700, "TCP"),
            &pods_at(&t, &both, 8080),
        )
        .unwrap();
    }
    let (node1, node2) = (t.node("node1").address, t.node("node2").address);
    t.add_route("ext", "203.0.113.0/24", node1).unwrap();
    for (url, want) in [
        (format!("http://{node1}:30700/"), "web1"),
        (format!("http://{external_ip}/"), "web1"),
        (format!("http://{lb_ip}/"), "web1"),
        (format!("http://{node2}:30700/"), "web2"),
    ] {
        t.request_eventually("ext", &url, WARMUP).unwrap();
        let seen = backends_seen(&t, "ext", &url, 8, |r| {
            assert_eq!(
                *r.client.ip(),
                EXTERNAL_IP,
                "M3: {url} must keep the client's address: {}",
                r.raw
            )
        });
        assert_eq!(seen, set(&[want]), "M3: {url}: local endpoints only");
    }
    let url = format!("http://{node1}:30700/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let seen = backends_seen(&t, "client1", &url, 20, |_| {});
    assert_eq!(seen, set(&both), "M3: a pod uses the cluster-wide set");
}

// ---------------------------------------------------------------- E3, E5, E6

/// E6: Nodes labelled zone-a (node1) and zone-b (node2), EndpointSlice
/// hints, no annotation on any Service. From pods:
/// - zone hints: node1's client reaches the endpoints hinted for zone-a
///   (a1 on node1, b1 on node2), never b2 (zone-b); node2's only b2;
/// - node hints win over zone hints: node1's client reaches only b1 (hinted
///   for node1, in zone-b), never a1 (which its zone hint would pick);
/// - the node-local set (internalTrafficPolicy Local) ignores hints: node1's
///   client reaches both its local endpoints, the one hinted for node2
///   included, and never b1 (hinted for node1 but remote).
#[test]
fn e6_topology_hints_from_pods() {
    require_privileges!();
    let t = two_nodes(&["client1", "a1", "a2"], &["client2", "b1", "b2"]);
    for p in ["a1", "a2", "b1", "b2"] {
        t.spawn_backend(p, &["http:8080"]).unwrap();
    }
    let http = [ServicePort::tcp("http", 80, 8080)];
    let ep = |p: &str| Endpoint::of(t.pod(p));
    let (zonal, nodal, local) = (
        Ipv4Addr::new(10, 96, 1, 81),
        Ipv4Addr::new(10, 96, 1, 82),
        Ipv4Addr::new(10, 96, 1, 83),
    );
    let slice = |svc: &str, eps: Vec<Endpoint>| -> Object {
        endpoint_slice(svc, &format!("{svc}-1"))
            .ports_of(&http)
            .endpoints(eps)
            .into()
    };
    let svc = |name: &str, ip| -> ServiceBuilder { service(name, ip).ports(&http) };
    t.start_agents(&manifest(&[
        node("node1").label(ZONE_LABEL, "zone-a").into(),
        node("node2").label(ZONE_LABEL, "zone-b").into(),
        svc("zonal", zonal).into(),
        slice(
            "zonal",
            vec![
                ep("a1").for_zone("zone-a"),
                ep("b1").for_zone("zone-a"),
                ep("b2").for_zone("zone-b"),
            ],
        ),
        svc("nodal", nodal).into(),
        slice(
            "nodal",
            vec![
                ep("a1").for_node("node2").for_zone("zone-a"),
                ep("b1").for_node("node1").for_zone("zone-b"),
                ep("b2").for_node("node2").for_zone("zone-b"),
            ],
        ),
        svc("local", local).internal_traffic_policy_local().into(),
        slice(
            "local",
            vec![
                ep("a1").for_node("node2"),
                ep("a2").for_node("node1"),
                ep("b1").for_node("node1"),
            ],
        ),
    ]))
    .unwrap();
    // What each node's agent made of the hints.
    for (node, vip, want) in [
        ("node1", zonal, vec!["a1", "b1"]),
        ("node2", zonal, vec!["b2"]),
        ("node1", nodal, vec!["b1"]),
        ("node2", nodal, vec!["a1", "b2"]),
    ] {
        t.wait_for_backends(node, &Frontend::tcp(vip, 80), &pods_at(&t, &want, 8080))
            .unwrap();
    }
    for (node, want) in [("node1", vec!["a1", "a2"]), ("node2", vec!["b1"])] {
        let want: BTreeSet<String> = pods_at(&t, &want, 8080)
            .iter()
            .map(|a| a.to_string())
            .collect();
        t.wait_for_frontend(node, &Frontend::tcp(local, 80), "with its local set", |r| {
            local_backends(r) == want
        })
        .unwrap();
    }

    for (who, vip, want, n) in [
        ("client1", zonal, vec!["a1", "b1"], 20),
        ("client2", zonal, vec!["b2"], 8),
        ("client1", nodal, vec!["b1"], 8),
        ("client2", nodal, vec!["a1", "b2"], 20),
        ("client1", local, vec!["a1", "a2"], 20),
        ("client2", local, vec!["b1"], 8),
    ] {
        let url = format!("http://{vip}/");
        t.request_eventually(who, &url, WARMUP).unwrap();
        let seen = backends_seen(&t, who, &url, n, |_| {});
        assert_eq!(seen, set(&want), "E6: {who} -> {vip}");
    }
}

/// E5 (kube e2e "should respect internalTrafficPolicy=Local"): a ClusterIP
/// with internalTrafficPolicy Local and endpoints web1 (node1) and web2
/// (node2): each node's pod reaches only its local endpoint; a Service whose
/// only endpoint is on node2 drops node1's pods (a timeout, E2), and serves
/// node2's.
#[test]
fn e5_internal_traffic_policy_local_from_pods() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["client2", "web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (vip, remote_vip) = (Ipv4Addr::new(10, 96, 1, 120), Ipv4Addr::new(10, 96, 1, 121));
    let http = [ServicePort::tcp("http", 80, 8080)];
    t.start_agents(&manifest(&[
        service("itp", vip)
            .ports(&http)
            .internal_traffic_policy_local()
            .into(),
        slice_of(&t, "itp", &http, &["web1", "web2"]),
        service("itp-remote", remote_vip)
            .ports(&http)
            .internal_traffic_policy_local()
            .into(),
        slice_of(&t, "itp-remote", &http, &["web2"]),
    ]))
    .unwrap();
    for node in ["node1", "node2"] {
        t.wait_for_frontend(node, &Frontend::tcp(remote_vip, 80), "programmed", |r| {
            has_flag(r, "internal-traffic-local")
        })
        .unwrap();
    }
    let url = format!("http://{vip}/");
    for (who, want) in [("client1", "web1"), ("client2", "web2")] {
        t.request_eventually(who, &url, WARMUP).unwrap();
        let ip = t.pod(who).ip;
        let seen = backends_seen(&t, who, &url, 12, |r| assert_eq!(*r.client.ip(), ip));
        assert_eq!(seen, set(&[want]), "E5: {who}");
    }
    let r = t
        .request_eventually("client2", &format!("http://{remote_vip}/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web2");
    let p = probe(&t, "client1", sa(remote_vip, 80), "tcp", 2.0);
    assert_eq!(
        p.result, "timeout",
        "E2/E5: no local endpoint on node1: {p:?}"
    );
}

/// E3 and H1 (kube e2e "should fallback to terminating endpoints when there
/// are no ready endpoints", "... local terminating endpoints ...", "should
/// fail health check node port if there are only terminating endpoints"):
/// - a Service whose only endpoints are terminating (still serving) serves
///   from them, from a pod and from outside;
/// - internalTrafficPolicy Local: node1's local set has only a terminating
///   endpoint while the cluster-wide set has a ready one elsewhere: node1's
///   pod reaches the local terminating endpoint (the fallback is decided per
///   set);
/// - externalTrafficPolicy Local with only a terminating local endpoint: the
///   external client is served by it, but node1's health-check node port
///   answers 503 with localEndpoints 0 (terminating ones do not count), and
///   node2's, with a ready one, 200.
#[test]
fn e3_h1_terminating_endpoints_serve_when_none_is_ready_and_fail_the_health_check() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (gone_vip, itp_vip) = (Ipv4Addr::new(10, 96, 1, 130), Ipv4Addr::new(10, 96, 1, 131));
    let http = [ServicePort::tcp("http", 80, 8080)];
    let etp_http = [ServicePort::tcp("http", 80, 8080).node_port(30730)];
    let web1_terminating = || Endpoint::of(t.pod("web1")).terminating();
    t.start_agents(&manifest(&[
        service("going", gone_vip).ports(&http).into(),
        endpoint_slice("going", "going-1")
            .ports_of(&http)
            .endpoint(web1_terminating())
            .endpoint(Endpoint::of(t.pod("web2")).terminating())
            .into(),
        service("itp", itp_vip)
            .ports(&http)
            .internal_traffic_policy_local()
            .into(),
        endpoint_slice("itp", "itp-1")
            .ports_of(&http)
            .endpoint(web1_terminating())
            .endpoint(Endpoint::of(t.pod("web2")))
            .into(),
        service("etp", Ipv4Addr::new(10, 96, 1, 132))
            .service_type(ServiceType::LoadBalancer)
            .ports(&etp_http)
            .external_traffic_policy_local()
            .health_check_node_port(32730)
            .into(),
        endpoint_slice("etp", "etp-1")
            .ports_of(&etp_http)
            .endpoint(web1_terminating())
            .endpoint(Endpoint::of(t.pod("web2")))
            .into(),
    ]))
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(gone_vip, 80),
        &pods_at(&t, &["web1", "web2"], 8080),
    )
    .unwrap();
    let web1 = t.pod("web1").ip;
    let url = format!("http://{gone_vip}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let seen = backends_seen(&t, "client1", &url, 20, |_| {});
    assert_eq!(
        seen,
        set(&["web1", "web2"]),
        "E3: terminating endpoints serve"
    );

    let url = format!("http://{itp_vip}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let seen = backends_seen(&t, "client1", &url, 8, |_| {});
    assert_eq!(
        seen,
        set(&["web1"]),
        "E3: the local set falls back on its own"
    );

    let node1 = t.node("node1").address;
    t.wait_for_frontend(
        "node1",
        &Frontend::node_port(30730, "TCP"),
        "local set",
        |r| local_backends(r) == set(&[format!("{web1}:8080").as_str()]),
    )
    .unwrap();
    let url = format!("http://{node1}:30730/");
    t.request_eventually("ext", &url, WARMUP).unwrap();
    let seen = backends_seen(&t, "ext", &url, 5, |r| {
        assert_eq!(*r.client.ip(), EXTERNAL_IP, "{}", r.raw)
    });
    assert_eq!(
        seen,
        set(&["web1"]),
        "E3: terminating local endpoint serves"
    );

    for (node, status, count) in [("node1", "503", 0), ("node2", "200", 1)] {
        let addr = t.node(node).address;
        let deadline = Instant::now() + WARMUP;
        let out = loop {
            let out = t.exec(
                "ext",
                &[
                    "curl",
                    "-sS",
                    "-i",
                    "--max-time",
                    "3",
                    &format!("http://{addr}:32730/"),
                ],
                Duration::from_secs(10),
            );
            match out.map(|o| o.ok()) {
                Ok(Ok(text)) => break text,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                other => panic!("{node}: health-check node port: {other:?}"),
            }
        };
        let body: serde_json::Value = out
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or_default();
        assert!(
            out.lines().next().unwrap_or("").contains(status) && body["localEndpoints"] == count,
            "H1: {node} must answer {status} with localEndpoints {count}:\n{out}"
        );
    }
}

// ---------------------------------------------------------------- F4

/// F4 "NodePort everywhere": nodes with two uplinks each (eth0 on
/// 198.18.0.0/24, eth1 on 198.19.0.0/24; agents with `--uplink` twice) and
/// cni0. The NodePort answers
/// - from a pod: on all of this node's addresses and on the other node's
///   two uplink addresses;
/// - from the node itself: the same;
/// - from outside: on both uplinks of both nodes.
///
/// Then with `--nodeport-addresses 198.19.0.0/24` every path answers only
/// on the eth1 addresses; the other addresses refuse (nothing listens).
#[test]
fn f4_node_port_everywhere() {
    require_privileges!();
    let t = Topology::builder()
        .node("node1", &["client1", "web1"])
        .node("node2", &["web2"])
        .second_lan()
        .build()
        .expect("building the topology");
    install_probe(&t);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let http = [ServicePort::tcp("http", 80, 8080).node_port(30800)];
    let yaml = manifest(&[
        service("np", Ipv4Addr::new(10, 96, 1, 140))
            .service_type(ServiceType::NodePort)
            .ports(&http)
            .into(),
        slice_of(&t, "np", &http, &["web1", "web2"]),
    ]);
    start_agents_with(&t, &yaml, &["--uplink", "eth1"]);
    for node in ["node1", "node2"] {
        t.wait_for_backends(
            node,
            &Frontend::node_port(30800, "TCP"),
            &pods_at(&t, &["web1", "web2"], 8080),
        )
        .unwrap();
    }
    let (n1, n2) = (t.node("node1").clone(), t.node("node2").clone());
    let second = |n: &lb_tests::topology::Node| n.second_uplink.as_ref().unwrap().1;
    let (n1_eth1, n2_eth1) = (second(&n1), second(&n2));
    let h1 = host("node1");
    let answers = |who: &str, addr: Ipv4Addr| -> Result<(), String> {
        let url = format!("http://{addr}:30800/");
        t.request_eventually(who, &url, WARMUP)
            .map_err(|e| format!("{who} -> {url}: {e:#}"))?;
        for _ in 0..3 {
            let r = t
                .request(who, &url)
                .map_err(|e| format!("{who} -> {url}: {e:#}"))?;
            if r.backend != "web1" && r.backend != "web2" {
                return Err(format!("{who} -> {url}: {}", r.raw));
            }
        }
        Ok(())
    };
    let refuses = |who: &str, addr: Ipv4Addr| -> Result<(), String> {
        let p = probe(&t, who, sa(addr, 30800), "tcp", 2.0);
        if p.result == "ECONNREFUSED" {
            Ok(())
        } else {
            Err(format!(
                "{who} -> {addr}:30800 must refuse (not a NodePort address): {p:?}"
            ))
        }
    };

    let mut failures = Vec::new();
    for who in ["client1", h1.as_str()] {
        for addr in [n1.address, n1_eth1, n1.gateway, n2.address, n2_eth1] {
            failures.extend(answers(who, addr).err());
        }
    }
    for addr in [n1.address, n1_eth1, n2.address, n2_eth1] {
        failures.extend(answers("ext", addr).err());
    }
    assert!(
        failures.is_empty(),
        "F4: the NodePort must answer on every node address, from pods, nodes and outside:\n{}",
        failures.join("\n")
    );
    let r = curl_from(
        &t,
        "ext",
        Some(EXTERNAL_IP_2),
        None,
        &format!("http://{n1_eth1}:30800/"),
    )
    .unwrap();
    assert!(r.backend == "web1" || r.backend == "web2", "{}", r.raw);

    // Only the second lan's addresses are NodePort addresses now.
    restart_agents_with(
        &t,
        &["--uplink", "eth1", "--nodeport-addresses", "198.19.0.0/24"],
    );
    // The external client reaches the cni0 address through node1.
    t.add_route("ext", &format!("{}/32", n1.gateway), n1.address)
        .unwrap();
    let mut failures = Vec::new();
    for who in ["client1", h1.as_str(), "ext"] {
        for addr in [n1_eth1, n2_eth1] {
            failures.extend(answers(who, addr).err());
        }
        for addr in [n1.address, n1.gateway, n2.address] {
            failures.extend(refuses(who, addr).err());
        }
    }
    assert!(
        failures.is_empty(),
        "F4 with --nodeport-addresses 198.19.0.0/24:\n{}",
        failures.join("\n")
    );
}
