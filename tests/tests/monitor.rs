//! `lbctl monitor`: the datapath's events (ring buffer `LB_MONITOR_EVENTS`)
//! behind the load-time switch `LB_MONITOR`.
//!
//! BPF_PROG_TEST_RUN tests load the built object with the switch on and
//! off, run real frames through the TC programs and read the ring buffer
//! back: each outcome gives exactly its event (kind, reason, service,
//! tuples, hook, interface), and with the switch off nothing is written
//! and the verifier removed the monitoring code (instruction counts).
//!
//! The end-to-end test runs the agent with `--monitor` in the netns
//! topology and `lbctl monitor` in its node's namespace while a pod curls
//! a Service without endpoints: lbctl prints the reject naming the Service.
//!
//! Run: `cargo test -p lb-tests --test monitor -- --test-threads=1` (root).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_common::monitor::{hook, kind, switch, MonitorEvent};
use lb_common::{
    ipv4_to_net, program_names, ConntrackEntry, ConntrackKey, StatReason, CT_DIR_FORWARD,
    PROTO_TCP, PROTO_UDP,
};
use lb_tests::datapath::{BackendEntry, Datapath, ServiceEntry};
use lb_tests::datapath::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};
use lb_tests::monitor::{drain, load, xlated_insns};
use lb_tests::netns::in_private_netns;
use lb_tests::objects::{endpoint_slice, manifest, service, ServicePort};
use lb_tests::packet::*;
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const POD_INGRESS: &str = program_names::POD_INGRESS;

const CLIENT: &str = "10.244.0.5:40000";
const VIP: &str = "10.96.0.10:80";
const BACKEND: &str = "10.244.1.11:8080";
/// The interface the test frames "arrive" on (`__sk_buff.ifindex`): the loopback, the one interface a fresh
/// namespace has (BPF_PROG_TEST_RUN wants one that exists).
const IFINDEX: u32 = 1;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn net(a: &Ipv4Addr) -> u32 {
    ipv4_to_net(a.octets())
}

/// The event a packet from `src` to `dst` gives on the pod's ingress, with
/// the fields each test sets.
fn event(k: u8, reason: StatReason, service_id: u32, src: &str, dst: &str) -> MonitorEvent {
    let (src, dst) = (sa(src), sa(dst));
    MonitorEvent {
        version: lb_common::monitor::EVENT_VERSION,
        kind: k,
        hook: hook::POD_INGRESS,
        proto: PROTO_TCP,
        reason: reason as u32,
        service_id,
        ifindex: IFINDEX,
        saddr: net(src.ip()),
        daddr: net(dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        ..MonitorEvent::default()
    }
}

/// Events without their timestamps (checked to be set, then cleared).
fn events(dp: &mut Datapath) -> Vec<MonitorEvent> {
    drain(dp)
        .into_iter()
        .map(|mut e| {
            assert_ne!(e.ts_ns, 0, "event without a timestamp: {e:?}");
            e.ts_ns = 0;
            e
        })
        .collect()
}

fn empty_service(dp: &mut Datapath, id: u32) {
    dp.add_service(&ServiceEntry::cluster_ip(id, sa(VIP), PROTO_TCP, vec![]));
}

fn web(dp: &mut Datapath, id: u32) {
    dp.add_service(&ServiceEntry::cluster_ip(
        id,
        sa(VIP),
        PROTO_TCP,
        vec![BackendEntry::new(11, sa(BACKEND))],
    ));
}

#[test]
fn reject_event_names_the_service_and_the_packet() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = load(switch::EVENTS).expect("load with the monitor on");
        empty_service(&mut dp, 7);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
        let r = dp.run_on(POD_INGRESS, &syn, IFINDEX);
        assert_eq!(r.ret, TC_ACT_REDIRECT, "E1: answered with a reset");
        assert_eq!(
            events(&mut dp),
            vec![event(
                kind::REJECT,
                StatReason::RejectNoEndpoint,
                7,
                CLIENT,
                VIP
            )]
        );
        // A packet that is nobody's business is no event.
        let other = tcp(sa(CLIENT), sa("10.96.0.99:80"), TCP_SYN).build();
        assert_eq!(dp.run_on(POD_INGRESS, &other, IFINDEX).ret, TC_ACT_UNSPEC);
        assert_eq!(events(&mut dp), vec![]);
    });
}

#[test]
fn drop_event_carries_the_drop_reason() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = load(switch::EVENTS).expect("load with the monitor on");
        web(&mut dp, 3);
        // The slot names a backend that is gone (the agent mid-update).
        dp.remove_backend(11);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
        let r = dp.run_on(POD_INGRESS, &syn, IFINDEX);
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert_eq!(
            events(&mut dp),
            vec![event(
                kind::DROP,
                StatReason::DropBackendMissing,
                3,
                CLIENT,
                VIP
            )]
        );
        assert_eq!(dp.stat(StatReason::DropBackendMissing), 1);
    });
}

#[test]
fn new_translation_event_has_the_tuple_before_and_after() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = load(switch::EVENTS).expect("load with the monitor on");
        web(&mut dp, 5);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
        let r = dp.run_on(POD_INGRESS, &syn, IFINDEX);
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        let mut want = event(kind::TRANSLATE, StatReason::NewFlow, 5, CLIENT, VIP);
        want.nat_saddr = want.saddr;
        want.nat_sport = want.sport;
        want.nat_daddr = net(sa(BACKEND).ip());
        want.nat_dport = 8080u16.to_be();
        assert_eq!(events(&mut dp), vec![want]);
        // The flow's next packet is translated too, but it is no new
        // translation: no event.
        let ack = tcp(sa(CLIENT), sa(VIP), TCP_ACK).build();
        assert_eq!(dp.run_on(POD_INGRESS, &ack, IFINDEX).ret, TC_ACT_UNSPEC);
        assert_eq!(events(&mut dp), vec![]);
    });
}

#[test]
fn evict_event_when_a_flow_lost_one_direction() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = load(switch::EVENTS).expect("load with the monitor on");
        web(&mut dp, 5);
        // A FORWARD entry whose REPLY entry the LRU evicted.
        let (client, vip, backend) = (sa(CLIENT), sa(VIP), sa(BACKEND));
        let key = ConntrackKey {
            saddr: net(client.ip()),
            daddr: net(vip.ip()),
            sport: client.port().to_be(),
            dport: vip.port().to_be(),
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) },
            0
        );
        dp.ct_insert(
            key,
            ConntrackEntry {
                nat_addr: net(backend.ip()),
                nat_port: backend.port().to_be(),
                backend_id: 11,
                service_id: 5,
                flags: lb_common::ct_flags::TCP_ESTABLISHED,
                last_seen_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
                ..ConntrackEntry::default()
            },
        );
        let ack = tcp(client, vip, TCP_ACK).build();
        assert_eq!(dp.run_on(POD_INGRESS, &ack, IFINDEX).ret, TC_ACT_UNSPEC);
        assert_eq!(dp.stat(StatReason::ConntrackRepaired), 1);
        // A known flow is not looked up as a service: the event names the
        // flow, not the service.
        assert_eq!(
            events(&mut dp),
            vec![event(
                kind::EVICT,
                StatReason::ConntrackPeerMissing,
                0,
                CLIENT,
                VIP
            )]
        );
    });
}

#[test]
fn switch_off_writes_no_event_and_the_verifier_removes_the_code() {
    require_privileges!();
    in_private_netns(|| {
        // Off: the same reject, drop and new translation as above.
        let mut off = load(0).expect("load with the monitor off");
        empty_service(&mut off, 7);
        dp_udp_web(&mut off);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
        assert_eq!(off.run_on(POD_INGRESS, &syn, IFINDEX).ret, TC_ACT_REDIRECT);
        let dns = udp(sa(CLIENT), sa(VIP)).build();
        assert_eq!(off.run_on(POD_INGRESS, &dns, IFINDEX).ret, TC_ACT_UNSPEC);
        off.remove_backend(11);
        let dns2 = udp(sa("10.244.0.5:40001"), sa(VIP)).build();
        assert_eq!(off.run_on(POD_INGRESS, &dns2, IFINDEX).ret, TC_ACT_SHOT);
        assert_eq!(drain(&mut off), vec![], "events with the switch off");

        // The code is there in the object, and gone after verification:
        // each program is shorter with the switch off than with it on.
        let on = load(switch::EVENTS).expect("load with the monitor on");
        let log = load(switch::EVENTS | switch::DEBUG_LOG).expect("load with debug log on");
        for prog in program_names::ALL {
            let (n_off, n_on, n_log) = (
                xlated_insns(&off, prog),
                xlated_insns(&on, prog),
                xlated_insns(&log, prog),
            );
            println!("{prog}: {n_off} xlated instructions off, {n_on} with --monitor, {n_log} with --monitor --datapath-debug-log");
            assert!(
                n_off + 100 < n_on,
                "{prog}: off {n_off}, on {n_on}: the monitor code was not removed"
            );
            assert!(n_on < n_log, "{prog}: the debug log adds code");
        }
    });
}

/// A UDP port of the same VIP with one backend (id 11).
fn dp_udp_web(dp: &mut Datapath) {
    dp.add_service(&ServiceEntry::cluster_ip(
        8,
        sa(VIP),
        PROTO_UDP,
        vec![BackendEntry::new(11, sa(BACKEND))],
    ));
}

/// `lbctl monitor ARGS` running in a node's network namespace (nsenter
/// --net: the root mount namespace, where the pins are), its stdout lines
/// arriving on a channel. Killed when dropped, also when a test fails.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    fn start(t: &Topology, node: &str, args: &[&str]) -> Monitor {
        let n = t.node(node);
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", n.netns))
            .arg("--")
            .arg(lb_tests::artifacts::lbctl_bin())
            .arg("monitor")
            .args(args)
            .arg("--bpffs")
            .arg(&n.bpffs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning lbctl monitor");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Monitor { child, lines }
    }

    /// The first line within `timeout` that contains every one of `parts`;
    /// panics with every line seen otherwise.
    fn expect_line(&self, parts: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if parts.iter().all(|p| l.contains(p)) => return l,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!("no lbctl monitor line with {parts:?} within {timeout:?}; lines: {seen:#?}");
    }

    /// SIGINT, then the exit status (within 5 s).
    fn interrupt(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for lbctl") {
                return s;
            }
            assert!(Instant::now() < deadline, "lbctl monitor ignored SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lbctl_monitor_shows_the_reject_of_a_service_without_endpoints() {
    require_privileges!();
    let t = Topology::builder()
        .node("node1", &["client1"])
        .node("node2", &["client2"])
        .build()
        .expect("building the topology");
    let vip = Ipv4Addr::new(10, 96, 7, 10);
    let port = ServicePort::tcp("http", 80, 8080);
    t.write_manifests(&manifest(&[
        service("empty", vip).port(port.clone()).into(),
        endpoint_slice("empty", "empty-1").ports_of(&[port]).into(),
    ]))
    .unwrap();
    t.start_agent("node1", &["--monitor"]).unwrap();
    // node2: no events, but the datapath's debug lines in the agent's log.
    t.start_agent(
        "node2",
        &["--datapath-debug-log", "--log-level", "info,datapath=debug"],
    )
    .unwrap();
    for node in ["node1", "node2"] {
        t.wait_for_backends(node, &Frontend::tcp(vip, 80), &[])
            .unwrap();
    }

    let mut mon = Monitor::start(
        &t,
        "node1",
        &["--type", "reject", "--service", "default/empty"],
    );
    // A stream that stays empty while nothing happens, then the reject:
    // curl is refused (E1) and lbctl names the Service and the packet.
    let url = format!("http://{vip}/");
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = t.pod("client1").ip;
    let line = loop {
        t.curl("client1", &url)
            .expect_err("a Service without endpoints answered");
        // lbctl may still be opening the ring buffer: curl again.
        match mon.lines.recv_timeout(Duration::from_secs(2)) {
            Ok(l) => break l,
            Err(_) => assert!(Instant::now() < deadline, "no event from lbctl monitor"),
        }
    };
    for part in [
        "reject",
        "reject_no_endpoint",
        "service=default/empty:http/TCP",
        &format!("{client}:"),
        &format!("-> {vip}:80"),
        "pod-ingress",
    ] {
        assert!(line.contains(part), "{part:?} missing in {line:?}");
    }
    // Every attempt is an event: the next one too.
    t.curl("client1", &url).expect_err("answered");
    mon.expect_line(&["reject", "default/empty"], Duration::from_secs(10));
    assert!(mon.interrupt().success(), "lbctl monitor exits 0 on SIGINT");

    // JSON: one object per line, the same event.
    let json = Monitor::start(&t, "node1", &["--json", "--addr", &client.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    t.curl("client1", &url).expect_err("answered");
    let l = json.expect_line(&["\"kind\":\"reject\""], Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&l).expect("a JSON line");
    assert_eq!(v["service"], "default/empty:http/TCP");
    assert_eq!(v["destination"], format!("{vip}:80"));
    drop(json);

    // node2's agent logs the same reject as a debug line (aya-log): kind 2
    // (reject), reason 19 (reject_no_endpoint), from client2 to the VIP.
    let client2 = t.pod("client2").ip;
    let want = "kind 2 reason 19";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        t.curl("client2", &url).expect_err("answered");
        std::thread::sleep(Duration::from_millis(300));
        let log = t.log("agent-node2");
        if log.lines().any(|l| {
            l.contains(want)
                && l.contains(&format!("{client2}:"))
                && l.contains(&format!("-> {vip}:80"))
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no datapath debug line {want:?} for {client2} in node2's agent log:\n{log}"
        );
    }

    // node2's agent runs without --monitor: lbctl says so and fails.
    let n2 = t.node("node2");
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n2.netns))
        .arg("--")
        .arg(lb_tests::artifacts::lbctl_bin())
        .args(["monitor", "--bpffs"])
        .arg(&n2.bpffs)
        .output()
        .expect("running lbctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "lbctl monitor without --monitor succeeded"
    );
    assert!(
        err.contains("monitoring is off") && err.contains("--monitor"),
        "unclear message: {err}"
    );
}
