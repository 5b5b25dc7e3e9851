//! The TC programs as legacy clsact filters (`--tc-attach netlink`, what
//! kernels without TCX get): they translate end to end; they stay attached
//! when the agent is killed or stopped, and established connections keep
//! flowing with no agent; the next agent replaces their programs in place
//! (same priority and handle, new program, one lb filter per hook); a
//! restart under load breaks nothing; switching between TCX and netlink
//! leaves one attachment per hook.
//!
//! Filters are read the way an operator reads them: `tc filter show dev X
//! ingress|egress` in the node's namespace.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lb_tests::load::{echo_objects, echo_topology, wait_for_log, Load};
use lb_tests::objects::{manifest, Object};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 10);
const NODE_PORT: u16 = 30909;
/// lb's place on every clsact hook (`clsact::PRIORITY`, `clsact::HANDLE`).
const PREF: u32 = 1;
const HANDLE: &str = "0x4c42";
const NETLINK: &[&str] = &["--tc-attach", "netlink"];

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// node1: client1, web1; node2: web2 (`load::echo_topology`).
fn topology() -> Topology {
    echo_topology()
}

fn objects(t: &Topology) -> Vec<Object> {
    echo_objects(t, VIP, NODE_PORT)
}

fn backends(t: &Topology) -> [SocketAddrV4; 2] {
    [sa(t.pod("web1").ip, 9000), sa(t.pod("web2").ip, 9000)]
}

/// Starts every node's agent with `args`, waits until both frontends are
/// programmed everywhere.
fn start_agents(t: &Topology, args: &[&str]) {
    t.write_manifests(&manifest(&objects(t))).unwrap();
    for n in ["node1", "node2"] {
        t.start_agent(n, args).unwrap();
    }
    let all = backends(t);
    t.wait_for_backends_everywhere(&Frontend::tcp(VIP, 9000), &all)
        .unwrap();
    t.wait_for_backends_everywhere(&Frontend::node_port(NODE_PORT, "TCP"), &all)
        .unwrap();
}

/// A bpf filter as `tc filter show` prints it:
/// `filter protocol all pref 1 bpf chain 0 handle 0x4c42 lb_pod_ingress
/// direct-action not_in_hw id 1234 name lb_pod_ingress tag ... jited`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TcFilter {
    pref: u32,
    handle: String,
    /// The filter's name (TCA_BPF_NAME).
    name: String,
    direct_action: bool,
    /// The program's id.
    id: u32,
}

fn parse_tc_filters(text: &str) -> Vec<TcFilter> {
    let mut out = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1));
        if !w.contains(&"bpf") {
            continue;
        }
        let (Some(pref), Some(handle)) = (after("pref"), after("handle")) else {
            continue; // the per-priority header line
        };
        out.push(TcFilter {
            pref: pref.parse().unwrap_or(0),
            handle: handle.to_string(),
            name: after(handle).map(|s| s.to_string()).unwrap_or_default(),
            direct_action: w.contains(&"direct-action"),
            id: after("id").and_then(|s| s.parse().ok()).unwrap_or(0),
        });
    }
    out
}

/// The bpf filters on `dev`'s `hook` in `node`'s namespace.
fn tc_filters(t: &Topology, node: &str, dev: &str, hook: &str) -> Vec<TcFilter> {
    let out = t
        .sh(node, &format!("tc filter show dev {dev} {hook}"))
        .unwrap();
    parse_tc_filters(&out)
}

/// The interfaces node1's agent attaches to, with the program of each hook.
fn node1_hooks(t: &Topology) -> Vec<(String, &'static str, &'static str)> {
    let mut v = vec![
        ("eth0".to_string(), "ingress", "lb_uplink_ingress"),
        ("eth0".to_string(), "egress", "lb_uplink_egress"),
    ];
    for p in t.pods().iter().filter(|p| p.node == "node1") {
        v.push((p.host_iface.clone(), "ingress", "lb_pod_ingress"));
        v.push((p.host_iface.clone(), "egress", "lb_pod_egress"));
    }
    v
}

/// Exactly one lb filter on every hook of node1, at lb's place, running
/// the hook's program direct-action; their program ids, hook by hook.
fn one_lb_filter_per_hook(t: &Topology) -> Vec<u32> {
    let mut ids = Vec::new();
    for (dev, hook, program) in node1_hooks(t) {
        let all = tc_filters(t, "node1", &dev, hook);
        let lb: Vec<&TcFilter> = all.iter().filter(|f| f.name.starts_with("lb_")).collect();
        assert_eq!(lb.len(), 1, "{dev} {hook}: one lb filter: {all:?}");
        let f = lb[0];
        assert_eq!(
            (f.pref, f.handle.as_str(), f.name.as_str(), f.direct_action),
            (PREF, HANDLE, program, true),
            "{dev} {hook}: {f:?}"
        );
        ids.push(f.id);
    }
    ids
}

/// No lb filter on any hook of node1.
fn no_lb_filter(t: &Topology) {
    for (dev, hook, _) in node1_hooks(t) {
        let all = tc_filters(t, "node1", &dev, hook);
        assert!(
            all.iter().all(|f| !f.name.starts_with("lb_")),
            "{dev} {hook}: {all:?}"
        );
    }
}

/// The TC link pins of node1 (TCX links; the cgroup ones aside).
fn tcx_pins(t: &Topology) -> Vec<String> {
    let dir = t.node("node1").bpffs.join("links");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("cgroup-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `bpftool net show` of node1's namespace names TCX attachments `tcx/...`.
fn bpftool_net(t: &Topology) -> String {
    t.sh("node1", "bpftool net show").unwrap()
}

#[test]
fn parses_tc_filter_show() {
    let text = "filter protocol all pref 1 bpf chain 0 \n\
                filter protocol all pref 1 bpf chain 0 handle 0x4c42 lb_pod_ingress direct-action not_in_hw id 77 name lb_pod_ingress tag 0123456789abcdef jited \n\
                filter protocol all pref 49152 u32 chain 0 fh 800::800 order 2048 key ht 800 bkt 0 *flowid 1:1 not_in_hw\n";
    assert_eq!(
        parse_tc_filters(text),
        vec![TcFilter {
            pref: 1,
            handle: "0x4c42".into(),
            name: "lb_pod_ingress".into(),
            direct_action: true,
            id: 77,
        }]
    );
}

/// The netlink path end to end: a ClusterIP from a pod (local and remote
/// backend) and a NodePort from outside, through clsact filters only (no
/// TCX link). Then the agent is killed (SIGKILL), started, stopped
/// (SIGTERM), started: while it is down the filters stay, with the same
/// programs, and an established connection and new connections keep
/// working; each new agent swaps its programs into the same filters.
#[test]
fn netlink_filters_translate_outlive_the_agent_and_are_replaced_in_place() {
    require_privileges!();
    let t = topology();
    start_agents(&t, NETLINK);
    let node1 = t.node("node1").address;

    // Translated, both backends, both paths.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        let r = t
            .socat_line("client1", "tcp", sa(VIP, 9000), &format!("hi{i}"))
            .unwrap();
        assert_eq!(r.client.ip(), &t.pod("client1").ip, "F1: {r:?}");
        seen.insert(r.backend);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both backends answer: {seen:?}");
    t.socat_line("ext", "tcp", sa(node1, NODE_PORT), "hello")
        .unwrap();

    // What is attached: one clsact filter per hook, no TCX anywhere.
    let ids = one_lb_filter_per_hook(&t);
    assert_eq!(tcx_pins(&t), Vec::<String>::new());
    let net = bpftool_net(&t);
    assert!(!net.contains("tcx/"), "no TCX attachment:\n{net}");
    let markers = t.node("node1").bpffs.join("qdiscs");
    let marked = std::fs::read_dir(&markers).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        marked,
        1 + t.pods().iter().filter(|p| p.node == "node1").count(),
        "lb added (and recorded) the clsact qdisc of eth0 and of every pod veth"
    );

    let mut conn = t.connect("client1", sa(VIP, 9000)).unwrap();
    let first = conn.send("established").unwrap();

    let mut last_ids = ids;
    for (how, step) in [("SIGKILL", 0), ("SIGTERM", 1)] {
        match step {
            0 => t.kill_agent("node1").unwrap(),
            _ => t.stop_agent("node1").unwrap(),
        }
        // No agent: the filters are still there, running the same programs.
        assert_eq!(
            one_lb_filter_per_hook(&t),
            last_ids,
            "after {how}, the filters and their programs stay"
        );
        let r = conn.send(&format!("after {how}")).unwrap();
        assert_eq!(
            r.backend, first.backend,
            "after {how}: same flow, same backend"
        );
        t.socat_line("client1", "tcp", sa(VIP, 9000), "new-without-agent")
            .unwrap_or_else(|e| panic!("a new connection with no agent after {how}: {e:#}"));
        t.socat_line("ext", "tcp", sa(node1, NODE_PORT), "np-without-agent")
            .unwrap_or_else(|e| {
                panic!("a new NodePort connection with no agent after {how}: {e:#}")
            });

        // The next agent replaces the programs in place.
        t.start_agent("node1", NETLINK).unwrap();
        let log = wait_for_log(
            &t,
            "agent-node1",
            "lb-agent ready",
            0,
            Duration::from_secs(20),
        );
        let ids = one_lb_filter_per_hook(&t);
        for (old, new) in last_ids.iter().zip(&ids) {
            assert_ne!(old, new, "after {how}: a new program in the same filter");
        }
        assert!(
            log.contains("replaced the programs of lb's clsact filters in place"),
            "{log}"
        );
        assert!(!log.contains("added a clsact qdisc"), "{log}");
        last_ids = ids;
        let r = conn
            .send(&format!("after the restart that followed {how}"))
            .unwrap();
        assert_eq!(r.backend, first.backend);
    }
    assert_eq!(tcx_pins(&t), Vec::<String>::new());
}

/// restart.rs's proof, on the netlink path: 200 long-lived connections
/// through the ClusterIP and 50 through the NodePort, and 10 new
/// connections a second to each, while the agent is killed, started,
/// stopped and started again: nothing breaks, nothing fails.
#[test]
fn netlink_restart_under_load_breaks_nothing() {
    require_privileges!();
    let t = topology();
    start_agents(&t, NETLINK);
    let node1 = t.node("node1").address;
    t.socat_line("client1", "tcp", sa(VIP, 9000), "warm")
        .unwrap();
    t.socat_line("ext", "tcp", sa(node1, NODE_PORT), "warm")
        .unwrap();
    let ids = one_lb_filter_per_hook(&t);

    let long_vip = format!("long:{VIP}:9000:200");
    let new_vip = format!("new:{VIP}:9000:10");
    let long_np = format!("long:{node1}:{NODE_PORT}:50");
    let new_np = format!("new:{node1}:{NODE_PORT}:10");
    let load = Load::start(
        &t,
        30,
        &[
            ("client1", "load-pods", &[&long_vip, &new_vip]),
            ("ext", "load-ext", &[&long_np, &new_np]),
        ],
    );
    std::thread::sleep(Duration::from_secs(3));

    t.kill_agent("node1").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    t.start_agent("node1", NETLINK).unwrap();
    wait_for_log(
        &t,
        "agent-node1",
        "lb-agent ready",
        0,
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(3));

    t.stop_agent("node1").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    t.start_agent("node1", NETLINK).unwrap();
    wait_for_log(
        &t,
        "agent-node1",
        "lb-agent ready",
        0,
        Duration::from_secs(20),
    );

    let summary = load.finish(&t);
    println!("{}", summary.report());
    summary.assert_nothing_broke();
    let after = one_lb_filter_per_hook(&t);
    assert!(
        ids.iter().zip(&after).all(|(a, b)| a != b),
        "{ids:?} {after:?}"
    );
}

/// An agent with TCX, then one with `--tc-attach netlink`, then TCX again:
/// each mode switch installs the new attachment before it removes the old
/// one, leaves exactly one (TCX links, or clsact filters), and an
/// established connection never notices. The clsact qdiscs lb added go
/// with the last filters.
#[test]
fn switching_between_tcx_and_netlink_keeps_one_attachment_and_the_connection() {
    require_privileges!();
    let t = topology();
    start_agents(&t, &["--tc-attach", "tcx"]);
    let pins = tcx_pins(&t);
    assert_eq!(pins.len(), node1_hooks(&t).len(), "{pins:?}");
    no_lb_filter(&t);
    let mut conn = t.connect("client1", sa(VIP, 9000)).unwrap();
    let first = conn.send("on tcx").unwrap();

    t.stop_agent("node1").unwrap();
    t.start_agent("node1", NETLINK).unwrap();
    let log = wait_for_log(
        &t,
        "agent-node1",
        "lb-agent ready",
        0,
        Duration::from_secs(20),
    );
    assert!(
        log.contains("replacing a pinned TCX link by lb's clsact filter"),
        "{log}"
    );
    one_lb_filter_per_hook(&t);
    assert_eq!(tcx_pins(&t), Vec::<String>::new());
    assert!(!bpftool_net(&t).contains("tcx/"));
    assert_eq!(conn.send("on netlink").unwrap().backend, first.backend);

    t.stop_agent("node1").unwrap();
    t.start_agent("node1", &["--tc-attach", "tcx"]).unwrap();
    wait_for_log(
        &t,
        "agent-node1",
        "lb-agent ready",
        0,
        Duration::from_secs(20),
    );
    assert_eq!(tcx_pins(&t), pins);
    no_lb_filter(&t);
    let qdiscs = t.sh("node1", "tc qdisc show").unwrap();
    assert!(
        !qdiscs.contains("clsact"),
        "lb's qdiscs went with its filters:\n{qdiscs}"
    );
    assert_eq!(conn.send("on tcx again").unwrap().backend, first.backend);
    t.socat_line("client1", "tcp", sa(VIP, 9000), "new")
        .unwrap();
}

/// Polls `cond` for up to 20 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod that appears while the agent runs gets lb's filters (and a
/// clsact qdisc, recorded as lb's) and reaches the ClusterIP; when it goes,
/// the agent forgets its qdisc record.
#[test]
fn netlink_pods_that_come_and_go_get_and_lose_their_filters() {
    require_privileges!();
    let mut t = topology();
    start_agents(&t, NETLINK);
    let late = t.add_pod("node1", "late").unwrap();
    let ifindex = t
        .sh(
            "node1",
            &format!("ip -o link show dev {} | cut -d: -f1", late.host_iface),
        )
        .unwrap();
    let marker = t.node("node1").bpffs.join("qdiscs").join(format!(
        "{}-{}",
        ifindex.trim(),
        late.host_iface
    ));
    eventually("lb's filters on the new pod's veth", || {
        ["ingress", "egress"].iter().all(|hook| {
            tc_filters(&t, "node1", &late.host_iface, hook)
                .iter()
                .any(|f| f.pref == PREF && f.handle == HANDLE && f.name.starts_with("lb_pod_"))
        })
    });
    assert!(
        std::fs::symlink_metadata(&marker).is_ok(),
        "{}",
        marker.display()
    );
    let r = t.socat_line("late", "tcp", sa(VIP, 9000), "late").unwrap();
    assert_eq!(r.client.ip(), &late.ip);
    t.remove_pod("late").unwrap();
    eventually("the qdisc record of the removed pod goes", || {
        std::fs::symlink_metadata(&marker).is_err()
    });
    one_lb_filter_per_hook(&t);
}
