//! A packet fuzzer through BPF_PROG_TEST_RUN: random, truncated and
//! malformed frames (bad IHL, bad lengths, IP options, fragments, ICMP
//! errors with cut quotes, VLAN tags, IPv6, ARP, random bytes) through all
//! four TC programs of the built object, with services, flows (plain,
//! SNAT'ed, port-remapped) and routes in place. For every run:
//!
//! - the verdict is one lb uses: TC_ACT_UNSPEC (continue), TC_ACT_SHOT or
//!   TC_ACT_REDIRECT; the kernel never refuses the program's result;
//! - exactly one outcome counter grows, and `packets` by one (every frame
//!   lands on a counter: the outcomes add up to the packets);
//! - a frame that is neither service traffic nor about a translated flow
//!   (none of lb's addresses anywhere in it) leaves bit-for-bit unchanged:
//!   passed as it came, or dropped only as a later fragment without its
//!   first (C4);
//! - a frame whose checksums were right and that lb changed leaves with
//!   every checksum right.
//!
//! The generator is proptest's, seeded (LB_FUZZ_SEED, printed), so a
//! failure is reproducible and proptest shrinks it to a small frame. CI
//! runs LB_FUZZ_CASES frames (default 2,000, printed); `cargo xtask fuzz`
//! runs many more.
//!
//! Run: `cargo test -p lb-tests --test fuzz -- --nocapture` (root).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use lb_common::{program_names, DatapathConfig, StatReason, PROTO_TCP, PROTO_UDP, STAT_COUNT};
use lb_tests::datapath::{
    BackendEntry, Datapath, ServiceEntry, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
};
use lb_tests::netns::in_private_netns;
use lb_tests::packet::*;
use lb_tests::require_privileges;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: c is a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

// The world of the fuzzed node: every address lb knows about.
const CLIENT: &str = "10.244.0.5:40000";
const VIP_TCP: &str = "10.96.0.10:80";
const VIP_UDP: &str = "10.96.0.10:53";
const VIP_EMPTY: &str = "10.96.0.11:80";
const BACKEND_LOCAL: &str = "10.244.0.52:8080";
const BACKEND_REMOTE: &str = "10.244.2.12:8080";
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const EXTERNAL: &str = "198.51.100.7:51000";
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Every address lb has in its maps or writes into packets.
fn lb_addresses() -> Vec<[u8; 4]> {
    [
        *sa(CLIENT).ip(),
        *sa(VIP_TCP).ip(),
        *sa(VIP_EMPTY).ip(),
        *sa(BACKEND_LOCAL).ip(),
        *sa(BACKEND_REMOTE).ip(),
        NODE,
        *sa(EXTERNAL).ip(),
        HAIRPIN,
    ]
    .iter()
    .map(|a| a.octets())
    .collect()
}

/// Whether any of lb's addresses appears anywhere in `frame` (at any
/// offset: whatever lb could take for an address of its own).
fn mentions_lb(frame: &[u8], addrs: &[[u8; 4]]) -> bool {
    frame
        .windows(4)
        .any(|w| addrs.iter().any(|a| a.as_slice() == w))
}

/// Builds the node in the current (private) network namespace: an uplink
/// veth with routes (so SNAT'ed packets are redirected for real) and a pod
/// veth; loads the datapath with services and a few flows in every state.
fn world() -> (Datapath, u32, u32) {
    for c in [
        vec![
            "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ],
        vec![
            "ip", "link", "add", "vpod0", "type", "veth", "peer", "name", "vpod1",
        ],
        vec!["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"],
        vec!["ip", "addr", "add", "10.244.0.1/24", "dev", "vpod0"],
    ] {
        sh(&c);
    }
    for l in ["up0", "up1", "vpod0", "vpod1"] {
        sh(&["ip", "link", "set", l, "up"]);
    }
    sh(&[
        "ip",
        "route",
        "add",
        "10.244.2.0/24",
        "via",
        "192.0.2.2",
        "mtu",
        "lock",
        "1400",
    ]);
    sh(&["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.3"]);
    for (ip, mac, dev) in [
        ("192.0.2.2", "02:00:00:00:02:02", "up0"),
        ("192.0.2.3", "02:00:00:00:02:03", "up0"),
        ("10.244.0.52", "02:00:00:00:00:52", "vpod0"),
    ] {
        sh(&[
            "ip",
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    for p in ["all", "up0", "vpod0"] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{p}/forwarding"), "1").unwrap();
    }
    let (up0, vpod0) = (ifindex("up0"), ifindex("vpod0"));

    let mut dp = Datapath::load_with(DatapathConfig::DEFAULT);
    dp.add_node_addr(NODE);
    dp.set_uplink_addr(up0, NODE);
    let mut web = ServiceEntry::cluster_ip(
        1,
        sa(VIP_TCP),
        PROTO_TCP,
        vec![
            BackendEntry::local(11, sa(BACKEND_LOCAL)),
            BackendEntry::new(12, sa(BACKEND_REMOTE)),
        ],
    );
    web.node_port = Some(30080);
    dp.add_service(&web);
    let mut dns = ServiceEntry::cluster_ip(
        2,
        sa(VIP_UDP),
        PROTO_UDP,
        vec![BackendEntry::new(21, sa(BACKEND_REMOTE))],
    );
    dns.node_port = Some(30053);
    dp.add_service(&dns);
    // E1: no endpoint at all.
    dp.add_service(&ServiceEntry::cluster_ip(
        3,
        sa(VIP_EMPTY),
        PROTO_TCP,
        vec![],
    ));

    // Flows: a pod's TCP and UDP flows, SNAT'ed external ones, a remapped
    // one (the same client port to the NodePort at the node address).
    for f in [
        tcp(sa(CLIENT), sa(VIP_TCP), TCP_SYN).build(),
        udp(sa(CLIENT), sa(VIP_UDP)).build(),
        tcp(sa(CLIENT), SocketAddrV4::new(NODE, 30080), TCP_SYN).build(),
    ] {
        dp.run_on(program_names::POD_INGRESS, &f, vpod0);
    }
    for f in [
        tcp(sa(EXTERNAL), SocketAddrV4::new(NODE, 30080), TCP_SYN).build(),
        udp(sa(EXTERNAL), SocketAddrV4::new(NODE, 30053)).build(),
    ] {
        dp.run_on(program_names::UPLINK_INGRESS, &f, up0);
    }
    (dp, up0, vpod0)
}

/// Valid frames of every kind lb handles, to mutate.
fn seeds(dp: &mut Datapath) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = Vec::new();
    let node_tcp = SocketAddrV4::new(NODE, 30080);
    let node_udp = SocketAddrV4::new(NODE, 30053);
    let other = sa("10.244.7.7:9000");
    // Service traffic and replies, both protocols, each hook's kind.
    v.push(tcp(sa(CLIENT), sa(VIP_TCP), TCP_ACK | TCP_PSH).build());
    v.push(tcp(sa("10.244.0.6:40000"), sa(VIP_TCP), TCP_SYN).build());
    v.push(udp(sa(CLIENT), sa(VIP_UDP)).build());
    v.push(udp_no_checksum(sa("10.244.0.6:40001"), sa(VIP_UDP)).build());
    v.push(tcp(sa(EXTERNAL), node_tcp, TCP_ACK).build());
    v.push(udp(sa(EXTERNAL), node_udp).build());
    v.push(tcp(sa(CLIENT), sa(VIP_EMPTY), TCP_SYN).build());
    let addr = |a: u32, p: u16| SocketAddrV4::new(Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p));
    let seg = |proto: u8, s: SocketAddrV4, d: SocketAddrV4| {
        if proto == PROTO_TCP {
            tcp(s, d, TCP_ACK).build()
        } else {
            udp(s, d).build()
        }
    };
    for (k, e) in dp.ct_all() {
        if k.dir != lb_common::CT_DIR_REPLY {
            continue;
        }
        // The reply as the backend sends it, the request as it reached the
        // backend, and the reply as the client got it.
        let (backend, to) = (addr(k.saddr, k.sport), addr(k.daddr, k.dport));
        let frontend = addr(e.nat_addr, e.nat_port);
        let client = if e.flags & lb_common::ct_flags::SNAT != 0 {
            addr(e.snat_addr, e.snat_port)
        } else {
            to
        };
        v.push(seg(k.proto, backend, to));
        let request = seg(k.proto, to, backend);
        let reply = seg(k.proto, frontend, client);
        for n in [0, 4, 8, 20] {
            // Toward the client about its request (from the backend, and
            // from a router); toward the backend about the reply.
            let q = &request[off::IP..(off::L4 + n).min(request.len())];
            v.push(icmp_port_unreachable(*backend.ip(), *to.ip(), q).build());
            v.push(icmp_port_unreachable(Ipv4Addr::new(192, 0, 2, 2), *to.ip(), q).build());
            let q = &reply[off::IP..(off::L4 + n).min(reply.len())];
            v.push(icmp_port_unreachable(*client.ip(), *frontend.ip(), q).build());
        }
    }
    // Not lb's: pod to pod, ICMP echo, other protocols.
    v.push(tcp(sa("10.244.9.9:1234"), other, TCP_SYN).build());
    v.push(udp(sa("10.244.9.9:1234"), other).build());
    v.push(icmp_echo(Ipv4Addr::new(10, 244, 9, 9), Ipv4Addr::new(10, 244, 7, 7)).build());
    v.push(
        icmp_port_unreachable(
            Ipv4Addr::new(10, 244, 7, 7),
            Ipv4Addr::new(10, 244, 9, 9),
            &udp(sa("10.244.9.9:1234"), other).build()[off::IP..off::L4 + 8],
        )
        .build(),
    );
    // Fragments: of a service datagram and of another (first and later).
    for (s, d) in [(sa(CLIENT), sa(VIP_UDP)), (sa("10.244.9.9:1234"), other)] {
        let mut f = udp(s, d).with_payload(&[1; 1800]);
        f.frag = 0;
        v.extend(fragments(&f.build(), 800));
    }
    // IP options, VLAN, IPv6, ARP.
    let mut o = tcp(sa(CLIENT), sa(VIP_TCP), TCP_SYN);
    o.options = vec![1, 1, 1, 0];
    v.push(o.build());
    v.push(vlan_tagged(
        &tcp(sa(CLIENT), sa(VIP_TCP), TCP_SYN).build(),
        7,
    ));
    v.push(ipv6_udp());
    v.push(arp_request(Ipv4Addr::new(10, 244, 9, 9), NODE));
    v
}

/// A mutation of a seed frame.
#[derive(Clone, Debug)]
enum Mutation {
    /// Set the byte at (offset mod length) to a value.
    Byte(usize, u8),
    /// Cut the frame to (length mod its length) + 1 bytes.
    Truncate(usize),
    /// Append bytes.
    Append(Vec<u8>),
    /// IPv4 header fields: IHL nibble, total length, fragment word, protocol.
    Ihl(u8),
    TotLen(u16),
    Frag(u16),
    Proto(u8),
    /// Wrap in an 802.1Q tag.
    Vlan,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(o, b)| Mutation::Byte(o, b)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Append),
        1 => (0u8..16).prop_map(Mutation::Ihl),
        1 => any::<u16>().prop_map(Mutation::TotLen),
        1 => prop_oneof![Just(0x2000u16), Just(0x0001), Just(0x4000), any::<u16>()].prop_map(Mutation::Frag),
        1 => prop_oneof![Just(1u8), Just(6), Just(17), any::<u8>()].prop_map(Mutation::Proto),
        1 => Just(Mutation::Vlan),
    ]
}

fn apply(mut f: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let ip = off::IP;
    match m {
        Mutation::Byte(o, b) => {
            let i = o % f.len();
            f[i] = *b;
        }
        Mutation::Truncate(n) => {
            let len = n % f.len() + 1;
            f.truncate(len);
        }
        Mutation::Append(b) => f.extend_from_slice(b),
        Mutation::Ihl(n) if f.len() > ip => f[ip] = (f[ip] & 0xf0) | n,
        Mutation::TotLen(n) if f.len() > ip + 3 => {
            f[ip + 2..ip + 4].copy_from_slice(&n.to_be_bytes())
        }
        Mutation::Frag(n) if f.len() > ip + 7 => {
            f[ip + 6..ip + 8].copy_from_slice(&n.to_be_bytes())
        }
        Mutation::Proto(p) if f.len() > ip + 9 => f[ip + 9] = *p,
        Mutation::Vlan if f.len() >= 14 => f = vlan_tagged(&f, 9),
        _ => {}
    }
    f
}

/// A frame: random bytes, or a seed with up to four mutations (some
/// followed by a repair of the IPv4 header checksum, so that malformed
/// frames with right checksums are fuzzed too).
fn frame(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 14..120),
        8 => (0..n, prop::collection::vec(mutation(), 0..4), any::<bool>()).prop_map(
            move |(i, ms, fix)| {
                let mut f = seeds[i].clone();
                for m in &ms {
                    f = apply(f, m);
                }
                if fix && f.len() >= off::L4 && f[12..14] == [8, 0] && f[off::IP] == 0x45 {
                    f[off::IP_CSUM..off::IP_CSUM + 2].copy_from_slice(&[0, 0]);
                    let c = internet_checksum(&f[off::IP..off::L4]);
                    f[off::IP_CSUM..off::IP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
                }
                f
            }
        ),
    ]
}

fn outcomes(s: &[u64; STAT_COUNT as usize]) -> u64 {
    StatReason::ALL
        .iter()
        .filter(|r| r.is_outcome())
        .map(|r| s[*r as usize])
        .sum()
}

/// Runs `cases` generated frames through every program; returns (frames
/// run, frames the kernel refused to run).
fn fuzz(cases: u32, seed: u64) -> (u64, u64) {
    let (mut dp, up0, vpod0) = world();
    let seeds = seeds(&mut dp);
    let addrs = lb_addresses();
    let progs = [
        (program_names::POD_INGRESS, vpod0),
        (program_names::POD_EGRESS, vpod0),
        (program_names::UPLINK_INGRESS, up0),
        (program_names::UPLINK_EGRESS, up0),
    ];
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let ran = std::cell::Cell::new(0u64);
    let refused = std::cell::Cell::new(0u64);
    let result = runner.run(&frame(seeds), |f| {
        let unrelated = !mentions_lb(&f, &addrs);
        let checksums_ok = verify_checksums(&f).is_ok();
        for (prog, ifindex) in progs {
            let before = dp.stats();
            let r = match dp.try_run_on(prog, &f, Some(ifindex)) {
                Ok(r) => r,
                Err(_) => {
                    // Shorter than an Ethernet header, or an IPv4
                    // EtherType without a whole IPv4 header.
                    refused.set(refused.get() + 1);
                    continue;
                }
            };
            ran.set(ran.get() + 1);
            let after = dp.stats();
            let what = format!("{prog}: {}", hex(&f));
            prop_assert!(
                [TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&r.ret),
                "unexpected verdict {} {what}",
                r.ret
            );
            prop_assert_eq!(
                after[StatReason::Packets as usize] - before[StatReason::Packets as usize],
                1,
                "{}",
                what
            );
            prop_assert_eq!(
                outcomes(&after) - outcomes(&before),
                1,
                "not exactly one outcome counted: {}",
                what
            );
            let dropped_orphan = after[StatReason::DropFragmentNoFirst as usize]
                > before[StatReason::DropFragmentNoFirst as usize];
            if unrelated {
                if r.ret == TC_ACT_SHOT {
                    prop_assert!(dropped_orphan, "dropped a frame that is not lb's: {what}");
                } else {
                    prop_assert_eq!(r.ret, TC_ACT_UNSPEC, "{}", what);
                    prop_assert!(
                        r.out == f,
                        "rewrote a frame that is not lb's: {what}\n  out: {}",
                        hex(&r.out)
                    );
                }
            }
            if checksums_ok && r.ret != TC_ACT_SHOT && r.out != f {
                if let Err(e) = verify_checksums(&r.out) {
                    return Err(TestCaseError::fail(format!(
                        "bad checksums after a rewrite ({e}): {what}\n  out: {}",
                        hex(&r.out)
                    )));
                }
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    dp.assert_outcomes_sum();
    // What the frames reached: the fuzzer must get past the parser into
    // every kind of translation, not only bounce off it.
    let stats = dp.stats();
    let seen: Vec<String> = StatReason::ALL
        .iter()
        .filter(|r| stats[**r as usize] != 0)
        .map(|r| format!("{}={}", r.name(), stats[*r as usize]))
        .collect();
    println!("fuzz: counters {}", seen.join(" "));
    if cases >= 1_000 {
        for r in [
            StatReason::PassNotService,
            StatReason::PassTruncated,
            StatReason::PassNotIpv4,
            StatReason::PassIpOptions,
            StatReason::PassOtherProto,
            StatReason::PassTranslated,
            StatReason::ForwardTranslated,
            StatReason::ReplyTranslated,
            StatReason::Redirected,
            StatReason::IcmpErrorTranslated,
            StatReason::FragmentTranslated,
            StatReason::DropFragmentNoFirst,
            StatReason::RejectNoEndpoint,
        ] {
            assert!(
                stats[r as usize] > 0,
                "the fuzzer never reached {}",
                r.name()
            );
        }
    }
    (ran.get(), refused.get())
}

#[test]
fn fuzz_frames_through_every_program() {
    require_privileges!();
    let cases: u32 = std::env::var("LB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6c62_6675_7a7a);
    in_private_netns(move || {
        let (ran, refused) = fuzz(cases, seed);
        println!(
            "fuzz: {cases} frames (seed {seed}) through 4 programs: {ran} runs checked, {refused} refused by BPF_PROG_TEST_RUN"
        );
        assert!(ran > u64::from(cases), "too few runs: {ran}");
    });
}

/// The fuzzer's own oracle: the address scan sees lb's addresses in any
/// position, and is not fooled by others.
#[test]
fn address_scan_finds_lb_addresses_anywhere() {
    let addrs = lb_addresses();
    let f = tcp(sa("10.244.9.9:1"), sa("10.244.7.7:2"), TCP_SYN).build();
    assert!(!mentions_lb(&f, &addrs));
    let mut g = f.clone();
    g.push(0);
    g.extend_from_slice(&NODE.octets());
    assert!(mentions_lb(&g, &addrs));
}
