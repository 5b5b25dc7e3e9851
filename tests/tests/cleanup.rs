//! `lb-agent --cleanup` leaves the node exactly as it was before the first
//! agent: a snapshot of the emulated node taken before the agent starts is
//! equal to one taken after the agent ran with traffic (ClusterIP from a
//! pod, NodePort from outside, a ClusterIP from a host process through
//! socket LB), stopped, and `--cleanup` ran. Both ways of attaching TC
//! programs: TCX (stopped with SIGTERM) and netlink clsact filters (killed
//! with SIGKILL, on a node where something else already had a clsact qdisc
//! and a filter, which must survive).
//!
//! The snapshot, in the node's network namespace: `ip -d link` (XDP shows
//! there), `tc qdisc show`, `tc filter show` of both hooks of every
//! interface, `bpftool net show` (clsact and XDP programs of this
//! namespace), the TCX programs of every interface (BPF_PROG_QUERY from
//! inside the namespace: Debian's bpftool 7.1 predates TCX and does not
//! list them), `bpftool cgroup tree` of the node's cgroup (socket LB), the
//! pin directory's tree, every `net.*` sysctl of the namespace and the
//! kernel's BPF sysctls, and `iptables-save` (rules only). `bpftool link
//! show` is not in it: it lists the links of the whole machine and names
//! interfaces by index only, so other namespaces' links cannot be told
//! apart; `bpftool net` and `bpftool cgroup` show this node's links.
//!
//! The agent sets no sysctl (a grep of lb-userspace finds no /proc/sys
//! write); the snapshot proves it stays that way.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use lb_tests::artifacts;
use lb_tests::load::{echo_objects, echo_topology};
use lb_tests::netns::in_named_netns;
use lb_tests::objects::{manifest, Object};
use lb_tests::require_privileges;
use lb_tests::topology::{run, Frontend, Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 10, 10);
const NODE_PORT: u16 = 30910;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// node1 (the one snapshotted): client1, web1; node2: web2.
fn topology() -> Topology {
    echo_topology()
}

fn objects(t: &Topology) -> Vec<Object> {
    echo_objects(t, VIP, NODE_PORT)
}

/// Removes what changes on its own (bridge timers, rule counters, the
/// iptables-save banner) from a section.
fn normalize(section: &str, text: &str) -> String {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        match section {
            // `hello_timer 0.00`, `gc_timer 287.51`, ...
            s if s.starts_with("ip -d link") => {
                let mut i = 0;
                while i < words.len() {
                    if words[i].ends_with("_timer") {
                        words.drain(i..(i + 2).min(words.len()));
                    } else {
                        i += 1;
                    }
                }
            }
            "iptables-save" => {
                if words[0].starts_with('#') {
                    continue;
                }
                // `:FORWARD ACCEPT [12:3456]`
                words.retain(|w| !(w.starts_with('[') && w.ends_with(']')));
            }
            _ => {}
        }
        out.push(words.join(" "));
    }
    out.join("\n")
}

/// `DEV tcx/HOOK PROGRAM` for every TCX program on the interfaces `devs`
/// of namespace `netns`, asked from inside it.
fn tcx_programs(netns: &str, devs: Vec<String>) -> String {
    in_named_netns(netns, move || {
        let mut lines = Vec::new();
        for dev in &devs {
            for (hook, at) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                match SchedClassifier::query_tcx(dev, at) {
                    Ok((_, progs)) => {
                        lines.extend(progs.iter().map(|p| {
                            format!("{dev} tcx/{hook} {}", p.name_as_str().unwrap_or("?"))
                        }))
                    }
                    Err(e) => lines.push(format!("{dev} tcx/{hook}: {e}")),
                }
            }
        }
        lines.join("\n")
    })
}

/// Section name -> normalized output, for `node` of `t`.
fn snapshot(t: &Topology, node: &str) -> BTreeMap<String, String> {
    let n = t.node(node).clone();
    let mut s = BTreeMap::new();
    let mut section = |name: String, script: &str| {
        let out = t
            .sh(node, script)
            .unwrap_or_else(|e| panic!("snapshot {name}: {e:#}"));
        let text = normalize(&name, &out);
        s.insert(name, text);
    };
    section("ip -d link".into(), "ip -d link show");
    section("tc qdisc".into(), "tc qdisc show");
    let devs = t
        .sh(
            node,
            "ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1",
        )
        .unwrap();
    for dev in devs.lines().map(str::trim).filter(|d| !d.is_empty()) {
        for hook in ["ingress", "egress"] {
            section(
                format!("tc filter {dev} {hook}"),
                &format!("tc filter show dev {dev} {hook}"),
            );
        }
    }
    section("bpftool net".into(), "bpftool net show");
    let dev_names: Vec<String> = devs
        .lines()
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    section(
        "sysctl".into(),
        "sysctl -a 2>/dev/null | grep -E '^(net\\.|kernel\\.[a-z_]*bpf)' \
         | grep -v '^net.netfilter.nf_conntrack_count'",
    );
    section("iptables-save".into(), "iptables-save");
    s.insert("tcx".into(), tcx_programs(&n.netns, dev_names));
    if let Some(cg) = &n.cgroup {
        let out = run(
            &["bpftool", "cgroup", "tree", &cg.to_string_lossy()],
            Duration::from_secs(10),
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("bpftool cgroup tree: {e:#}"));
        s.insert(
            "bpftool cgroup tree".into(),
            normalize("bpftool cgroup tree", &out),
        );
    }
    let pins = run(
        &[
            "sh",
            "-c",
            &format!("find {} 2>/dev/null | sort", n.bpffs.display()),
        ],
        Duration::from_secs(10),
    )
    .map(|o| o.stdout)
    .unwrap_or_default();
    s.insert("pin directory".into(), pins.trim().to_string());
    s
}

/// A snapshot once the node has settled (a new bridge goes from state
/// UNKNOWN to UP when linkwatch gets to it, which the kernel may put off
/// for up to a second): two in a row, 1.5 s apart, are equal.
fn settled_snapshot(t: &Topology, node: &str) -> BTreeMap<String, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = snapshot(t, node);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = snapshot(t, node);
        if now == last {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{node} does not settle:\n{}",
            diff(&last, &now)
        );
        last = now;
    }
}

/// The sections that differ, with the lines only before (-) and only after
/// (+); empty when the snapshots are equal.
fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for k in keys {
        let (b, a) = (
            before.get(k).map(String::as_str),
            after.get(k).map(String::as_str),
        );
        if b == a {
            continue;
        }
        out.push_str(&format!("== {k}\n"));
        let bl: Vec<&str> = b.map(|s| s.lines().collect()).unwrap_or_default();
        let al: Vec<&str> = a.map(|s| s.lines().collect()).unwrap_or_default();
        for l in &bl {
            if !al.contains(l) {
                out.push_str(&format!("- {l}\n"));
            }
        }
        for l in &al {
            if !bl.contains(l) {
                out.push_str(&format!("+ {l}\n"));
            }
        }
        if bl.iter().all(|l| al.contains(l)) && al.iter().all(|l| bl.contains(l)) {
            out.push_str("  (same lines, another order or count)\n");
        }
    }
    out
}

/// `lb-agent --cleanup --bpffs DIR` in the node's namespace, as the
/// chart's cleanup DaemonSet runs it (hostNetwork: the node's namespace).
fn run_cleanup(t: &Topology, node: &str) -> String {
    let n = t.node(node);
    let net = format!("--net=/run/netns/{}", n.netns);
    let agent = artifacts::lb_agent_bin();
    let out = run(
        &[
            "nsenter",
            &net,
            "--",
            &agent.to_string_lossy(),
            "--cleanup",
            "--bpffs",
            &n.bpffs.to_string_lossy(),
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.success(), "lb-agent --cleanup failed: {out:?}");
    out.stderr
}

/// Starts node1's agent with `args`, sends traffic on every path lb
/// translates, and checks that lb really changed the node meanwhile.
fn run_agent_with_traffic(t: &Topology, before: &BTreeMap<String, String>, args: &[&str]) {
    t.write_manifests(&manifest(&objects(t))).unwrap();
    t.start_agent("node1", args).unwrap();
    let all = [sa(t.pod("web1").ip, 9000), sa(t.pod("web2").ip, 9000)];
    t.wait_for_backends("node1", &Frontend::tcp(VIP, 9000), &all)
        .unwrap();
    t.wait_for_backends("node1", &Frontend::node_port(NODE_PORT, "TCP"), &all)
        .unwrap();
    let node1 = t.node("node1").address;
    for i in 0..6 {
        t.socat_line("client1", "tcp", sa(VIP, 9000), &format!("pod{i}"))
            .unwrap();
        t.socat_line("ext", "tcp", sa(node1, NODE_PORT), &format!("ext{i}"))
            .unwrap();
    }
    if t.node("node1").cgroup.is_some() {
        t.socat_line(
            &lb_tests::topology::host("node1"),
            "tcp",
            sa(VIP, 9000),
            "host",
        )
        .unwrap();
    }
    let during = snapshot(t, "node1");
    let changed = diff(before, &during);
    let attached = if args.contains(&"netlink") {
        "bpftool net"
    } else {
        "tcx"
    };
    for section in [attached, "pin directory", "bpftool cgroup tree"] {
        assert!(
            changed.contains(&format!("== {section}\n")),
            "the agent left no trace in {section}: the test would prove nothing\n{changed}"
        );
    }
}

#[test]
fn cleanup_after_tcx_leaves_the_node_as_before() {
    require_privileges!();
    let t = topology();
    let before = settled_snapshot(&t, "node1");
    run_agent_with_traffic(&t, &before, &["--tc-attach", "tcx"]);
    t.stop_agent("node1").unwrap();
    let log = run_cleanup(&t, "node1");
    let after = snapshot(&t, "node1");
    let d = diff(&before, &after);
    assert!(
        d.is_empty(),
        "the node differs after --cleanup:\n{d}\ncleanup log:\n{log}"
    );
    assert!(!t.node("node1").bpffs.exists());
}

/// The netlink path, on a node where eth0 already had a clsact qdisc with
/// someone else's filter: lb's filters go, the qdiscs lb added go, that
/// qdisc and its filter stay.
#[test]
fn cleanup_after_netlink_leaves_the_node_as_before_and_others_filters_alone() {
    require_privileges!();
    let t = topology();
    t.sh(
        "node1",
        "tc qdisc add dev eth0 clsact && \
         tc filter add dev eth0 egress pref 100 protocol all u32 match u32 0 0 classid 1:1",
    )
    .unwrap();
    let before = settled_snapshot(&t, "node1");
    run_agent_with_traffic(&t, &before, &["--tc-attach", "netlink"]);
    t.kill_agent("node1").unwrap();
    let log = run_cleanup(&t, "node1");
    let after = snapshot(&t, "node1");
    let d = diff(&before, &after);
    assert!(
        d.is_empty(),
        "the node differs after --cleanup:\n{d}\ncleanup log:\n{log}"
    );
    assert!(!t.node("node1").bpffs.exists());
    let kept = t.sh("node1", "tc filter show dev eth0 egress").unwrap();
    assert!(kept.contains("pref 100 u32"), "{kept}");
}

/// A second `--cleanup`, or one on a node lb never ran on, changes nothing
/// and succeeds (the cleanup DaemonSet may run twice).
#[test]
fn cleanup_is_idempotent_and_harmless_on_a_clean_node() {
    require_privileges!();
    let t = Topology::builder()
        .node("node1", &["client1"])
        .without_external_client()
        .build()
        .expect("building the topology");
    let before = settled_snapshot(&t, "node1");
    run_cleanup(&t, "node1");
    run_cleanup(&t, "node1");
    let d = diff(&before, &snapshot(&t, "node1"));
    assert!(d.is_empty(), "{d}");
}
