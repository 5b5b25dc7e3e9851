//! The agent's life cycle on one emulated node: restart without dropping
//! flows, bad manifests, cleanup, and what an operator inspects (lbctl in
//! both formats, bpftool with field names).
//!
//! Every test builds its own topology; dropping it removes everything, also
//! when the test fails.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lb_tests::objects::{endpoint_slice, manifest, service, Endpoint, Object, ServicePort};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const WARMUP: Duration = Duration::from_secs(10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// One node with a client pod and two backend pods (http:8080, TCP and UDP
/// line echo on 9000).
fn one_node() -> Topology {
    let t = Topology::builder()
        .node("node1", &["client1", "web1", "web2"])
        .without_external_client()
        .build()
        .expect("building the topology");
    for w in ["web1", "web2"] {
        t.spawn_backend(w, &["http:8080", "tcp:9000", "udp:9000"])
            .unwrap();
    }
    t
}

/// Service `web` (HTTP, TCP and UDP echo) and its EndpointSlice with `pods`.
fn web_objects(t: &Topology, pods: &[&str]) -> [Object; 2] {
    let ports = [
        ServicePort::tcp("http", 80, 8080),
        ServicePort::tcp("line", 9000, 9000),
        ServicePort::udp("echo", 9000, 9000),
    ];
    [
        service("web", VIP).ports(&ports).into(),
        endpoint_slice("web", "web-1")
            .ports_of(&ports)
            .endpoints(pods.iter().map(|p| Endpoint::of(t.pod(p))))
            .into(),
    ]
}

fn web_manifest(t: &Topology, pods: &[&str]) -> String {
    manifest(&web_objects(t, pods))
}

fn wait_for_log(t: &Topology, proc_name: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = t.log(proc_name);
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{proc_name} never logged {needle:?}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM leaves programs attached and maps pinned: an open connection keeps
/// working while no agent runs, and a new agent adopts the pinned links and
/// conntrack without a gap and without rewriting the maps.
#[test]
fn restart_keeps_open_connections_and_adopts_pinned_state() {
    require_privileges!();
    let t = one_node();
    t.start_agents(&web_manifest(&t, &["web1", "web2"]))
        .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(VIP, 9000),
        &[sa(t.pod("web1").ip, 9000), sa(t.pod("web2").ip, 9000)],
    )
    .unwrap();
    t.request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();

    let mut conn = t.connect("client1", sa(VIP, 9000)).unwrap();
    let before = conn.send("before").unwrap();
    let links_before = t.sh("node1", "bpftool link show").unwrap();

    t.stop_agent("node1").unwrap();
    // No agent: the datapath still translates, old flows and new ones.
    let during = conn.send("during").unwrap();
    assert_eq!(
        (&during.backend, during.client),
        (&before.backend, before.client)
    );
    let r = t.request("client1", &format!("http://{VIP}/")).unwrap();
    assert!(r.backend == "web1" || r.backend == "web2", "{}", r.raw);

    t.start_agent("node1", &[]).unwrap();
    let log = wait_for_log(&t, "agent-node1", "lb-agent ready");
    assert!(
        log.contains("adopted pinned links"),
        "the new agent attached anew instead of adopting the pinned links:\n{log}"
    );
    assert!(
        !log.contains("maps updated"),
        "the new agent rewrote maps that were already right:\n{log}"
    );
    // The same TCX links (ids) carry the new programs.
    let links_after = t.sh("node1", "bpftool link show").unwrap();
    let ids = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("type 11") || l.contains("tcx"))
            .filter_map(|l| l.split(':').next().map(str::to_string))
            .collect()
    };
    assert!(!ids(&links_before).is_empty(), "{links_before}");
    assert_eq!(ids(&links_before), ids(&links_after));

    let after = conn.send("after").unwrap();
    assert_eq!(
        (&after.backend, after.client),
        (&before.backend, before.client),
        "the open connection broke or moved across the restart"
    );
    let ct = t.lbctl_json("node1", "conntrack").unwrap();
    let port = before.client.port().to_string();
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"].as_str().is_some_and(|s| s.ends_with(&port))),
        "the flow's conntrack entry is gone: {ct}"
    );
}

/// A malformed document is rejected with an error naming the document and the
/// field; the previous state stays and keeps serving; a corrected file applies.
#[test]
fn malformed_manifest_keeps_the_previous_state() {
    require_privileges!();
    let t = one_node();
    let (web1, web2) = (t.pod("web1").ip, t.pod("web2").ip);
    t.start_agents(&web_manifest(&t, &["web1"])).unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(VIP, 80), &[sa(web1, 8080)])
        .unwrap();

    // The Service's first port is not a number.
    let [svc, slice] = web_objects(&t, &["web2"]);
    let mut bad_svc = svc.to_json();
    bad_svc["spec"]["ports"][0]["port"] = "eighty".into();
    let bad = manifest(&[bad_svc.into(), slice]);
    assert!(bad.contains("port: eighty\n"), "{bad}");
    t.write_manifests(&bad).unwrap();
    let log = wait_for_log(&t, "agent-node1", "manifest rejected");
    assert!(
        log.contains("document 1 (Service default/web): spec.ports[0].port"),
        "the error does not name the document and field:\n{log}"
    );
    // Still the old backend, still serving.
    t.wait_for_backends("node1", &Frontend::tcp(VIP, 80), &[sa(web1, 8080)])
        .unwrap();
    let r = t
        .request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web1");
    t.check_running("agent-node1").unwrap();

    t.write_manifests(&web_manifest(&t, &["web2"])).unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(VIP, 80), &[sa(web2, 8080)])
        .unwrap();
    let r = t.request("client1", &format!("http://{VIP}/")).unwrap();
    assert_eq!(r.backend, "web2");
}

/// `lbctl` shows services, backends, conntrack and counters, as a table and as
/// JSON; the pinned maps carry BTF so bpftool prints field names.
#[test]
fn lbctl_and_bpftool_show_the_datapath() {
    require_privileges!();
    let t = one_node();
    let (web1, web2) = (t.pod("web1").ip, t.pod("web2").ip);
    t.start_agents(&web_manifest(&t, &["web1", "web2"]))
        .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(VIP, 80),
        &[sa(web1, 8080), sa(web2, 8080)],
    )
    .unwrap();
    let r = t
        .request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();

    let services = t.lbctl("node1", &["services"]).unwrap();
    assert!(services.contains("10.96.1.10:80/TCP"), "{services}");
    assert!(services.contains("default/web:http/TCP"), "{services}");
    assert!(
        services.contains(&format!("{web1}:8080(local)")),
        "{services}"
    );

    let backends = t.lbctl_json("node1", "backends").unwrap();
    let addrs: Vec<&str> = backends
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert!(addrs.contains(&web1.to_string().as_str()), "{backends}");
    assert!(backends[0]["local"].as_bool().unwrap(), "{backends}");

    let ct = t.lbctl_json("node1", "conntrack").unwrap();
    let client = t.pod("client1").ip.to_string();
    let fwd = ct
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["direction"] == "forward"
                && e["source"] == format!("{client}:{}", r.client.port()).as_str()
        })
        .unwrap_or_else(|| panic!("no forward entry for the request: {ct}"));
    assert_eq!(fwd["destination"], format!("{VIP}:80").as_str());
    assert!(
        fwd["nat"] == format!("{web1}:8080").as_str()
            || fwd["nat"] == format!("{web2}:8080").as_str(),
        "{fwd}"
    );
    let table = t.lbctl("node1", &["conntrack"]).unwrap();
    assert!(
        table.contains("forward") && table.contains("reply"),
        "{table}"
    );

    let stats = t.lbctl_json("node1", "stats").unwrap();
    assert!(stats["packets"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["new_flow"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["reply_translated"].as_u64().unwrap() >= 1, "{stats}");
    let table = t.lbctl("node1", &["stats"]).unwrap();
    assert!(table.contains("drop_no_backend"), "{table}");

    let dir = t.node("node1").bpffs.clone();
    // bpftool runs in the root namespaces: pins live on the host's bpffs,
    // which `ip netns exec` would hide; no packet is sent.
    let dump = |map: &str| {
        let out = std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(dir.join(map))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let svc = dump("LB_SERVICES");
    for field in ["\"service_id\"", "\"backend_count\"", "\"scope\""] {
        assert!(svc.contains(field), "LB_SERVICES dump lacks {field}: {svc}");
    }
    let ct = dump("LB_CONNTRACK");
    for field in ["\"nat_addr\"", "\"last_seen_ns\"", "\"dir\""] {
        assert!(ct.contains(field), "LB_CONNTRACK dump lacks {field}: {ct}");
    }
}

/// `lbctl conntrack` shows time left with the agent's own lifetimes, which
/// it reads from the pinned `LB_SETTINGS` (bpftool prints it with field
/// names); without that pin (an agent from before it) it falls back to the
/// defaults and says so on stderr.
#[test]
fn lbctl_conntrack_uses_the_agents_lifetimes() {
    require_privileges!();
    let t = one_node();
    t.write_manifests(&web_manifest(&t, &["web1", "web2"]))
        .unwrap();
    t.start_agent("node1", &["--conntrack-tcp-timeout-established", "2h"])
        .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(VIP, 9000),
        &[sa(t.pod("web1").ip, 9000), sa(t.pod("web2").ip, 9000)],
    )
    .unwrap();
    wait_for_log(&t, "agent-node1", "lb-agent ready");
    let mut conn = t.connect("client1", sa(VIP, 9000)).unwrap();
    let answer = conn.send("hello").unwrap();
    let source = format!("{}:{}", t.pod("client1").ip, answer.client.port());

    let dir = t.node("node1").bpffs.clone();
    // lbctl as an operator runs it, stderr included.
    let lbctl = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", t.node("node1").netns))
            .arg("--")
            .arg(lb_tests::artifacts::lbctl_bin())
            .args(args)
            .arg("--bpffs")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "lbctl {args:?}: {out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let left = |json: &str| -> f64 {
        let ct: serde_json::Value = serde_json::from_str(json).unwrap();
        let fwd = ct
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["direction"] == "forward" && e["source"] == source.as_str())
            .unwrap_or_else(|| panic!("no forward entry for {source}: {ct}"))
            .clone();
        assert_eq!(fwd["state"], "ESTABLISHED", "{fwd}");
        fwd["remaining_seconds"].as_f64().unwrap()
    };

    let (json, err) = lbctl(&["conntrack", "-o", "json"]);
    let remaining = left(&json);
    assert!(
        remaining > 7000.0 && remaining <= 7200.0,
        "LEFT is not the agent's 2h: {remaining} s"
    );
    assert!(err.is_empty(), "lbctl complained: {err}");
    let (table, _) = lbctl(&["conntrack"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("forward") && l.contains(&source))
        .unwrap_or_else(|| panic!("no row for {source}: {table}"));
    // STATE, AGE(s), LEFT(s).
    let cols: Vec<&str> = row.split_whitespace().collect();
    let state = cols.iter().position(|c| *c == "ESTABLISHED").expect(row);
    let left_col: f64 = cols[state + 2].parse().expect(row);
    assert!(left_col > 7000.0 && left_col <= 7200.0, "{row}");

    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(dir.join(lb_common::map_names::SETTINGS))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dump = String::from_utf8(out.stdout).unwrap();
    for field in [
        "\"ct_tcp_established_ns\": 7200000000000",
        "\"ct_udp_ns\": 30000000000",
        "\"snat_port_min\"",
    ] {
        assert!(
            dump.contains(field),
            "LB_SETTINGS dump lacks {field}: {dump}"
        );
    }

    // An agent from before LB_SETTINGS: the defaults (24h), said on stderr.
    std::fs::remove_file(dir.join(lb_common::map_names::SETTINGS)).unwrap();
    let (json, err) = lbctl(&["conntrack", "-o", "json"]);
    let remaining = left(&json);
    assert!(
        remaining > 86_000.0 && remaining <= 86_400.0,
        "without LB_SETTINGS LEFT should use the default 24h: {remaining} s"
    );
    assert!(
        err.contains("LB_SETTINGS") && err.contains("default lifetimes"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `lb-agent --cleanup` detaches every program and removes every pin: service
/// traffic is no longer translated, plain pod traffic still flows.
#[test]
fn cleanup_detaches_and_unpins_everything() {
    require_privileges!();
    let t = one_node();
    let web1 = t.pod("web1").ip;
    t.start_agents(&web_manifest(&t, &["web1"])).unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(VIP, 80), &[sa(web1, 8080)])
        .unwrap();
    t.request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();
    t.stop_agent("node1").unwrap();

    let dir = t.node("node1").bpffs.clone();
    let agent = lb_tests::artifacts::lb_agent_bin();
    let out = std::process::Command::new(&agent)
        .args(["--cleanup", "--bpffs"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
    // Detached synchronously: the very next flow is not translated.
    let after = t.curl("client1", &format!("http://{VIP}/"));
    assert!(
        after.is_err(),
        "the ClusterIP still answers after cleanup: {after:?}"
    );
    // The kernel frees the detached links a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let links = t.sh("node1", "bpftool link show").unwrap();
        if !links.contains("type 11") && !links.contains("tcx") {
            break;
        }
        assert!(Instant::now() < deadline, "TCX links remain: {links}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = t
        .request("client1", &format!("http://{web1}:8080/"))
        .unwrap();
    assert_eq!(r.backend, "web1");
}

/// The agent deletes idle conntrack entries, both directions of a flow
/// together, after the configured timeout; an open TCP flow stays.
#[test]
fn idle_conntrack_entries_are_collected() {
    require_privileges!();
    let t = one_node();
    let web1 = t.pod("web1").ip;
    t.write_manifests(&web_manifest(&t, &["web1"])).unwrap();
    t.start_agent(
        "node1",
        &[
            "--conntrack-udp-timeout",
            "2s",
            "--conntrack-gc-interval",
            "1s",
        ],
    )
    .unwrap();
    t.wait_for_backends("node1", &Frontend::udp(VIP, 9000), &[sa(web1, 9000)])
        .unwrap();
    t.request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();
    let mut conn = t.connect("client1", sa(VIP, 9000)).unwrap();
    conn.send("hello").unwrap();
    let r = t
        .socat_line("client1", "udp", sa(VIP, 9000), "ping")
        .unwrap();
    assert_eq!((r.backend.as_str(), r.proto.as_str()), ("web1", "udp"));

    let count = |proto: &str| -> usize {
        let ct = t.lbctl_json("node1", "conntrack").unwrap();
        ct.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["protocol"] == proto)
            .count()
    };
    assert_eq!(
        count("UDP"),
        2,
        "the UDP flow has no entries in both directions"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while count("UDP") > 0 {
        assert!(
            Instant::now() < deadline,
            "idle UDP entries were not collected"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(count("TCP") >= 2, "the open TCP flow lost its entries");
    conn.send("still").unwrap();
}

/// Pod interfaces are attached as they appear (netlink) and let go as they
/// disappear: a pod created after the agent started reaches the ClusterIP,
/// and its link pins go when its veth goes.
#[test]
fn pod_interfaces_are_attached_as_they_appear_and_forgotten_as_they_go() {
    require_privileges!();
    let mut t = one_node();
    let web1 = t.pod("web1").ip;
    t.start_agents(&web_manifest(&t, &["web1"])).unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(VIP, 80), &[sa(web1, 8080)])
        .unwrap();
    t.request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();

    let pod = t.add_pod("node1", "late").unwrap();
    let links = t.node("node1").bpffs.join("links");
    let pins_of = |iface: &str| -> usize {
        std::fs::read_dir(&links)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .ends_with(&format!("-{iface}"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while pins_of(&pod.host_iface) < 2 {
        assert!(
            Instant::now() < deadline,
            "{} was not attached; agent log:\n{}",
            pod.host_iface,
            t.log("agent-node1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = t
        .request_eventually("late", &format!("http://{VIP}/"), WARMUP)
        .unwrap();
    assert_eq!((r.backend.as_str(), *r.client.ip()), ("web1", pod.ip));

    t.remove_pod("late").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pins_of(&pod.host_iface) > 0 {
        assert!(
            Instant::now() < deadline,
            "the pins of {} outlived it",
            pod.host_iface
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.check_running("agent-node1").unwrap();
    // The other pods are untouched.
    let r = t.request("client1", &format!("http://{VIP}/")).unwrap();
    assert_eq!(r.backend, "web1");
}
