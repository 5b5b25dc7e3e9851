//! "Flows that never break", end to end: the datapath invariants C1-C5 of
//! SEMANTICS.md in the two-node netns topology (kubeadm-like nodes, one
//! `lb-agent` per node, real clients and servers). Test names start with
//! the contract id they prove; the BPF_PROG_TEST_RUN proofs of the same ids
//! are in `tests/datapath.rs`.
//!
//! Run serially: `cargo test -p lb-tests --test flows -- --test-threads=1`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lb_tests::objects::{endpoint_slice, manifest, service, Endpoint, ServicePort, ServiceType};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const WARMUP: Duration = Duration::from_secs(10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn two_nodes(node1_pods: &[&str], node2_pods: &[&str]) -> Topology {
    Topology::builder()
        .node("node1", node1_pods)
        .node("node2", node2_pods)
        .build()
        .expect("building the topology")
}

/// The value of counter `name` in `lbctl stats -o json` on `node`.
fn stat(t: &Topology, node: &str, name: &str) -> u64 {
    let s = t.lbctl_json(node, "stats").expect("lbctl stats");
    s[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {s}"))
}

// ---------------------------------------------------------------------------
// C5: other tc programs and filters on lb's interfaces keep running
// ---------------------------------------------------------------------------

/// A legacy tc filter as the CNI bandwidth plugin installs them (`u32`
/// match-all with a `mirred` action) on `dir` (`ingress` or `egress`) of
/// `dev` in `node`, mirroring every IPv4 packet to `to` (a veth whose peer
/// drops them). Its action counts what it sees.
fn add_counting_filter(t: &Topology, node: &str, dev: &str, dir: &str, to: &str) {
    t.sh(
        node,
        &format!(
            "tc qdisc show dev {dev} | grep -q clsact || tc qdisc add dev {dev} clsact; \
             tc filter add dev {dev} {dir} protocol ip prio 10 u32 match u32 0 0 \
             action mirred egress mirror dev {to}"
        ),
    )
    .unwrap();
}

/// Packets the counting filter on `dir` of `dev` has seen.
fn filter_packets(t: &Topology, node: &str, dev: &str, dir: &str) -> u64 {
    let out = t
        .sh(node, &format!("tc -s -j filter show dev {dev} {dir}"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["options"]["actions"].as_array())
        .flatten()
        .filter_map(|a| a["stats"]["packets"].as_u64())
        .sum()
}

/// C5: with lb attached (TCX), a legacy tc filter on the same pod
/// interface still sees every packet, on ingress and egress: service
/// traffic (after lb's DNAT, and the replies after its reverse NAT) and
/// traffic lb passes untouched. One filter is added before the agent
/// attaches its programs, the other after. (Under TCX the TCX programs run
/// before the legacy filters whatever the order of attachment; lb returning
/// TC_ACT_OK would end the chain there and the filters would see nothing.)
#[test]
fn c5_tc_filters_on_pod_interfaces_see_service_and_other_traffic() {
    require_privileges!();
    let t = two_nodes(&["client1", "client2", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (web1, web2) = (t.pod("web1").clone(), t.pod("web2").clone());
    let vip = Ipv4Addr::new(10, 96, 0, 60);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let m = manifest(&[
        service("web", vip).ports(&http).into(),
        endpoint_slice("web", "web-1")
            .ports_of(&http)
            .endpoints([Endpoint::of(&web1), Endpoint::of(&web2)])
            .into(),
    ]);
    t.sh(
        "node1",
        "ip link add cnt0 type veth peer name cnt1 && ip link set cnt0 up && ip link set cnt1 up",
    )
    .unwrap();
    // client1's filters before lb, client2's after.
    let c1 = t.pod("client1").host_iface.clone();
    let c2 = t.pod("client2").host_iface.clone();
    for dir in ["ingress", "egress"] {
        add_counting_filter(&t, "node1", &c1, dir, "cnt0");
    }
    t.start_agents(&m).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 80),
        &[sa(web1.ip, 8080), sa(web2.ip, 8080)],
    )
    .unwrap();
    for dir in ["ingress", "egress"] {
        add_counting_filter(&t, "node1", &c2, dir, "cnt0");
    }

    let url = format!("http://{vip}/");
    for (who, dev) in [("client1", &c1), ("client2", &c2)] {
        t.request_eventually(who, &url, WARMUP).unwrap();
        // Service traffic: requests DNAT'ed by lb on ingress, replies
        // reverse-NAT'ed on egress.
        let before = (
            filter_packets(&t, "node1", dev, "ingress"),
            filter_packets(&t, "node1", dev, "egress"),
        );
        let translated = stat(&t, "node1", "pass_translated");
        for _ in 0..5 {
            let r = t.request(who, &url).unwrap();
            assert_eq!(*r.client.ip(), t.pod(who).ip, "{}", r.raw);
        }
        assert!(stat(&t, "node1", "pass_translated") >= translated + 5 * 3);
        let after = (
            filter_packets(&t, "node1", dev, "ingress"),
            filter_packets(&t, "node1", dev, "egress"),
        );
        // A TCP request/response is at least SYN, ACK, request, ACK, FIN.
        assert!(
            after.0 >= before.0 + 5 * 5 && after.1 >= before.1 + 5 * 4,
            "{who}: the filters on {dev} missed service traffic: ingress {before:?} -> {after:?}"
        );
        // Traffic lb passes untouched: straight to a pod on the other node.
        let before = after;
        for _ in 0..5 {
            t.request(who, &format!("http://{}:8080/", web2.ip))
                .unwrap();
        }
        let after = (
            filter_packets(&t, "node1", dev, "ingress"),
            filter_packets(&t, "node1", dev, "egress"),
        );
        assert!(
            after.0 >= before.0 + 5 * 5 && after.1 >= before.1 + 5 * 4,
            "{who}: the filters on {dev} missed pod-to-pod traffic: {before:?} -> {after:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// C1: one flow, one lifetime
// ---------------------------------------------------------------------------

/// Writes `m` as the manifest and starts every node's agent with `args`.
fn start_agents_with(t: &Topology, m: &str, args: &[&str]) {
    t.write_manifests(m).unwrap();
    for n in ["node1", "node2"] {
        t.start_agent(n, args).unwrap();
    }
}

/// A UDP server that answers each datagram with a stream: `count` answers,
/// one every `interval` seconds, each `backend=NAME seq=N`.
const STREAM_SERVER_PY: &str = r#"
import socket, sys, threading, time
name, port, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
def stream(peer):
    for i in range(count):
        s.sendto(f"backend={name} seq={i}".encode(), peer)
        time.sleep(interval)
while True:
    data, peer = s.recvfrom(65535)
    threading.Thread(target=stream, args=(peer,), daemon=True).start()
"#;

/// Sends one datagram to `argv[1]:argv[2]`, then only listens for
/// `argv[3]` seconds; prints `from=IP:PORT <payload>` per answer.
const STREAM_CLIENT_PY: &str = r#"
import socket, sys, time
target = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"start", target)
deadline = time.time() + float(sys.argv[3])
while time.time() < deadline:
    s.settimeout(max(0.01, deadline - time.time()))
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        break
    print(f"from={peer[0]}:{peer[1]} {data.decode()}", flush=True)
"#;

/// C1: a UDP flow where the client sent one datagram and the backend keeps
/// sending. With 2 s UDP and UDP stream timeouts and the GC every second, the backend
/// streams for 7.5 s (more than 3x the timeout): every answer reaches the
/// client with the ClusterIP as source; the flow is never collected while
/// answers flow (they refresh both directions), and is after they stop.
#[test]
fn c1_udp_flow_kept_alive_by_replies_alone() {
    require_privileges!();
    let t = two_nodes(&["client1"], &["stream2"]);
    let dir = t.dir().to_path_buf();
    std::fs::write(dir.join("stream_server.py"), STREAM_SERVER_PY).unwrap();
    std::fs::write(dir.join("stream_client.py"), STREAM_CLIENT_PY).unwrap();
    let server = dir.join("stream_server.py").to_string_lossy().into_owned();
    let client = dir.join("stream_client.py").to_string_lossy().into_owned();
    t.spawn(
        "stream2",
        "stream-server",
        &["python3", &server, "stream2", "9999", "30", "0.25"],
    )
    .unwrap();
    let backend = t.pod("stream2").clone();
    let vip = Ipv4Addr::new(10, 96, 0, 70);
    let port = [ServicePort::udp("stream", 9999, 9999)];
    let m = manifest(&[
        service("stream", vip).ports(&port).into(),
        endpoint_slice("stream", "stream-1")
            .ports_of(&port)
            .endpoint(Endpoint::of(&backend))
            .into(),
    ]);
    start_agents_with(
        &t,
        &m,
        &[
            "--conntrack-udp-timeout",
            "2s",
            // The answers make the flow a UDP stream after 2 s (#9): its
            // lifetime is the stream one.
            "--conntrack-udp-timeout-stream",
            "2s",
            "--conntrack-gc-interval",
            "1s",
        ],
    );
    t.wait_for_backends("node1", &Frontend::udp(vip, 9999), &[sa(backend.ip, 9999)])
        .unwrap();
    // Let the programs attach to client1's interface.
    std::thread::sleep(Duration::from_secs(2));
    let out = t
        .exec(
            "client1",
            &["python3", &client, &vip.to_string(), "9999", "9"],
            Duration::from_secs(20),
        )
        .unwrap()
        .ok()
        .unwrap();
    let answers: Vec<&str> = out.lines().collect();
    let from_vip = format!("from={vip}:9999 ");
    assert!(
        answers.iter().all(|l| l.starts_with(&from_vip)),
        "C1: an answer left with the backend's address: {out}"
    );
    assert_eq!(
        answers.len(),
        30,
        "C1: the stream was cut (2 s UDP timeout, GC every 1 s): {out}"
    );
    // Once the stream stops, the idle flow is collected.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ct = t.lbctl_json("node1", "conntrack").unwrap();
        if ct.as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle flow was never collected: {ct}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// C1: an established TCP connection idle for longer than the transient
/// timeout (2 s here) but shorter than the established one survives the
/// GC (every second): the next line goes over the same flow to the same
/// backend.
#[test]
fn c1_idle_established_tcp_outlives_the_transient_timeout() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["tcp:9000"]).unwrap();
    t.spawn_backend("web2", &["tcp:9000"]).unwrap();
    let (web1, web2) = (t.pod("web1").clone(), t.pod("web2").clone());
    let vip = Ipv4Addr::new(10, 96, 0, 71);
    let port = [ServicePort::tcp("line", 9000, 9000)];
    let m = manifest(&[
        service("line", vip).ports(&port).into(),
        endpoint_slice("line", "line-1")
            .ports_of(&port)
            .endpoints([Endpoint::of(&web1), Endpoint::of(&web2)])
            .into(),
    ]);
    start_agents_with(
        &t,
        &m,
        &[
            "--conntrack-tcp-transient-timeout",
            "2s",
            "--conntrack-gc-interval",
            "1s",
        ],
    );
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(vip, 9000),
        &[sa(web1.ip, 9000), sa(web2.ip, 9000)],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut conn = t.connect("client1", sa(vip, 9000)).unwrap();
    let before = conn.send("before").unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let after = conn.send("after").unwrap();
    assert_eq!(
        (after.backend.as_str(), after.client),
        (before.backend.as_str(), before.client),
        "C1: the idle established connection was cut or moved"
    );
    assert_eq!(stat(&t, "node1", "conntrack_expired"), 0);
}

// ---------------------------------------------------------------------------
// C2: tuple clashes
// ---------------------------------------------------------------------------

/// One source port, three peers: TCP sockets bound to the same port
/// (SO_REUSEADDR) connected to each `host:port` given, and one UDP socket
/// on the same port sending to each. Every connection sends three lines in
/// turn and reads each answer; the UDP socket prints where every answer
/// came from. Prints `tcp I ANSWER` and `udp FROM ANSWER` lines, or fails.
const CLASH_CLIENT_PY: &str = r#"
import socket, sys
port = int(sys.argv[1])
peers = [(h, int(p)) for h, p in (a.split(":") for a in sys.argv[2:])]
conns = []
for peer in peers:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("0.0.0.0", port))
    s.connect(peer)
    conns.append((s, s.makefile("rw")))
for rnd in range(3):
    for i, (s, f) in enumerate(conns):
        f.write(f"round{rnd}-conn{i}\n")
        f.flush()
        line = f.readline().strip()
        if not line:
            sys.exit(f"connection {i} to {peers[i]} closed")
        print(f"tcp {i} {line}", flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
u.bind(("0.0.0.0", port))
u.settimeout(3)
for rnd in range(3):
    for i, peer in enumerate(peers):
        u.sendto(f"round{rnd}-peer{i}".encode(), peer)
        data, frm = u.recvfrom(4096)
        print(f"udp {frm[0]}:{frm[1]} {data.decode().strip()}", flush=True)
"#;

/// C2: a pod uses one source port towards two ClusterIPs of the same
/// backend and towards the backend's own address, over TCP and UDP. After
/// DNAT at the pod's interface the three TCP connections would be one
/// 4-tuple (and the replies of all three one REPLY key): lb remaps the
/// source port of the second and third (keeping the pod's address, as
/// netfilter does), and every connection keeps working, every UDP answer
/// comes from the address the datagram was sent to.
#[test]
fn c2_one_source_port_to_two_frontends_and_the_backend_itself() {
    require_privileges!();
    let t = two_nodes(&["client1"], &["web2"]);
    t.spawn_backend("web2", &["tcp:9000", "udp:9000"]).unwrap();
    let web2 = t.pod("web2").clone();
    let (vip_a, vip_b) = (Ipv4Addr::new(10, 96, 0, 80), Ipv4Addr::new(10, 96, 0, 81));
    let ports = [
        ServicePort::tcp("line", 80, 9000),
        ServicePort::udp("echo", 80, 9000),
    ];
    let m = manifest(&[
        service("svc-a", vip_a).ports(&ports).into(),
        endpoint_slice("svc-a", "svc-a-1")
            .ports_of(&ports)
            .endpoint(Endpoint::of(&web2))
            .into(),
        service("svc-b", vip_b).ports(&ports).into(),
        endpoint_slice("svc-b", "svc-b-1")
            .ports_of(&ports)
            .endpoint(Endpoint::of(&web2))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    for vip in [vip_a, vip_b] {
        t.wait_for_backends("node1", &Frontend::tcp(vip, 80), &[sa(web2.ip, 9000)])
            .unwrap();
        t.wait_for_backends("node1", &Frontend::udp(vip, 80), &[sa(web2.ip, 9000)])
            .unwrap();
    }
    // Let the programs attach to client1's interface.
    std::thread::sleep(Duration::from_secs(2));
    let script = t.dir().join("clash_client.py");
    std::fs::write(&script, CLASH_CLIENT_PY).unwrap();
    let peers = [
        format!("{vip_a}:80"),
        format!("{vip_b}:80"),
        format!("{}:9000", web2.ip),
    ];
    let script_s = script.to_string_lossy();
    let mut argv = vec!["python3", script_s.as_ref(), "45000"];
    argv.extend(peers.iter().map(String::as_str));
    let out = t
        .exec("client1", &argv, Duration::from_secs(30))
        .unwrap()
        .ok()
        .unwrap_or_else(|e| panic!("C2: a connection broke: {e:#}"));
    let client_ip = t.pod("client1").ip;
    let mut tcp_ports = [None; 3];
    let mut udp_from = Vec::new();
    for line in out.lines() {
        let mut w = line.splitn(3, ' ');
        let (kind, who, answer) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
        let r = lb_tests::topology::Reply::parse(answer).unwrap();
        assert_eq!(
            *r.client.ip(),
            client_ip,
            "the backend must see the pod: {line}"
        );
        match kind {
            "tcp" => {
                let i: usize = who.parse().unwrap();
                assert!(r.raw.contains(&format!("-conn{i}")), "{line}");
                // One flow per connection: the same client port each round.
                let p = tcp_ports[i].get_or_insert(r.client.port());
                assert_eq!(*p, r.client.port(), "{line}");
            }
            _ => udp_from.push((who.to_string(), r.raw.clone())),
        }
    }
    // The first connection keeps its port; the other two got other ones.
    let ports: Vec<u16> = tcp_ports.iter().map(|p| p.unwrap()).collect();
    assert_eq!(ports[0], 45000, "{out}");
    assert!(
        ports[1] != 45000 && ports[2] != 45000 && ports[1] != ports[2],
        "{out}"
    );
    assert_eq!(udp_from.len(), 9, "{out}");
    for (i, (from, raw)) in udp_from.iter().enumerate() {
        assert_eq!(
            from,
            &peers[i % 3],
            "C2: UDP answer from the wrong address: {raw}"
        );
        assert!(raw.contains(&format!("-peer{}", i % 3)), "{raw}");
    }
    assert!(stat(&t, "node1", "port_remapped") >= 4, "{out}");
}

// ---------------------------------------------------------------------------
// C3: path MTU discovery through Services
// ---------------------------------------------------------------------------

/// A TCP server counting what each connection uploads: reads to EOF, then
/// answers `backend=NAME proto=upload client=IP:PORT got=N` and closes.
const UPLOAD_SERVER_PY: &str = r#"
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(16)
print("ready", flush=True)
def serve(c, peer):
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        n += len(b)
    c.sendall(f"backend={name} proto=upload client={peer[0]}:{peer[1]} got={n}\n".encode())
    c.close()
while True:
    c, peer = srv.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

/// Uploads `argv[3]` bytes to `argv[1]:argv[2]` and prints the answer.
const UPLOAD_CLIENT_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(b"x" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
print(s.makefile().read().strip(), flush=True)
"#;

const UPLOAD: usize = 4 << 20;

/// Node1 (client1) and node2 (web2, counting uploads on 9100), a Service
/// with ClusterIP 10.96.0.90:80 and NodePort 30090 (externalTrafficPolicy
/// Cluster), the agents running. Returns the upload client script path.
fn upload_setup(t: &Topology) -> String {
    let dir = t.dir().to_path_buf();
    std::fs::write(dir.join("upload_server.py"), UPLOAD_SERVER_PY).unwrap();
    std::fs::write(dir.join("upload_client.py"), UPLOAD_CLIENT_PY).unwrap();
    let server = dir.join("upload_server.py").to_string_lossy().into_owned();
    t.spawn(
        "web2",
        "upload-server",
        &["python3", &server, "web2", "9100"],
    )
    .unwrap();
    let web2 = t.pod("web2").clone();
    let port = ServicePort::tcp("upload", 80, 9100).node_port(30090);
    let m = manifest(&[
        service("upload", Ipv4Addr::new(10, 96, 0, 90))
            .service_type(ServiceType::NodePort)
            .port(port.clone())
            .into(),
        endpoint_slice("upload", "upload-1")
            .ports_of(&[port])
            .endpoint(Endpoint::of(&web2))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(Ipv4Addr::new(10, 96, 0, 90), 80),
        &[sa(web2.ip, 9100)],
    )
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30090, "TCP"),
        &[sa(web2.ip, 9100)],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    dir.join("upload_client.py").to_string_lossy().into_owned()
}

/// Uploads UPLOAD bytes from `who` to `target`; the backend must get all.
fn upload(t: &Topology, who: &str, script: &str, target: SocketAddrV4) {
    let out = t
        .exec(
            who,
            &[
                "python3",
                script,
                &target.ip().to_string(),
                &target.port().to_string(),
                &UPLOAD.to_string(),
            ],
            Duration::from_secs(40),
        )
        .unwrap()
        .ok()
        .unwrap_or_else(|e| {
            panic!("C3: the upload from {who} to {target} did not complete: {e:#}")
        });
    let r = lb_tests::topology::Reply::parse(&out).unwrap();
    assert!(
        r.raw.ends_with(&format!("got={UPLOAD}")),
        "{who} -> {target}: {}",
        r.raw
    );
}

/// C3: a hop between the nodes has a smaller MTU (node2 forwards into its
/// pod network over a route locked to 1400 bytes; the endpoints themselves
/// have 1500 and agree on a 1460-byte MSS). Node2 answers the client's big
/// segments with ICMP fragmentation needed quoting the translated packet:
/// lb translates it back (at the pod client's interface for the ClusterIP;
/// at node1's uplink for the SNAT'ed NodePort flow, redirected to the
/// external client), path MTU discovery works, and 4 MB uploads complete
/// through both.
#[test]
fn c3_pmtu_discovery_through_a_cluster_ip_and_a_node_port() {
    require_privileges!();
    let t = two_nodes(&["client1"], &["web2"]);
    t.sh(
        "node2",
        "ip route replace 10.244.2.0/24 dev cni0 proto kernel scope link src 10.244.2.1 mtu lock 1400",
    )
    .unwrap();
    let script = upload_setup(&t);
    upload(&t, "client1", &script, sa(Ipv4Addr::new(10, 96, 0, 90), 80));
    upload(&t, "ext", &script, sa(t.node("node1").address, 30090));
    assert!(
        stat(&t, "node1", "icmp_error_translated") >= 2,
        "no ICMP error was translated: the path MTU was never exceeded?"
    );
}

/// C3: the smaller MTU is on node1's own route to node2's pods (1400,
/// locked). The ClusterIP flow is forwarded by node1's stack, which answers
/// with fragmentation needed about the translated packet (translated back
/// at the client's interface); the SNAT'ed NodePort flow is forwarded by lb
/// itself (`nat::route`), which answers the external client with
/// fragmentation needed and the route's MTU. Both uploads complete.
#[test]
fn c3_pmtu_discovery_when_lb_forwards_over_a_smaller_mtu() {
    require_privileges!();
    let t = two_nodes(&["client1"], &["web2"]);
    t.sh(
        "node1",
        "ip route replace 10.244.2.0/24 via 198.18.0.12 mtu lock 1400",
    )
    .unwrap();
    let script = upload_setup(&t);
    upload(&t, "client1", &script, sa(Ipv4Addr::new(10, 96, 0, 90), 80));
    upload(&t, "ext", &script, sa(t.node("node1").address, 30090));
    assert!(stat(&t, "node1", "icmp_frag_needed_sent") >= 1);
    assert!(stat(&t, "node1", "icmp_error_translated") >= 1);
}

// ---------------------------------------------------------------------------
// C4: fragments
// ---------------------------------------------------------------------------

/// A UDP server answering each datagram with one of the same size:
/// `backend=NAME client=IP:PORT len=N ` padded with `.`.
const BIG_UDP_SERVER_PY: &str = r#"
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    head = f"backend={name} proto=udp client={peer[0]}:{peer[1]} len={len(data)} ".encode()
    s.sendto(head + b"." * (len(data) - len(head)), peer)
"#;

/// Sends `argv[4]` datagrams of `argv[3]` bytes to `argv[1]:argv[2]`, one at
/// a time; prints `from=IP:PORT len=N <answer head>` per answer.
const BIG_UDP_CLIENT_PY: &str = r#"
import socket, sys
target, size, count = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
for i in range(count):
    s.sendto(b"q" * size, target)
    data, peer = s.recvfrom(65535)
    print(f"from={peer[0]}:{peer[1]} len={len(data)} {data[:100].decode()}", flush=True)
"#;

/// C4: 4000-byte UDP queries and answers (three IP fragments each way)
/// through a ClusterIP, to a backend on the other node and to one on the
/// same node, and through a NodePort from the external client (SNAT'ed,
/// forwarded by lb): every datagram arrives whole, from the address it was
/// sent to.
#[test]
fn c4_large_udp_datagrams_through_a_cluster_ip_and_a_node_port() {
    require_privileges!();
    let t = two_nodes(&["client1", "big1"], &["big2"]);
    let dir = t.dir().to_path_buf();
    std::fs::write(dir.join("big_server.py"), BIG_UDP_SERVER_PY).unwrap();
    std::fs::write(dir.join("big_client.py"), BIG_UDP_CLIENT_PY).unwrap();
    let server = dir.join("big_server.py").to_string_lossy().into_owned();
    let client = dir.join("big_client.py").to_string_lossy().into_owned();
    for pod in ["big1", "big2"] {
        t.spawn(
            pod,
            &format!("big-server-{pod}"),
            &["python3", &server, pod, "9200"],
        )
        .unwrap();
    }
    let (big1, big2) = (t.pod("big1").clone(), t.pod("big2").clone());
    let (remote_vip, local_vip) = (Ipv4Addr::new(10, 96, 0, 100), Ipv4Addr::new(10, 96, 0, 101));
    let remote_port = ServicePort::udp("big", 53, 9200).node_port(30053);
    let local_port = [ServicePort::udp("big", 53, 9200)];
    let m = manifest(&[
        service("big-remote", remote_vip)
            .service_type(ServiceType::NodePort)
            .port(remote_port.clone())
            .into(),
        endpoint_slice("big-remote", "big-remote-1")
            .ports_of(&[remote_port])
            .endpoint(Endpoint::of(&big2))
            .into(),
        service("big-local", local_vip).ports(&local_port).into(),
        endpoint_slice("big-local", "big-local-1")
            .ports_of(&local_port)
            .endpoint(Endpoint::of(&big1))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::udp(remote_vip, 53),
        &[sa(big2.ip, 9200)],
    )
    .unwrap();
    t.wait_for_backends("node1", &Frontend::udp(local_vip, 53), &[sa(big1.ip, 9200)])
        .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30053, "UDP"),
        &[sa(big2.ip, 9200)],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let node1 = t.node("node1").address;
    for (who, target, backend, sees) in [
        ("client1", sa(remote_vip, 53), "big2", t.pod("client1").ip),
        ("client1", sa(local_vip, 53), "big1", t.pod("client1").ip),
        ("ext", sa(node1, 30053), "big2", node1),
    ] {
        let out = t
            .exec(
                who,
                &[
                    "python3",
                    &client,
                    &target.ip().to_string(),
                    &target.port().to_string(),
                    "4000",
                    "5",
                ],
                Duration::from_secs(30),
            )
            .unwrap()
            .ok()
            .unwrap_or_else(|e| panic!("C4: {who} -> {target}: a datagram was lost: {e:#}"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{who} -> {target}: {out}");
        for l in lines {
            assert!(
                l.starts_with(&format!("from={target} len=4000 ")),
                "C4: {who} -> {target}: {l}"
            );
            let r = lb_tests::topology::Reply::parse(l).unwrap();
            assert_eq!(r.backend, backend, "{l}");
            assert_eq!(*r.client.ip(), sees, "{l}");
            assert!(
                r.raw.contains("len=4000"),
                "the backend got a partial datagram: {l}"
            );
        }
    }
    assert!(stat(&t, "node1", "fragment_translated") >= 3 * 5 * 2 * 2);
    assert_eq!(stat(&t, "node1", "drop_fragment_no_first"), 0);
}
