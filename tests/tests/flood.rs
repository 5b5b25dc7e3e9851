//! Floods and SNAT port capacity (#9 item 5), end to end in the netns
//! topology: a flood of distinct new flows to a NodePort fills the
//! conntrack map (an LRU) while established connections, the agent and
//! new connections keep working; and new connections at a sustained rate
//! to one remote backend, each closed after one exchange, do not exhaust
//! the SNAT ports.
//!
//! Run serially: `cargo test -p lb-tests --test flood -- --test-threads=1`.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::objects::{endpoint_slice, manifest, service, Endpoint, ServicePort, ServiceType};
use lb_tests::packet::{tcp, TCP_SYN};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology, EXTERNAL_IP};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The value of counter `name` in `lbctl stats -o json` on `node`.
fn stat(t: &Topology, node: &str, name: &str) -> u64 {
    let s = t.lbctl_json(node, "stats").expect("lbctl stats");
    s[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {s}"))
}

/// A sample of the agent's /metrics on `node` (127.0.0.1:10249 in the
/// node's namespace), without labels.
fn metric(t: &Topology, node: &str, name: &str) -> f64 {
    let text = t
        .curl(node, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// Sends `n` TCP SYNs to `dst` from the network namespace `netns`, each a
/// distinct flow: source addresses in 10.200.0.0/16 and 16 source ports
/// each, in a scattered order (i * golden ratio mod 2^20 visits every
/// value once). Raw IP socket (IP_HDRINCL): the kernel routes it and
/// fills in the IP checksum; the TCP checksum is the packet builder's.
/// Returns how many the kernel accepted.
fn flood(netns: &str, dst: SocketAddrV4, n: u32) -> std::io::Result<u32> {
    let ns = File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: a valid namespace descriptor; this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut sent = 0;
    for i in 0..n {
        let x = i.wrapping_mul(0x9e37_79b1) & 0xf_ffff;
        let src = SocketAddrV4::new(
            Ipv4Addr::new(10, 200, (x >> 8) as u8, x as u8),
            1024 + (x >> 16) as u16,
        );
        let frame = tcp(src, dst, TCP_SYN).build();
        let ip = &frame[14..];
        loop {
            // SAFETY: valid buffer and address of the sizes given.
            let rc = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    ip.as_ptr().cast(),
                    ip.len(),
                    0,
                    std::ptr::from_ref(&to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                sent += 1;
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                // The queue is full: let it drain.
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            return Err(e);
        }
    }
    Ok(sent)
}

/// #9 item 5: a flood of 1M distinct new TCP flows (SYNs with forged
/// sources) from the external namespace to a NodePort of node1, whose
/// agent runs with `--max-conntrack 32768` (16k flows): the LRU map fills
/// and turns over many times. Asserted:
/// - the map filled (more than `max_conntrack` flows were created,
///   `new_flow`) and never held more than its capacity
///   (`lb_conntrack_entries`);
/// - 10 connections opened before the flood keep working, to the same
///   backend with the same client address, during the flood and after
///   it. The Service has externalTrafficPolicy=Local and one local
///   backend, so no SNAT: a flow the LRU evicts is re-created by its next
///   packet identically (`new_flow_without_syn`); with SNAT or several
///   backends an evicted flow would get a new port or backend and break,
///   so what is asserted is "works as far as LRU semantics allow": every
///   flow the datapath can re-create the same way survives;
/// - the agent stays responsive: /healthz from the external namespace and
///   `lbctl stats` answer throughout the flood;
/// - a new connection succeeds after the flood within 30 tries 0.5 s
///   apart.
///
/// The counters (new flows, re-created ones, failed inserts, GC) are
/// printed.
#[test]
fn i9_a_flood_of_new_flows_to_a_node_port_spares_established_ones() {
    require_privileges!();
    const FLOWS: u32 = 1 << 20;
    const MAX_CONNTRACK: u64 = 32_768;
    let t = Topology::builder()
        .node("node1", &["web1"])
        .node("node2", &[])
        .build()
        .expect("building the topology");
    t.spawn_backend("web1", &["tcp:9000", "http:8080"]).unwrap();
    let web1 = t.pod("web1").clone();
    let node1 = t.node("node1").address;
    let port = [ServicePort::tcp("line", 9000, 9000).node_port(30500)];
    let m = manifest(&[
        service("flood", Ipv4Addr::new(10, 96, 0, 90))
            .service_type(ServiceType::NodePort)
            .external_traffic_policy_local()
            .ports(&port)
            .into(),
        endpoint_slice("flood", "flood-1")
            .ports_of(&port)
            .endpoint(Endpoint::of(&web1))
            .into(),
    ]);
    t.write_manifests(&m).unwrap();
    let max = MAX_CONNTRACK.to_string();
    for n in ["node1", "node2"] {
        t.start_agent(
            n,
            &["--max-conntrack", &max, "--conntrack-gc-interval", "1s"],
        )
        .unwrap();
    }
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30500, "TCP"),
        &[sa(web1.ip, 9000)],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let target = sa(node1, 30500);
    let mut conns: Vec<_> = (0..10)
        .map(|i| {
            let mut c = t.connect("ext", target).unwrap();
            let r = c.send(&format!("before-{i}")).unwrap();
            (c, r)
        })
        .collect();
    for (_, r) in &conns {
        assert_eq!(
            r.client.ip(),
            &EXTERNAL_IP,
            "no SNAT (externalTrafficPolicy=Local)"
        );
    }
    let new_flow_before = stat(&t, "node1", "new_flow");

    let ext_ns = t.netns("ext");
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let (sent, probes, max_entries) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let r = flood(&ext_ns, target, FLOWS);
            done.store(true, Ordering::SeqCst);
            r
        });
        let mut probes = 0u32;
        let mut max_entries = 0f64;
        let mut round = 0u32;
        while !done.load(Ordering::SeqCst) {
            // The agent answers while the flood runs.
            let health = t.curl("ext", &format!("http://{node1}:10256/healthz"));
            assert!(health.is_ok(), "/healthz during the flood: {health:?}");
            let stats = t.lbctl_json("node1", "stats");
            assert!(stats.is_ok(), "lbctl stats during the flood: {stats:?}");
            max_entries = f64::max(max_entries, metric(&t, "node1", "lb_conntrack_entries"));
            // The established connections keep working.
            for (i, (c, before)) in conns.iter_mut().enumerate() {
                let r = c
                    .send(&format!("during-{round}-{i}"))
                    .unwrap_or_else(|e| panic!("connection {i} broke during the flood: {e}"));
                assert_eq!((&r.backend, r.client), (&before.backend, before.client));
            }
            probes += 1;
            round += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        let sent = sender.join().unwrap().expect("flood");
        (sent, probes, max_entries)
    });
    let flood_time = started.elapsed();

    // After the flood: the old connections, and new ones.
    for (i, (c, before)) in conns.iter_mut().enumerate() {
        let r = c
            .send(&format!("after-{i}"))
            .unwrap_or_else(|e| panic!("connection {i} broke after the flood: {e}"));
        assert_eq!((&r.backend, r.client), (&before.backend, before.client));
    }
    let after = Instant::now();
    let mut tries = 0;
    let first_new = loop {
        tries += 1;
        let r = t.connect("ext", target).and_then(|mut c| c.send("new"));
        match r {
            Ok(r) => break r,
            Err(e) => {
                assert!(tries < 30, "no new connection after the flood: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    assert_eq!(first_new.backend, conns[0].1.backend);
    let new_after = after.elapsed();

    let new_flows = stat(&t, "node1", "new_flow") - new_flow_before;
    let without_syn = stat(&t, "node1", "new_flow_without_syn");
    let full = stat(&t, "node1", "drop_conntrack_full");
    let expired = stat(&t, "node1", "conntrack_expired");
    let entries = metric(&t, "node1", "lb_conntrack_entries");
    let gc_deleted = metric(&t, "node1", "lb_conntrack_gc_deleted_total");
    // Entries written (two per flow) that are neither in the map nor
    // deleted by the GC: the LRU evicted them.
    let evicted = (2 * new_flows) as f64 - entries - gc_deleted;
    eprintln!(
        "flood: {sent} SYNs in {:.1} s; node1 created {new_flows} flows \
         (map of {MAX_CONNTRACK} entries), about {evicted:.0} entries evicted, \
         {without_syn} flows re-created by a packet without SYN, {full} failed inserts \
         (drop_conntrack_full), {expired} expired, {gc_deleted} deleted by the GC; \
         entries now {entries}, at most {max_entries} while sampled; \
         {probes} rounds of healthz + lbctl + 10 connections answered during the flood; \
         first new connection after {:.1} s ({tries} tries)",
        flood_time.as_secs_f64(),
        new_after.as_secs_f64(),
    );
    assert_eq!(sent, FLOWS);
    assert!(
        new_flows > 4 * MAX_CONNTRACK,
        "the flood did not fill the map: {new_flows} flows"
    );
    assert!(evicted > 0.0);
    assert!(max_entries <= MAX_CONNTRACK as f64, "{max_entries}");
    assert!(probes > 0, "the flood ended before anything was checked");
}

/// The client of [`i9_snat_port_capacity_at_a_sustained_connection_rate`]:
/// `RATE` new connections per second for `SECONDS`, from `WORKERS`
/// threads, each connection one line and its answer, then closed (FIN).
/// Prints `ok N failed M seconds S`.
const RATE_CLIENT_PY: &str = r#"
import socket, sys, threading, time
host, port, rate, seconds, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), 8
ok = [0] * workers
failed = [0] * workers
errors = []
def work(w):
    interval = workers / rate
    start = time.monotonic()
    n = 0
    while True:
        due = start + n * interval + w * interval / workers
        now = time.monotonic()
        if due - start >= seconds:
            return
        if due > now:
            time.sleep(due - now)
        n += 1
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"x\n")
            if not s.makefile().readline():
                raise OSError("closed")
            s.close()
            ok[w] += 1
        except OSError as e:
            failed[w] += 1
            if len(errors) < 5:
                errors.append(str(e))
threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
t0 = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
print(f"ok {sum(ok)} failed {sum(failed)} seconds {time.monotonic() - t0:.1f} errors {errors}")
"#;

/// #9 item 5: SNAT port capacity. New connections at 500/s (offered) for
/// 20 s from the external client to a NodePort of node1 whose only
/// backend is on node2 (SNAT'ed to node1's address, M2), each closed after
/// one exchange, so that every closed flow would hold its SNAT port for
/// the TIME_WAIT lifetime (120 s). The agent runs with a SNAT range of
/// 2000 ports (`--snat-port-range 20000-21999`): without reclaiming closed
/// flows' ports the range would run out after about 4 s; with it, new
/// connections take over ports of flows closed more than 2 s ago.
/// Asserted: no connection failed, nothing was dropped for want of a port
/// (`drop_snat_exhausted` 0), more connections were made than the range
/// has ports, and ports were reclaimed. The rate reached and the
/// counters are printed (no timed assertion: a slow machine makes fewer
/// connections, and the assertions still hold).
#[test]
fn i9_snat_port_capacity_at_a_sustained_connection_rate() {
    require_privileges!();
    let t = Topology::builder()
        .node("node1", &[])
        .node("node2", &["web2"])
        .build()
        .expect("building the topology");
    t.spawn_backend("web2", &["tcp:9000"]).unwrap();
    let web2 = t.pod("web2").clone();
    let node1 = t.node("node1").address;
    let port = [ServicePort::tcp("line", 9000, 9000).node_port(30600)];
    let m = manifest(&[
        service("rate", Ipv4Addr::new(10, 96, 0, 91))
            .service_type(ServiceType::NodePort)
            .ports(&port)
            .into(),
        endpoint_slice("rate", "rate-1")
            .ports_of(&port)
            .endpoint(Endpoint::of(&web2))
            .into(),
    ]);
    t.write_manifests(&m).unwrap();
    for n in ["node1", "node2"] {
        t.start_agent(n, &["--snat-port-range", "20000-21999"])
            .unwrap();
    }
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30600, "TCP"),
        &[sa(web2.ip, 9000)],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The client's own ports: closed connections sit in TIME_WAIT on its
    // side too; let it reuse them (and give it the whole port space).
    t.sh(
        "ext",
        "sysctl -q -w net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='1024 65000'",
    )
    .unwrap();
    let script = t.dir().join("rate_client.py");
    std::fs::write(&script, RATE_CLIENT_PY).unwrap();
    let out = t
        .exec(
            "ext",
            &[
                "python3",
                &script.to_string_lossy(),
                &node1.to_string(),
                "30600",
                "500",
                "20",
            ],
            Duration::from_secs(60),
        )
        .unwrap()
        .ok()
        .unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let field = |name: &str| -> f64 {
        let i = words.iter().position(|w| *w == name).unwrap();
        words[i + 1].parse().unwrap()
    };
    let (ok, failed, secs) = (field("ok"), field("failed"), field("seconds"));
    let exhausted = stat(&t, "node1", "drop_snat_exhausted");
    let taken = stat(&t, "node1", "snat_port_taken");
    let reclaimed = stat(&t, "node1", "snat_port_reclaimed");
    let new_flows = stat(&t, "node1", "new_flow");
    eprintln!(
        "SNAT capacity, 2000 ports, one remote backend: {ok} connections in {secs} s \
         ({:.0}/s offered 500/s), {failed} failed; node1: {new_flows} new flows, \
         {exhausted} drop_snat_exhausted, {taken} snat_port_taken, {reclaimed} \
         snat_port_reclaimed; client: {out}",
        ok / secs
    );
    assert_eq!(failed, 0.0, "{out}");
    assert_eq!(exhausted, 0);
    assert!(
        new_flows > 2000,
        "fewer connections than ports: nothing was proven"
    );
    assert!(reclaimed > 0, "more flows than ports and none reclaimed");
}
