//! The kernel datapath under BPF_PROG_TEST_RUN: real Ethernet/IPv4/TCP/UDP
//! frames go through the four TC programs of the built object
//! (`lb_tests::artifacts::ebpf_object()`), and every test asserts the verdict,
//! the output bytes (checksums recomputed independently), the conntrack
//! entries and the exact counters.
//!
//! Each test runs on a thread of its own in a fresh network namespace
//! ([`in_private_netns`]), so the FIB lookups of redirected packets see a
//! known, empty (or test-made) routing table and nothing touches the
//! machine's network. The object is loaded and its maps filled through
//! [`Datapath`], as the agent would fill them.
//!
//! Run: `cargo test -p lb-tests --test datapath -- --test-threads=1` (root).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use aya::maps::{Map, MapType};
use lb_common::{
    backend_flags, ct_flags, ipv4_to_net, map_names, program_names, service_flags, AffinityKey,
    AffinityValue, ConntrackEntry, ConntrackKey, CtState, DatapathConfig, ServiceValue, StatReason,
    CT_DIR_FORWARD, CT_DIR_REPLY, MAX_AFFINITY, MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_CONNTRACK,
    MAX_NODE_ADDRS, MAX_SERVICES, PROTO_TCP, PROTO_UDP, STAT_COUNT,
};
use lb_tests::datapath::{exact_key, BackendEntry, Datapath, ServiceEntry};
use lb_tests::netns::in_private_netns;
use lb_tests::packet::{self, *};
use lb_tests::require_privileges;

use lb_tests::datapath::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};

const POD_INGRESS: &str = program_names::POD_INGRESS;
const POD_EGRESS: &str = program_names::POD_EGRESS;
const UPLINK_INGRESS: &str = program_names::UPLINK_INGRESS;
const UPLINK_EGRESS: &str = program_names::UPLINK_EGRESS;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn net(a: Ipv4Addr) -> u32 {
    ipv4_to_net(a.octets())
}

fn nport(p: u16) -> u16 {
    p.to_be()
}

/// CLOCK_BOOTTIME in ns, the clock of bpf_ktime_get_boot_ns.
fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs a command in the calling thread's network namespace; panics on failure.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: c is a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

fn mac_of(name: &str) -> [u8; 6] {
    // Read through the thread's own netns (/sys shows the mounter's).
    let out = Command::new("ip")
        .args(["-o", "link", "show", name])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    let mac = s
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {s}"));
    let v: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn be(id: u32, addr: &str) -> BackendEntry {
    BackendEntry::new(id, sa(addr))
}

fn local_be(id: u32, addr: &str) -> BackendEntry {
    BackendEntry::local(id, sa(addr))
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, dir: u8) -> ConntrackKey {
    ConntrackKey {
        saddr: net(*src.ip()),
        daddr: net(*dst.ip()),
        sport: nport(src.port()),
        dport: nport(dst.port()),
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// A conntrack entry as the datapath writes it; `last_seen_ns` is checked
/// separately (see `assert_entry`).
struct Ct {
    nat: SocketAddrV4,
    snat: Option<SocketAddrV4>,
    backend_id: u32,
    service_id: u32,
    flags: u16,
}

/// Asserts an entry's fields, and that last_seen_ns lies in [after, now].
fn assert_entry(e: &ConntrackEntry, want: &Ct, after: u64) {
    let snat = want
        .snat
        .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let expected = ConntrackEntry {
        nat_addr: net(*want.nat.ip()),
        snat_addr: net(*snat.ip()),
        nat_port: nport(want.nat.port()),
        snat_port: nport(snat.port()),
        backend_id: want.backend_id,
        service_id: want.service_id,
        flags: want.flags,
        // When it was created: checked by the tests of UDP streams.
        created_s: e.created_s,
        last_seen_ns: e.last_seen_ns,
    };
    assert_eq!(*e, expected);
    let now = boot_ns();
    assert!(
        e.last_seen_ns >= after && e.last_seen_ns <= now,
        "last_seen_ns {} not in [{after}, {now}]",
        e.last_seen_ns
    );
}

fn backend_of(
    dp: &mut Datapath,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    proto: u8,
) -> SocketAddrV4 {
    let e = dp
        .ct(&ct_key(client, frontend, proto, CT_DIR_FORWARD))
        .expect("forward entry");
    SocketAddrV4::new(
        Ipv4Addr::from(e.nat_addr.to_ne_bytes()),
        u16::from_be(e.nat_port),
    )
}

// Addresses used throughout: pods in 10.244.0.0/16, ClusterIPs in
// 10.96.0.0/12, this node 192.0.2.1, an external client 198.51.100.7.
const CLIENT: &str = "10.244.0.5:40000";
const VIP: &str = "10.96.0.10:80";
const BACKEND_1: &str = "10.244.1.11:8080";
const BACKEND_2: &str = "10.244.2.12:8080";
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const EXTERNAL: &str = "198.51.100.7:51000";

fn web(dp: &mut Datapath) -> ServiceEntry {
    let s = ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, vec![be(11, BACKEND_1)]);
    dp.add_service(&s);
    s
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

#[test]
fn object_has_every_map_and_program() {
    require_privileges!();
    in_private_netns(|| {
        let dp = Datapath::load();
        for name in map_names::ALL {
            assert!(dp.ebpf.map(name).is_some(), "map {name} missing");
        }
        // The agent-only map is created although no program uses it.
        assert!(dp.ebpf.map(map_names::SERVICE_NAMES).is_some());
        // Types, key/value sizes (the lb-common layouts) and capacities as
        // the kernel reports them.
        let no_prealloc = 1; // BPF_F_NO_PREALLOC
        let want = [
            (
                map_names::SERVICES,
                MapType::Hash,
                8,
                16,
                MAX_SERVICES,
                no_prealloc,
            ),
            (
                map_names::BACKEND_SLOTS,
                MapType::Hash,
                8,
                4,
                MAX_BACKEND_SLOTS,
                no_prealloc,
            ),
            (
                map_names::BACKENDS,
                MapType::Hash,
                4,
                std::mem::size_of::<lb_common::BackendValue>() as u32,
                MAX_BACKENDS,
                no_prealloc,
            ),
            (
                map_names::CONNTRACK,
                MapType::LruHash,
                16,
                32,
                MAX_CONNTRACK,
                0,
            ),
            (
                map_names::AFFINITY,
                MapType::LruHash,
                8,
                16,
                MAX_AFFINITY,
                0,
            ),
            (
                map_names::NODE_ADDRS,
                MapType::Hash,
                4,
                4,
                MAX_NODE_ADDRS,
                0,
            ),
            (map_names::STATS, MapType::PerCpuArray, 4, 8, STAT_COUNT, 0),
            (
                map_names::SERVICE_NAMES,
                MapType::Hash,
                4,
                std::mem::size_of::<lb_common::ServicePortNameValue>() as u32,
                MAX_SERVICES,
                no_prealloc,
            ),
            (
                map_names::SOURCE_RANGES,
                MapType::LpmTrie,
                4 + std::mem::size_of::<lb_common::SourceRangeKey>() as u32,
                1,
                lb_common::MAX_SOURCE_RANGES,
                no_prealloc,
            ),
            (
                map_names::SOCK_REVNAT,
                MapType::LruHash,
                std::mem::size_of::<lb_common::SockRevNatKey>() as u32,
                std::mem::size_of::<lb_common::SockRevNatValue>() as u32,
                lb_common::MAX_SOCK_REVNAT,
                0,
            ),
            (
                map_names::FRAGMENTS,
                MapType::LruHash,
                std::mem::size_of::<lb_common::FragKey>() as u32,
                std::mem::size_of::<lb_common::FragValue>() as u32,
                lb_common::MAX_FRAGMENTS,
                0,
            ),
            (map_names::LAYOUT, MapType::Array, 4, 4, 1, 0),
            (
                map_names::SETTINGS,
                MapType::Array,
                4,
                std::mem::size_of::<lb_common::DatapathConfig>() as u32,
                1,
                0,
            ),
        ];
        for (name, ty, key, value, max, flags) in want {
            let info = match dp.ebpf.map(name).unwrap() {
                Map::HashMap(d)
                | Map::LruHashMap(d)
                | Map::PerCpuArray(d)
                | Map::LpmTrie(d)
                | Map::Array(d) => d.info().unwrap(),
                other => panic!("{name}: unexpected map kind {other:?}"),
            };
            assert_eq!(info.map_type().unwrap(), ty, "{name}");
            assert_eq!(
                (
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                    info.map_flags()
                ),
                (key, value, max, flags),
                "{name}: key size, value size, max entries, flags"
            );
        }
        for name in program_names::ALL {
            assert!(dp.ebpf.program(name).is_some(), "program {name} missing");
        }
        dp.assert_stats(&[]);
    });
}

// ---------------------------------------------------------------------------
// New flows to ClusterIPs (F1)
// ---------------------------------------------------------------------------

#[test]
fn f1_cluster_ip_tcp_syn_is_dnated_with_conntrack_both_ways() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN);
        let t0 = boot_ns();
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        // Only the destination changes; the client's source is kept (F1).
        assert_frame_eq(&r.out, &syn.clone().with_destination(sa(BACKEND_1)).build());

        let fwd = dp
            .ct(&ct_key(sa(CLIENT), sa(VIP), PROTO_TCP, CT_DIR_FORWARD))
            .expect("forward entry");
        assert_entry(
            &fwd,
            &Ct {
                nat: sa(BACKEND_1),
                snat: None,
                backend_id: 11,
                service_id: 1,
                flags: ct_flags::TCP_SYN,
            },
            t0,
        );
        let rev = dp
            .ct(&ct_key(sa(BACKEND_1), sa(CLIENT), PROTO_TCP, CT_DIR_REPLY))
            .expect("reply entry");
        assert_entry(
            &rev,
            &Ct {
                nat: sa(VIP),
                snat: None,
                backend_id: 11,
                service_id: 1,
                flags: ct_flags::TCP_SYN,
            },
            t0,
        );
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
            (StatReason::PassTranslated, 1),
        ]);
    });
}

#[test]
fn f1_cluster_ip_udp_is_dnated_with_conntrack_both_ways() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = "10.96.0.10:53";
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            sa(dns),
            PROTO_UDP,
            vec![be(70, "10.244.3.3:5353")],
        ));
        let q = udp(sa(CLIENT), sa(dns));
        let t0 = boot_ns();
        let r = dp.run(POD_INGRESS, &q.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        let out = r.out;
        assert_frame_eq(
            &out,
            &q.clone().with_destination(sa("10.244.3.3:5353")).build(),
        );
        assert_ne!(&out[off::UDP_CSUM..off::UDP_CSUM + 2], &[0, 0]);

        let want = |nat: &str| Ct {
            nat: sa(nat),
            snat: None,
            backend_id: 70,
            service_id: 7,
            flags: 0,
        };
        let fwd = dp
            .ct(&ct_key(sa(CLIENT), sa(dns), PROTO_UDP, CT_DIR_FORWARD))
            .unwrap();
        assert_entry(&fwd, &want("10.244.3.3:5353"), t0);
        let rev = dp
            .ct(&ct_key(
                sa("10.244.3.3:5353"),
                sa(CLIENT),
                PROTO_UDP,
                CT_DIR_REPLY,
            ))
            .unwrap();
        assert_entry(&rev, &want(dns), t0);

        // The answer through the client's pod egress comes from the ClusterIP.
        let answer = udp(sa("10.244.3.3:5353"), sa(CLIENT));
        let r = dp.run(POD_EGRESS, &answer.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &answer.with_source(sa(dns)).build());
        let rev = dp
            .ct(&ct_key(
                sa("10.244.3.3:5353"),
                sa(CLIENT),
                PROTO_UDP,
                CT_DIR_REPLY,
            ))
            .unwrap();
        assert_eq!(rev.flags, ct_flags::SEEN_REPLY);
        let fwd = dp
            .ct(&ct_key(sa(CLIENT), sa(dns), PROTO_UDP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!(fwd.flags, ct_flags::SEEN_REPLY);
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::PassTranslated, 2),
        ]);
    });
}

#[test]
fn udp_zero_checksum_stays_zero_both_ways() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = "10.96.0.10:53";
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            sa(dns),
            PROTO_UDP,
            vec![be(70, "10.244.3.3:5353")],
        ));
        let q = udp_no_checksum(sa(CLIENT), sa(dns));
        let r = dp.run(POD_INGRESS, &q.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_eq!(&r.out[off::UDP_CSUM..off::UDP_CSUM + 2], &[0, 0]);
        assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());

        let a = udp_no_checksum(sa("10.244.3.3:5353"), sa(CLIENT));
        let r = dp.run(POD_EGRESS, &a.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_eq!(&r.out[off::UDP_CSUM..off::UDP_CSUM + 2], &[0, 0]);
        assert_frame_eq(&r.out, &a.with_source(sa(dns)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::PassTranslated, 2),
        ]);
    });
}

#[test]
fn udp_checksum_is_right_for_many_tuples() {
    // Incremental updates must give the same result as a full computation
    // for any address/port combination, including results of 0 (-> 0xffff).
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = "10.96.0.10:53";
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            sa(dns),
            PROTO_UDP,
            vec![be(70, "10.244.3.3:5353")],
        ));
        for port in 1024..1024 + 300u16 {
            let q = udp(
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), port),
                sa(dns),
            );
            let r = dp.run(POD_INGRESS, &q.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());
        }
        dp.assert_stats(&[
            (StatReason::Packets, 300),
            (StatReason::NewFlow, 300),
            (StatReason::PassTranslated, 300),
        ]);
    });
}

#[test]
fn udp_checksum_that_computes_to_zero_is_sent_as_ffff() {
    // After DNAT, a UDP checksum whose computation gives 0 must be written
    // as 0xffff (0 would mean "no checksum"): BPF_F_MARK_MANGLED_0.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = "10.96.0.10:53";
        let backend = sa("10.244.3.3:5353");
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            sa(dns),
            PROTO_UDP,
            vec![be(70, "10.244.3.3:5353")],
        ));
        // Pick the payload's last word so that the translated datagram's
        // checksum computes to 0.
        let with_word = |w: u16| {
            let mut f = udp(sa(CLIENT), sa(dns));
            if let packet::L4::Udp { payload, .. } = &mut f.l4 {
                let n = payload.len();
                payload[n - 2..].copy_from_slice(&w.to_be_bytes());
            }
            f
        };
        let w = (0..=u16::MAX)
            .find(|w| {
                let out = with_word(*w).with_destination(backend).build();
                let mut l4 = out[off::L4..].to_vec();
                l4[6] = 0;
                l4[7] = 0;
                let src = out[off::IP_SRC..off::IP_SRC + 4].try_into().unwrap();
                let dst = out[off::IP_DST..off::IP_DST + 4].try_into().unwrap();
                l4_checksum(src, dst, PROTO_UDP, &l4) == 0
            })
            .expect("some payload word makes the checksum 0");
        let q = with_word(w);
        let want = q.clone().with_destination(backend).build();
        assert_eq!(&want[off::UDP_CSUM..off::UDP_CSUM + 2], &[0xff, 0xff]);
        let input = q.build();
        assert_ne!(&input[off::UDP_CSUM..off::UDP_CSUM + 2], &[0xff, 0xff]);
        let r = dp.run(POD_INGRESS, &input);
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_eq!(r.out, want, "\n{}\n{}", hex(&r.out), hex(&want));
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
            (StatReason::PassTranslated, 1),
        ]);
    });
}

// ---------------------------------------------------------------------------
// Not for a service: bit-for-bit unchanged
// ---------------------------------------------------------------------------

#[test]
fn not_a_service_passes_unchanged() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let frames = [
            // Another address.
            tcp(sa(CLIENT), sa("10.96.0.11:80"), TCP_SYN).build(),
            // The ClusterIP, another port.
            tcp(sa(CLIENT), sa("10.96.0.10:81"), TCP_SYN).build(),
            // The ClusterIP and port, other protocol (F9).
            udp(sa(CLIENT), sa(VIP)).build(),
            // Plain pod-to-pod traffic.
            tcp(sa(CLIENT), sa(BACKEND_1), TCP_ACK | TCP_PSH).build(),
        ];
        let mut n = 0;
        for prog in program_names::ALL {
            for f in &frames {
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_UNSPEC, "{prog}");
                assert_eq!(r.out, *f, "{prog} changed a non-service packet");
                n += 1;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassNotService, n)]);
    });
}

#[test]
fn non_ipv4_passes_unchanged() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let frames = [
            arp_request(Ipv4Addr::new(10, 244, 0, 5), Ipv4Addr::new(10, 96, 0, 10)),
            ipv6_udp(),
            // A VLAN-tagged frame that would otherwise hit the service.
            vlan_tagged(&tcp(sa(CLIENT), sa(VIP), TCP_SYN).build(), 100),
        ];
        let mut n = 0;
        for prog in program_names::ALL {
            for f in &frames {
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_UNSPEC);
                assert_eq!(r.out, *f, "{prog} changed {}", hex(f));
                n += 1;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassNotIpv4, n)]);
    });
}

#[test]
fn truncated_packets_pass_unchanged() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let dns = "10.96.0.10:53";
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            sa(dns),
            PROTO_UDP,
            vec![be(70, "10.244.3.3:5353")],
        ));
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_ACK).build();
        let q = udp(sa(CLIENT), sa(dns)).build();

        let mut frames: Vec<Vec<u8>> = Vec::new();
        // Cut at the end of the IPv4 header, inside the TCP header, and one
        // byte short of the whole packet (IPv4 total length says more).
        // (BPF_PROG_TEST_RUN refuses IPv4 frames without a whole IPv4
        // header with EINVAL, so shorter cuts cannot be run here; the parser
        // checks them all the same.)
        for len in [ETH_HLEN + 20, off::L4 + 10, off::L4 + 19, syn.len() - 1] {
            frames.push(syn[..len].to_vec());
        }
        for len in [off::L4 + 4, off::L4 + 7, q.len() - 1] {
            frames.push(q[..len].to_vec());
        }
        // Total length smaller than the headers.
        let mut f = syn.clone();
        f[off::IP + 2..off::IP + 4].copy_from_slice(&30u16.to_be_bytes());
        frames.push(f);
        // TCP data offset beyond the packet.
        let mut f = syn.clone();
        f[off::L4 + 12] = 15 << 4;
        frames.push(f);
        // TCP data offset below the minimum.
        let mut f = syn.clone();
        f[off::L4 + 12] = 4 << 4;
        frames.push(f);
        // UDP length beyond the packet, and below the header.
        for l in [200u16, 7] {
            let mut f = q.clone();
            f[off::L4 + 4..off::L4 + 6].copy_from_slice(&l.to_be_bytes());
            frames.push(f);
        }

        let mut n = 0;
        for prog in program_names::ALL {
            for f in &frames {
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_UNSPEC);
                assert_eq!(r.out, *f, "{prog} changed truncated {}", hex(f));
                n += 1;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassTruncated, n)]);
    });
}

#[test]
fn c4_fragments_of_other_traffic_pass_unchanged_and_orphans_are_dropped() {
    // Every first fragment is recorded, so the later fragments of ordinary
    // traffic pass unchanged; a later fragment whose first fragment was
    // never seen is dropped (it could be a service datagram's, which must
    // never leak untranslated).
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let mut frames = 0;
        for (n, prog) in program_names::ALL.into_iter().enumerate() {
            for (i, proto) in [PROTO_TCP, PROTO_UDP, packet::PROTO_ICMP]
                .into_iter()
                .enumerate()
            {
                let mut f = match proto {
                    PROTO_TCP => tcp(sa(CLIENT), sa("10.244.7.7:9000"), TCP_ACK),
                    PROTO_UDP => udp(sa(CLIENT), sa("10.244.7.7:9000")),
                    _ => icmp_echo(*sa(CLIENT).ip(), Ipv4Addr::new(10, 244, 7, 7)),
                }
                .with_payload(&[3; 2000]);
                if let packet::L4::IcmpEcho { payload, .. } = &mut f.l4 {
                    *payload = vec![3; 2000];
                }
                f.frag = 0;
                f.id = 0x100 + n as u16 * 3 + i as u16;
                for g in fragments(&f.build(), 800) {
                    let r = dp.run(prog, &g);
                    assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &g), "{prog}");
                    frames += 1;
                }
            }
        }
        // 3 fragments each: first ones are not service traffic (or not
        // TCP/UDP), later ones pass as fragments.
        assert_eq!(frames, 4 * 3 * 3);
        // A later fragment alone.
        let mut f = udp(sa(CLIENT), sa("10.96.0.10:53")).with_payload(&[3; 2000]);
        f.frag = 0;
        f.id = 0x7777;
        let orphan = fragments(&f.build(), 800)[1].clone();
        for prog in program_names::ALL {
            let r = dp.run(prog, &orphan);
            assert_eq!(r.ret, TC_ACT_SHOT, "{prog}");
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[
            (StatReason::Packets, 36 + 4),
            (StatReason::PassNotService, 8),
            (StatReason::PassOtherProto, 4),
            (StatReason::PassFragment, 24),
            (StatReason::DropFragmentNoFirst, 4),
        ]);
    });
}

#[test]
fn c4_a_service_datagrams_fragments_are_translated_both_ways() {
    // A big UDP query to a ClusterIP and a big answer, fragmented: every
    // fragment of the query gets the backend's address (the first one the
    // port too, and its UDP checksum covers the whole datagram), every
    // fragment of the answer the ClusterIP's; reassembled, each is exactly
    // the datagram translated whole.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = sa("10.96.0.10:53");
        let backend = sa("10.244.3.3:5353");
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            dns,
            PROTO_UDP,
            vec![be(70, "10.244.3.3:5353")],
        ));
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        let mut q = udp(sa(CLIENT), dns).with_payload(&payload);
        q.frag = 0;
        let frags = fragments(&q.build(), 1480);
        assert_eq!(frags.len(), 3);
        let mut out = Vec::new();
        for g in &frags {
            let r = dp.run(POD_INGRESS, g);
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_checksums(&r.out);
            out.push(r.out);
        }
        assert_frame_eq(
            &reassemble(&out),
            &q.clone().with_destination(backend).build(),
        );
        let mut a = udp(backend, sa(CLIENT)).with_payload(&payload);
        a.frag = 0;
        a.id = 0x4321;
        let mut out = Vec::new();
        for g in fragments(&a.build(), 1480) {
            let r = dp.run(POD_EGRESS, &g);
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_checksums(&r.out);
            out.push(r.out);
        }
        assert_frame_eq(&reassemble(&out), &a.clone().with_source(dns).build());
        // The entries: one per datagram and hook direction.
        dp.assert_stats(&[
            (StatReason::Packets, 6),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::FragmentTranslated, 4),
            (StatReason::PassTranslated, 6),
        ]);
    });
}

#[test]
fn c4_fragments_of_a_snat_flow_are_redirected_like_their_first() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, up0_mac) = uplink_netns(true);
        let mut dp = Datapath::load();
        dp.add_node_addr(NODE);
        let mut s = ServiceEntry::cluster_ip(6, sa(VIP), PROTO_UDP, vec![be(61, BACKEND_2)]);
        s.node_port = Some(30053);
        dp.add_service(&s);
        let fe = SocketAddrV4::new(NODE, 30053);
        let mut q = udp(sa(EXTERNAL), fe).with_payload(&[9; 3000]);
        q.frag = 0;
        let mut out = Vec::new();
        for g in fragments(&q.build(), 1480) {
            let r = dp.run_on(UPLINK_INGRESS, &g, up0);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            assert_eq!(&r.out[..12], &[[2, 0, 0, 0, 2, 2], up0_mac].concat()[..]);
            assert_eq!(r.out[off::IP_TTL], 63);
            out.push(r.out);
        }
        let fwd = dp
            .ct(&ct_key(sa(EXTERNAL), fe, PROTO_UDP, CT_DIR_FORWARD))
            .unwrap();
        let snat = SocketAddrV4::new(NODE, u16::from_be(fwd.snat_port));
        let want = q
            .clone()
            .with_source(snat)
            .with_destination(sa(BACKEND_2))
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 2], up0_mac);
        assert_frame_eq(&reassemble(&out), &want.build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::FragmentTranslated, 2),
            (StatReason::Redirected, 3),
        ]);
    });
}

#[test]
fn c4_the_rest_of_a_dropped_or_rejected_datagram_is_dropped() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        // No endpoint at all: the first fragment is rejected (E1).
        dp.add_frontend(
            exact_key(sa("10.96.0.10:53"), PROTO_UDP),
            ServiceValue {
                service_id: 9,
                flags: service_flags::CLUSTER_IP,
                ..ServiceValue::default()
            },
        );
        let mut q = udp(sa(CLIENT), sa("10.96.0.10:53")).with_payload(&[1; 3000]);
        q.frag = 0;
        let frags = fragments(&q.build(), 1480);
        let r = dp.run(POD_INGRESS, &frags[0]);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        for g in &frags[1..] {
            let r = dp.run(POD_INGRESS, g);
            assert_eq!(r.ret, TC_ACT_SHOT);
        }
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::RejectNoEndpoint, 1),
            (StatReason::DropFragmentNoFirst, 2),
        ]);
    });
}

#[test]
fn ip_options_pass_unchanged() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let mut frames = Vec::new();
        for opts in [vec![1u8, 1, 1, 0], vec![0x94, 4, 0, 0, 1, 1, 1, 0]] {
            // NOPs + end of list; Router Alert.
            let mut t = tcp(sa(CLIENT), sa(VIP), TCP_SYN);
            t.options = opts;
            frames.push(t.build());
        }
        let mut n = 0;
        for prog in program_names::ALL {
            for f in &frames {
                assert_checksums(f);
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_UNSPEC);
                assert_eq!(r.out, *f, "{prog} changed {}", hex(f));
                n += 1;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassIpOptions, n)]);
    });
}

#[test]
fn icmp_and_other_protocols_pass_unchanged() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let mut sctp = icmp_echo(Ipv4Addr::new(10, 244, 0, 5), Ipv4Addr::new(10, 96, 0, 10));
        sctp.l4 = packet::L4::Raw {
            proto: 132,
            bytes: vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0],
        };
        let frames = [
            icmp_echo(Ipv4Addr::new(10, 244, 0, 5), Ipv4Addr::new(10, 96, 0, 10)).build(),
            sctp.build(),
        ];
        let mut n = 0;
        for prog in program_names::ALL {
            for f in &frames {
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_UNSPEC);
                assert_eq!(r.out, *f);
                n += 1;
            }
        }
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassOtherProto, n)]);
    });
}

// ---------------------------------------------------------------------------
// Known flows
// ---------------------------------------------------------------------------

#[test]
fn reply_through_pod_egress_gets_the_frontend_source() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let r = dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);

        let syn_ack = tcp(sa(BACKEND_1), sa(CLIENT), TCP_SYN | TCP_ACK);
        let t0 = boot_ns();
        let r = dp.run(POD_EGRESS, &syn_ack.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn_ack.clone().with_source(sa(VIP)).build());

        // Both entries learn that the backend answered.
        let rev = dp
            .ct(&ct_key(sa(BACKEND_1), sa(CLIENT), PROTO_TCP, CT_DIR_REPLY))
            .unwrap();
        assert_entry(
            &rev,
            &Ct {
                nat: sa(VIP),
                snat: None,
                backend_id: 11,
                service_id: 1,
                flags: ct_flags::TCP_SYN | ct_flags::SEEN_REPLY,
            },
            t0,
        );
        let fwd = dp
            .ct(&ct_key(sa(CLIENT), sa(VIP), PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!(fwd.flags, ct_flags::TCP_SYN | ct_flags::SEEN_REPLY);

        // The reply as it leaves through the uplink egress (client elsewhere)
        // is translated the same way.
        let data = tcp(sa(BACKEND_1), sa(CLIENT), TCP_ACK | TCP_PSH);
        let r = dp.run(UPLINK_EGRESS, &data.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &data.with_source(sa(VIP)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 2),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

#[test]
fn established_flow_keeps_its_backend_and_tracks_tcp_state() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let backends: Vec<BackendEntry> = (0..8)
            .map(|i| be(100 + i, &format!("10.244.{}.{}:8080", 1 + i, 10 + i)))
            .collect();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, backends));
        let fkey = ct_key(sa(CLIENT), sa(VIP), PROTO_TCP, CT_DIR_FORWARD);

        let r = dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        let chosen = backend_of(&mut dp, sa(CLIENT), sa(VIP), PROTO_TCP);
        assert_eq!(tuple(&r.out).dst, chosen);
        let rkey = ct_key(chosen, sa(CLIENT), PROTO_TCP, CT_DIR_REPLY);

        // SYN-ACK back, then the handshake's ACK: established.
        let r = dp.run(
            POD_EGRESS,
            &tcp(chosen, sa(CLIENT), TCP_SYN | TCP_ACK).build(),
        );
        assert_eq!(tuple(&r.out).src, sa(VIP));
        let ack = tcp(sa(CLIENT), sa(VIP), TCP_ACK);
        let r = dp.run(POD_INGRESS, &ack.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &ack.clone().with_destination(chosen).build());
        let est = ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        assert_eq!(dp.ct(&fkey).unwrap().flags, est);
        assert_eq!(dp.ct(&rkey).unwrap().flags, est);

        // Every later packet goes to the same backend.
        for _ in 0..50 {
            let data = tcp(sa(CLIENT), sa(VIP), TCP_ACK | TCP_PSH);
            let r = dp.run(POD_INGRESS, &data.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(&r.out, &data.with_destination(chosen).build());
        }
        // FIN from the client, RST from the backend: both entries see both.
        dp.run(
            POD_INGRESS,
            &tcp(sa(CLIENT), sa(VIP), TCP_FIN | TCP_ACK).build(),
        );
        let closing = est | ct_flags::TCP_FIN | ct_flags::FIN_FORWARD;
        assert_eq!(dp.ct(&fkey).unwrap().flags, closing);
        assert_eq!(dp.ct(&rkey).unwrap().flags, closing);
        let r = dp.run(POD_EGRESS, &tcp(chosen, sa(CLIENT), TCP_RST).build());
        assert_eq!(tuple(&r.out).src, sa(VIP));
        assert_eq!(dp.ct(&fkey).unwrap().flags, closing | ct_flags::TCP_RST);
        assert_eq!(dp.ct(&rkey).unwrap().flags, closing | ct_flags::TCP_RST);
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 55),
            (StatReason::NewFlow, 1),
            (StatReason::ForwardTranslated, 52),
            (StatReason::ReplyTranslated, 2),
            (StatReason::PassTranslated, 55),
        ]);
    });
}

#[test]
fn expired_conntrack_entry_is_a_new_flow() {
    require_privileges!();
    in_private_netns(|| {
        // Lifetimes shorter than the machine's uptime, so that an entry can
        // be older than any of them.
        let mut dp = Datapath::load_with(DatapathConfig {
            ct_tcp_established_ns: 5_000_000_000,
            ..DatapathConfig::DEFAULT.with_tcp_transient_ns(5_000_000_000)
        });
        web(&mut dp);
        // A stale established entry, idle for 10 s, that points elsewhere.
        let fkey = ct_key(sa(CLIENT), sa(VIP), PROTO_TCP, CT_DIR_FORWARD);
        let stale = ConntrackEntry {
            nat_addr: net(Ipv4Addr::new(10, 244, 9, 9)),
            nat_port: nport(9999),
            backend_id: 99,
            service_id: 1,
            flags: ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED,
            last_seen_ns: boot_ns() - 10_000_000_000,
            ..ConntrackEntry::default()
        };
        dp.ct_insert(fkey, stale);
        let t0 = boot_ns();
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN);
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn.with_destination(sa(BACKEND_1)).build());
        assert_entry(
            &dp.ct(&fkey).unwrap(),
            &Ct {
                nat: sa(BACKEND_1),
                snat: None,
                backend_id: 11,
                service_id: 1,
                flags: ct_flags::TCP_SYN,
            },
            t0,
        );
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::ConntrackExpired, 1),
            (StatReason::NewFlow, 1),
            (StatReason::PassTranslated, 1),
        ]);
    });
}

#[test]
fn conntrack_lifetimes_come_from_lb_config() {
    // The same 10 s old UDP entry is alive with ct_udp_ns = 1 h and expired
    // with ct_udp_ns = 1 s: the loader's override of LB_CONFIG is honoured.
    require_privileges!();
    in_private_netns(|| {
        let dns = "10.96.0.10:53";
        let old = "10.244.3.3:5353";
        let new = "10.244.4.4:5353";
        for (udp_ns, reused) in [(3_600_000_000_000u64, true), (1_000_000_000, false)] {
            let mut dp = Datapath::load_with(DatapathConfig {
                ct_udp_ns: udp_ns,
                ..DatapathConfig::DEFAULT
            });
            // Both backends are members of the port; its only slot holds
            // `new`, so a re-created flow lands there.
            dp.add_service(&ServiceEntry::cluster_ip(
                7,
                sa(dns),
                PROTO_UDP,
                vec![be(71, new)],
            ));
            dp.put_backend(70, sa(old), PROTO_UDP, backend_flags::IN_CLUSTER_SET, 7);
            let fkey = ct_key(sa(CLIENT), sa(dns), PROTO_UDP, CT_DIR_FORWARD);
            dp.ct_insert(
                fkey,
                ConntrackEntry {
                    nat_addr: net(*sa(old).ip()),
                    nat_port: nport(5353),
                    backend_id: 70,
                    service_id: 7,
                    last_seen_ns: boot_ns() - 10_000_000_000,
                    ..ConntrackEntry::default()
                },
            );
            let q = udp(sa(CLIENT), sa(dns));
            let r = dp.run(POD_INGRESS, &q.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let to = if reused { old } else { new };
            assert_frame_eq(&r.out, &q.with_destination(sa(to)).build());
            if reused {
                // Only the FORWARD entry was written: its REPLY peer is
                // re-created (C1).
                dp.assert_stats(&[
                    (StatReason::Packets, 1),
                    (StatReason::ForwardTranslated, 1),
                    (StatReason::ConntrackPeerMissing, 1),
                    (StatReason::ConntrackRepaired, 1),
                    (StatReason::PassTranslated, 1),
                ]);
            } else {
                dp.assert_stats(&[
                    (StatReason::Packets, 1),
                    (StatReason::ConntrackExpired, 1),
                    (StatReason::NewFlow, 1),
                    (StatReason::PassTranslated, 1),
                ]);
            }
        }
    });
}

#[test]
fn e4_udp_flow_to_a_removed_backend_moves_at_once() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = "10.96.0.10:53";
        let (a, b) = ("10.244.3.3:5353", "10.244.4.4:5353");
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            sa(dns),
            PROTO_UDP,
            vec![be(70, a)],
        ));
        let q = udp(sa(CLIENT), sa(dns));
        let r = dp.run(POD_INGRESS, &q.build());
        assert_frame_eq(&r.out, &q.clone().with_destination(sa(a)).build());

        // The agent replaces the endpoint: new slot, then the old backend goes.
        dp.put_backend(71, sa(b), PROTO_UDP, backend_flags::IN_CLUSTER_SET, 7);
        dp.set_slot(7, 0, 71);
        dp.remove_backend(70);
        let r = dp.run(POD_INGRESS, &q.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &q.clone().with_destination(sa(b)).build());
        assert_eq!(backend_of(&mut dp, sa(CLIENT), sa(dns), PROTO_UDP), sa(b));
        // And it stays there.
        let r = dp.run(POD_INGRESS, &q.build());
        assert_frame_eq(&r.out, &q.clone().with_destination(sa(b)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 2),
            (StatReason::FlowMoved, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

/// F3: a SYN (without ACK) on the tuple of a connection that closed (FIN
/// or RST seen) is a new connection reusing the client's port, as netfilter
/// re-opens a TIME_WAIT/CLOSE entry: a new backend pick from the current
/// set. A retransmitted SYN of a connection that never closed keeps its
/// backend.
#[test]
fn f3_a_syn_on_a_closed_flow_is_a_new_flow() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN);
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_eq!(tuple(&r.out).dst, sa(BACKEND_1));
        // The only backend is replaced by another.
        dp.add_backend(12, sa(BACKEND_2), PROTO_TCP, 0);
        dp.set_slot(1, 0, 12);
        dp.remove_backend(11);
        // A retransmitted SYN of the open connection: same backend.
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_frame_eq(&r.out, &syn.clone().with_destination(sa(BACKEND_1)).build());
        // The connection closes (the backend resets it) ...
        dp.run(POD_EGRESS, &tcp(sa(BACKEND_1), sa(CLIENT), TCP_RST).build());
        // ... and a new one from the same port goes to the current backend.
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn.clone().with_destination(sa(BACKEND_2)).build());
        let fwd = dp
            .ct(&ct_key(sa(CLIENT), sa(VIP), PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!((fwd.backend_id, fwd.flags), (12, ct_flags::TCP_SYN));
        // A late ACK of the closed one is not a SYN: it would use the new
        // flow, never reopen it again.
        dp.assert_stats(&[
            (StatReason::Packets, 4),
            (StatReason::NewFlow, 2),
            (StatReason::ForwardTranslated, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ConntrackReopened, 1),
            (StatReason::PassTranslated, 4),
        ]);
    });
}

#[test]
fn tcp_flow_keeps_its_backend_after_the_backend_is_removed() {
    // As with kube-proxy: established TCP connections are not moved (they
    // would be reset by the new backend); only new flows see the change.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        dp.add_backend(12, sa(BACKEND_2), PROTO_TCP, 0);
        dp.set_slot(1, 0, 12);
        dp.remove_backend(11);
        let data = tcp(sa(CLIENT), sa(VIP), TCP_ACK | TCP_PSH);
        let r = dp.run(POD_INGRESS, &data.build());
        assert_frame_eq(&r.out, &data.with_destination(sa(BACKEND_1)).build());
        let other = sa("10.244.0.5:40001");
        let r = dp.run(POD_INGRESS, &tcp(other, sa(VIP), TCP_SYN).build());
        assert_eq!(tuple(&r.out).dst, sa(BACKEND_2));
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 2),
            (StatReason::ForwardTranslated, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

// ---------------------------------------------------------------------------
// Frontends: NodePort (F4), protocols (F9)
// ---------------------------------------------------------------------------

#[test]
fn f4_nodeport_matches_only_node_addresses() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_node_addr(NODE);
        dp.add_node_addr(Ipv4Addr::new(10, 244, 0, 1));
        let mut s = ServiceEntry::cluster_ip(3, sa(VIP), PROTO_TCP, vec![be(31, BACKEND_1)]);
        s.node_port = Some(30080);
        dp.add_service(&s);

        // From a pod to this node's addresses at the NodePort (from two
        // client ports: one port to both would be a C2 tuple clash).
        for (node, cport) in [(NODE, 40000), (Ipv4Addr::new(10, 244, 0, 1), 40001)] {
            let fe = SocketAddrV4::new(node, 30080);
            let client = SocketAddrV4::new(*sa(CLIENT).ip(), cport);
            let syn = tcp(client, fe, TCP_SYN);
            let r = dp.run(POD_INGRESS, &syn.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(&r.out, &syn.with_destination(sa(BACKEND_1)).build());
            let fwd = dp
                .ct(&ct_key(client, fe, PROTO_TCP, CT_DIR_FORWARD))
                .unwrap();
            assert_eq!(fwd.service_id, 3);
            assert_eq!(fwd.flags, ct_flags::TCP_SYN, "no SNAT from a pod");
        }
        // The NodePort on an address that is not the node's, the node address
        // on another port, and UDP to the NodePort: not a service.
        let misses = [
            tcp(sa(CLIENT), sa("192.0.2.99:30080"), TCP_SYN).build(),
            tcp(sa(CLIENT), sa("10.96.0.10:30080"), TCP_SYN).build(),
            tcp(sa(CLIENT), sa("192.0.2.1:30081"), TCP_SYN).build(),
            udp(sa(CLIENT), sa("192.0.2.1:30080")).build(),
        ];
        for f in &misses {
            let r = dp.run(POD_INGRESS, f);
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_eq!(r.out, *f);
        }
        dp.assert_stats(&[
            (StatReason::Packets, 6),
            (StatReason::NewFlow, 2),
            (StatReason::PassNotService, 4),
            (StatReason::PassTranslated, 2),
        ]);
    });
}

#[test]
fn f9_tcp_and_udp_on_one_port_are_independent() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = "10.96.0.10:53";
        dp.add_service(&ServiceEntry::cluster_ip(
            20,
            sa(dns),
            PROTO_TCP,
            vec![be(200, "10.244.5.5:5353")],
        ));
        dp.add_service(&ServiceEntry::cluster_ip(
            21,
            sa(dns),
            PROTO_UDP,
            vec![be(210, "10.244.6.6:53")],
        ));
        let t = tcp(sa(CLIENT), sa(dns), TCP_SYN);
        let u = udp(sa(CLIENT), sa(dns));
        let r = dp.run(POD_INGRESS, &t.build());
        assert_frame_eq(&r.out, &t.with_destination(sa("10.244.5.5:5353")).build());
        let r = dp.run(POD_INGRESS, &u.build());
        assert_frame_eq(&r.out, &u.with_destination(sa("10.244.6.6:53")).build());
        let tf = dp
            .ct(&ct_key(sa(CLIENT), sa(dns), PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        let uf = dp
            .ct(&ct_key(sa(CLIENT), sa(dns), PROTO_UDP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!((tf.service_id, tf.backend_id), (20, 200));
        assert_eq!((uf.service_id, uf.backend_id), (21, 210));

        // Removing the UDP frontend leaves TCP untouched.
        dp.services()
            .remove(&exact_key(sa(dns), PROTO_UDP))
            .unwrap();
        let u2 = udp(sa("10.244.0.5:40002"), sa(dns)).build();
        let r = dp.run(POD_INGRESS, &u2);
        assert_eq!(r.out, u2);
        let t2 = tcp(sa("10.244.0.5:40002"), sa(dns), TCP_SYN);
        let r = dp.run(POD_INGRESS, &t2.build());
        assert_frame_eq(&r.out, &t2.with_destination(sa("10.244.5.5:5353")).build());
        dp.assert_stats(&[
            (StatReason::Packets, 4),
            (StatReason::NewFlow, 3),
            (StatReason::PassNotService, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

// ---------------------------------------------------------------------------
// Backend selection (F3, F8, E1, E5, M3)
// ---------------------------------------------------------------------------

#[test]
fn f3_new_flows_spread_over_backends() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let addrs = ["10.244.1.11:8080", "10.244.2.12:8080", "10.244.3.13:8080"];
        let backends = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| be(11 + i as u32, a))
            .collect();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, backends));
        let mut seen = BTreeSet::new();
        // One client, 60 connections (the e2e test makes 15 requests).
        for port in 40000..40060u16 {
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), port);
            let r = dp.run(POD_INGRESS, &tcp(c, sa(VIP), TCP_SYN).build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let to = tuple(&r.out).dst;
            assert!(addrs.contains(&to.to_string().as_str()), "{to}");
            assert_eq!(backend_of(&mut dp, c, sa(VIP), PROTO_TCP), to);
            seen.insert(to);
        }
        // P(fewer than 3 backends in 60 uniform draws) is about 3 * (2/3)^60.
        assert_eq!(seen.len(), 3, "{seen:?}");
        dp.assert_stats(&[
            (StatReason::Packets, 60),
            (StatReason::NewFlow, 60),
            (StatReason::PassTranslated, 60),
        ]);
    });
}

#[test]
fn f8_session_affinity_reuses_the_backend() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let addrs = [
            "10.244.1.11:8080",
            "10.244.2.12:8080",
            "10.244.3.13:8080",
            "10.244.4.14:8080",
        ];
        let mut s = ServiceEntry::cluster_ip(
            1,
            sa(VIP),
            PROTO_TCP,
            addrs
                .iter()
                .enumerate()
                .map(|(i, a)| be(11 + i as u32, a))
                .collect(),
        );
        s.flags |= service_flags::AFFINITY;
        s.affinity_timeout_sec = 10800;
        dp.add_service(&s);
        let client = Ipv4Addr::new(10, 244, 0, 5);
        let akey = AffinityKey {
            client_addr: net(client),
            service_id: 1,
        };
        let mut first = None;
        for port in 40000..40030u16 {
            let t0 = boot_ns();
            let c = SocketAddrV4::new(client, port);
            let r = dp.run(POD_INGRESS, &tcp(c, sa(VIP), TCP_SYN).build());
            let to = tuple(&r.out).dst;
            let first = *first.get_or_insert(to);
            assert_eq!(to, first, "affinity broken at flow {port}");
            let a = dp.affinity().get(&akey, 0).unwrap();
            assert!(a.last_used_ns >= t0, "affinity entry not refreshed");
        }
        let first = first.unwrap();
        let id = dp.affinity().get(&akey, 0).unwrap().backend_id;
        assert_eq!(dp.backends().get(&id, 0).unwrap().addr, net(*first.ip()));

        // Backend 50 is a member of the port's cluster-wide set but sits in
        // no slot: a flow reaches it only through the affinity entry. A
        // fresh entry is honoured; one older than the timeout (1 s here) is
        // not; nor one whose backend is gone (C6, counted affinity_stale).
        let odd = sa("10.244.50.50:8080");
        dp.put_backend(50, odd, PROTO_TCP, backend_flags::IN_CLUSTER_SET, 1);
        s.affinity_timeout_sec = 1;
        dp.add_service(&s);
        let now = boot_ns();
        for (i, (backend_id, last_used_ns, honoured)) in [
            (50u32, now, true),
            (50, now - 5_000_000_000, false),
            (999, now, false),
        ]
        .into_iter()
        .enumerate()
        {
            let value = AffinityValue {
                backend_id,
                _pad: 0,
                last_used_ns,
            };
            dp.affinity().insert(akey, value, 0).unwrap();
            let c = SocketAddrV4::new(client, 41000 + i as u16);
            let t0 = boot_ns();
            let r = dp.run(POD_INGRESS, &tcp(c, sa(VIP), TCP_SYN).build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let to = tuple(&r.out).dst;
            assert_eq!(backend_of(&mut dp, c, sa(VIP), PROTO_TCP), to);
            let a = dp.affinity().get(&akey, 0).unwrap();
            assert!(a.last_used_ns >= t0, "affinity entry not refreshed");
            if honoured {
                assert_eq!((to, a.backend_id), (odd, 50));
            } else {
                assert!(addrs.contains(&to.to_string().as_str()), "{to}");
                assert!((11..15).contains(&a.backend_id), "{}", a.backend_id);
            }
        }
        dp.assert_stats(&[
            (StatReason::Packets, 33),
            (StatReason::NewFlow, 33),
            (StatReason::AffinityStale, 1),
            (StatReason::PassTranslated, 33),
        ]);
    });
}

/// A port whose count promises backends the maps do not hold (the agent is
/// mid-update, or a bug): dropped and counted, never rejected (E1 rejects
/// only a port with no endpoint at all; see the e1_* tests).
#[test]
fn slot_or_backend_missing_drops() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        // A slot pointing at a backend that does not exist (agent mid-update).
        let mut s = ServiceEntry::cluster_ip(2, sa("10.96.0.20:80"), PROTO_TCP, vec![]);
        s.cluster.push(be(77, BACKEND_1));
        dp.add_service(&s);
        dp.remove_backend(77);
        let r = dp.run(
            POD_INGRESS,
            &tcp(sa(CLIENT), sa("10.96.0.20:80"), TCP_SYN).build(),
        );
        assert_eq!(r.ret, TC_ACT_SHOT);
        // A count larger than the slots written.
        let mut v = s.value();
        v.backend_count = 1;
        v.service_id = 3;
        dp.add_frontend(exact_key(sa("10.96.0.30:80"), PROTO_TCP), v);
        let r = dp.run(
            POD_INGRESS,
            &tcp(sa(CLIENT), sa("10.96.0.30:80"), TCP_SYN).build(),
        );
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::DropBackendMissing, 2),
        ]);
    });
}

#[test]
fn e5_internal_traffic_policy_local_uses_only_local_backends() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let mut s = ServiceEntry::cluster_ip(
            1,
            sa(VIP),
            PROTO_TCP,
            vec![
                be(11, BACKEND_1),
                be(12, BACKEND_2),
                local_be(13, "10.244.0.13:8080"),
            ],
        );
        s.local = vec![local_be(13, "10.244.0.13:8080")];
        s.flags |= service_flags::INTERNAL_LOCAL;
        dp.add_service(&s);
        for port in 40000..40020u16 {
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), port);
            let r = dp.run(POD_INGRESS, &tcp(c, sa(VIP), TCP_SYN).build());
            assert_eq!(tuple(&r.out).dst, sa("10.244.0.13:8080"));
        }
        // No local endpoint: drop (E2), even though remote ones exist.
        s.local.clear();
        dp.add_service(&s);
        let r = dp.run(
            POD_INGRESS,
            &tcp(sa("10.244.0.5:41000"), sa(VIP), TCP_SYN).build(),
        );
        assert_eq!(r.ret, TC_ACT_SHOT);
        dp.assert_stats(&[
            (StatReason::Packets, 21),
            (StatReason::NewFlow, 20),
            (StatReason::DropNoBackend, 1),
            (StatReason::PassTranslated, 20),
        ]);
    });
}

/// A NodePort service with externalTrafficPolicy=Local: one local backend,
/// one remote (cluster set has both).
fn etp_local(dp: &mut Datapath) -> ServiceEntry {
    dp.add_node_addr(NODE);
    let mut s = ServiceEntry::cluster_ip(
        5,
        sa(VIP),
        PROTO_TCP,
        vec![be(51, BACKEND_1), local_be(52, "10.244.0.52:8080")],
    );
    s.local = vec![local_be(52, "10.244.0.52:8080")];
    s.node_port = Some(30080);
    s.flags |= service_flags::EXTERNAL_LOCAL;
    dp.add_service(&s);
    s
}

#[test]
fn m3_external_traffic_policy_local_uses_local_set_from_outside_only() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        etp_local(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        // From outside: always the local backend, client address preserved.
        for port in 50000..50020u16 {
            let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), port);
            let syn = tcp(c, fe, TCP_SYN);
            let r = dp.run(UPLINK_INGRESS, &syn.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(
                &r.out,
                &syn.with_destination(sa("10.244.0.52:8080")).build(),
            );
        }
        // From a local pod the cluster set is used (short-circuit, M3).
        let mut seen = BTreeSet::new();
        for port in 40000..40040u16 {
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), port);
            let r = dp.run(POD_INGRESS, &tcp(c, fe, TCP_SYN).build());
            seen.insert(tuple(&r.out).dst);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        dp.assert_stats(&[
            (StatReason::Packets, 60),
            (StatReason::NewFlow, 60),
            (StatReason::PassTranslated, 60),
        ]);
    });
}

// ---------------------------------------------------------------------------
// The uplink: NodePort to local backends, SNAT to remote backends (M2)
// ---------------------------------------------------------------------------

#[test]
fn uplink_nodeport_to_local_backend_is_dnat_only_and_reply_leaves_via_uplink_egress() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        etp_local(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let local = sa("10.244.0.52:8080");
        let syn = tcp(sa(EXTERNAL), fe, TCP_SYN);
        let t0 = boot_ns();
        let r = dp.run(UPLINK_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn.with_destination(local).build());
        let rev = dp
            .ct(&ct_key(local, sa(EXTERNAL), PROTO_TCP, CT_DIR_REPLY))
            .unwrap();
        assert_entry(
            &rev,
            &Ct {
                nat: fe,
                snat: None,
                backend_id: 52,
                service_id: 5,
                flags: ct_flags::TCP_SYN,
            },
            t0,
        );
        // The backend's answer is routed out of the uplink: frontend source.
        let syn_ack = tcp(local, sa(EXTERNAL), TCP_SYN | TCP_ACK);
        // On its way it crosses the backend pod's ingress: not a service.
        let r = dp.run(POD_INGRESS, &syn_ack.build());
        assert_eq!(r.out, syn_ack.build());
        let r = dp.run(UPLINK_EGRESS, &syn_ack.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn_ack.with_source(fe).build());
        // Next client packet: known flow, still no SNAT, no redirect.
        let ack = tcp(sa(EXTERNAL), fe, TCP_ACK);
        let r = dp.run(UPLINK_INGRESS, &ack.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &ack.with_destination(local).build());
        dp.assert_stats(&[
            (StatReason::Packets, 4),
            (StatReason::NewFlow, 1),
            (StatReason::PassNotService, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

/// A NodePort service whose only backend is on another node.
fn remote_nodeport(dp: &mut Datapath) {
    dp.add_node_addr(NODE);
    let mut s = ServiceEntry::cluster_ip(6, sa(VIP), PROTO_TCP, vec![be(61, BACKEND_2)]);
    s.node_port = Some(30080);
    dp.add_service(&s);
}

/// Checks the two SNAT conntrack entries of the flow EXTERNAL -> NODE:30080
/// and returns the SNAT port.
fn assert_snat_entries(dp: &mut Datapath, t0: u64, cfg: &DatapathConfig) -> u16 {
    let fe = SocketAddrV4::new(NODE, 30080);
    let fwd = dp
        .ct(&ct_key(sa(EXTERNAL), fe, PROTO_TCP, CT_DIR_FORWARD))
        .unwrap();
    let port = u16::from_be(fwd.snat_port);
    assert!(
        (cfg.snat_port_min..=cfg.snat_port_max).contains(&port),
        "SNAT port {port} outside the configured range"
    );
    let flags = ct_flags::SNAT | ct_flags::TCP_SYN;
    assert_entry(
        &fwd,
        &Ct {
            nat: sa(BACKEND_2),
            snat: Some(SocketAddrV4::new(NODE, port)),
            backend_id: 61,
            service_id: 6,
            flags,
        },
        t0,
    );
    let rev = dp
        .ct(&ct_key(
            sa(BACKEND_2),
            SocketAddrV4::new(NODE, port),
            PROTO_TCP,
            CT_DIR_REPLY,
        ))
        .unwrap();
    assert_entry(
        &rev,
        &Ct {
            nat: fe,
            snat: Some(sa(EXTERNAL)),
            backend_id: 61,
            service_id: 6,
            flags,
        },
        t0,
    );
    assert_eq!(dp.ct_all().len(), 2);
    port
}

#[test]
fn m2_uplink_nodeport_to_remote_backend_snats_and_drops_without_route() {
    // In an empty network namespace the FIB has no route: the translated
    // packet is dropped (DropFibFailed), but the flow's entries exist.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let t0 = boot_ns();
        let r = dp.run(UPLINK_INGRESS, &tcp(sa(EXTERNAL), fe, TCP_SYN).build());
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert_snat_entries(&mut dp, t0, &DatapathConfig::DEFAULT);
        // The packet is routed before it is translated (C3: so that what
        // cannot be forwarded is answered about what the client sent): it
        // is dropped as it came.
        assert_eq!(r.out, tcp(sa(EXTERNAL), fe, TCP_SYN).build());
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
            (StatReason::DropFibFailed, 1),
        ]);
    });
}

/// M2 for an externalIP the node does not own: the SNAT source is the
/// uplink's own address (LB_UPLINK_ADDRS), not the external IP, or the reply
/// would never come back through this node. With no address known for the
/// uplink the flow is dropped and counted, and nothing is half-created.
#[test]
fn m2_external_ip_to_remote_backend_snats_to_the_uplink_address() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let ext_ip = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 12), 80);
        dp.add_backend(71, sa(BACKEND_2), PROTO_TCP, 0);
        dp.set_slot(7, 0, 71);
        dp.add_frontend(
            exact_key(ext_ip, PROTO_TCP),
            ServiceValue {
                service_id: 7,
                backend_count: 1,
                flags: service_flags::EXTERNAL_IP,
                ..ServiceValue::default()
            },
        );
        let lo = 1;
        let syn = tcp(sa(EXTERNAL), ext_ip, TCP_SYN).build();
        let r = dp.run_on(UPLINK_INGRESS, &syn, lo);
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert!(dp.ct_all().is_empty(), "entries of a dropped flow");
        dp.assert_stats(&[(StatReason::Packets, 1), (StatReason::DropNoSnatAddress, 1)]);

        dp.set_uplink_addr(lo, NODE);
        let r = dp.run_on(UPLINK_INGRESS, &syn, lo);
        // No route in this namespace: dropped at the FIB (before the
        // translation), with the flow's entries made.
        assert_eq!(r.ret, TC_ACT_SHOT);
        let fwd = dp
            .ct(&ct_key(sa(EXTERNAL), ext_ip, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!(
            fwd.snat_addr,
            net(NODE),
            "SNAT source is not the uplink address"
        );
        let port = u16::from_be(fwd.snat_port);
        let rev = dp
            .ct(&ct_key(
                sa(BACKEND_2),
                SocketAddrV4::new(NODE, port),
                PROTO_TCP,
                CT_DIR_REPLY,
            ))
            .expect("the reply entry is keyed by the uplink address");
        assert_eq!((rev.nat_addr, rev.nat_port), (net(*ext_ip.ip()), nport(80)));
        assert_eq!(r.out, syn);
    });
}

/// Builds, in the current (private) netns, an "uplink" veth `up0`
/// (192.0.2.1/24, peer `up1` up) with routes to the remote pod CIDR and to
/// the external client through two gateways whose neighbour entries are
/// known when `neighbours`.
fn uplink_netns(neighbours: bool) -> (u32, [u8; 6]) {
    sh(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
    ]);
    sh(&["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    sh(&["ip", "link", "set", "up1", "up"]);
    sh(&["ip", "route", "add", "10.244.2.0/24", "via", "192.0.2.2"]);
    sh(&["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.3"]);
    if neighbours {
        for (ip, mac) in [
            ("192.0.2.2", "02:00:00:00:02:02"),
            ("192.0.2.3", "02:00:00:00:02:03"),
        ] {
            sh(&[
                "ip",
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                "up0",
                "nud",
                "permanent",
            ]);
        }
    }
    // bpf_fib_lookup forwards only where IP forwarding is on.
    for p in ["all", "up0"] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{p}/forwarding"), "1").unwrap();
    }
    (ifindex("up0"), mac_of("up0"))
}

#[test]
fn m2_uplink_snat_flow_is_redirected_both_ways_via_the_fib() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, up0_mac) = uplink_netns(true);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let syn = tcp(sa(EXTERNAL), fe, TCP_SYN);
        let t0 = boot_ns();
        let r = dp.run_on(UPLINK_INGRESS, &syn.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = assert_snat_entries(&mut dp, t0, &DatapathConfig::DEFAULT);
        let snat = SocketAddrV4::new(NODE, port);
        // DNAT + SNAT, TTL - 1, Ethernet to the gateway of 10.244.2.0/24.
        let want = tcp(snat, sa(BACKEND_2), TCP_SYN)
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 2], up0_mac);
        assert_frame_eq(&r.out, &want.build());

        // The backend's answer comes back in on the uplink, to node:port.
        let syn_ack =
            tcp(sa(BACKEND_2), snat, TCP_SYN | TCP_ACK).with_macs(up0_mac, [2, 0, 0, 0, 2, 2]);
        let r = dp.run_on(UPLINK_INGRESS, &syn_ack.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let want = tcp(fe, sa(EXTERNAL), TCP_SYN | TCP_ACK)
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 3], up0_mac);
        assert_frame_eq(&r.out, &want.build());

        // The client's ACK: known flow, same SNAT port, established.
        let ack = tcp(sa(EXTERNAL), fe, TCP_ACK);
        let r = dp.run_on(UPLINK_INGRESS, &ack.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let want = tcp(snat, sa(BACKEND_2), TCP_ACK)
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 2], up0_mac);
        assert_frame_eq(&r.out, &want.build());
        let est =
            ct_flags::SNAT | ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        let fwd = dp
            .ct(&ct_key(sa(EXTERNAL), fe, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        let rev = dp
            .ct(&ct_key(sa(BACKEND_2), snat, PROTO_TCP, CT_DIR_REPLY))
            .unwrap();
        assert_eq!((fwd.flags, rev.flags), (est, est));

        // Replies never pass the pod/uplink egress reverse NAT.
        let r = dp.run(UPLINK_EGRESS, &syn_ack.build());
        assert_eq!(r.out, syn_ack.build());
        dp.assert_stats(&[
            (StatReason::Packets, 4),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::Redirected, 3),
            (StatReason::PassNotService, 1),
        ]);
    });
}

/// M2 on a node with two uplinks: a NodePort flow that arrives on the
/// second uplink (`up2`, 192.0.3.1) for a backend that the route reaches
/// through the first (`up0`) is SNAT'ed to `up0`'s address, the one the
/// backend's node can answer (kube-proxy's MASQUERADE takes the egress
/// interface's address); the reply is restored to the address the client
/// used. Without an address known for the egress interface, the frontend's
/// own address is the fallback.
#[test]
fn m2_snat_to_a_remote_backend_uses_the_egress_uplinks_address() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, up0_mac) = uplink_netns(true);
        sh(&[
            "ip", "link", "add", "up2", "type", "veth", "peer", "name", "up3",
        ]);
        sh(&["ip", "addr", "add", "192.0.3.1/24", "dev", "up2"]);
        sh(&["ip", "link", "set", "up2", "up"]);
        sh(&["ip", "link", "set", "up3", "up"]);
        std::fs::write("/proc/sys/net/ipv4/conf/up2/forwarding", "1").unwrap();
        let up2 = ifindex("up2");
        let second = Ipv4Addr::new(192, 0, 3, 1);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        dp.add_node_addr(second);
        dp.set_uplink_addr(up0, NODE);
        dp.set_uplink_addr(up2, second);
        let fe = SocketAddrV4::new(second, 30080);
        let client = sa("192.0.3.9:51000");
        let r = dp.run_on(UPLINK_INGRESS, &tcp(client, fe, TCP_SYN).build(), up2);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let fwd = dp
            .ct(&ct_key(client, fe, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!(
            fwd.snat_addr,
            net(NODE),
            "SNAT source must be the egress uplink's address"
        );
        let snat = SocketAddrV4::new(NODE, u16::from_be(fwd.snat_port));
        let want = tcp(snat, sa(BACKEND_2), TCP_SYN)
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 2], up0_mac);
        assert_frame_eq(&r.out, &want.build());
        // The reply comes back on up0 and leaves with the frontend the
        // client addressed (192.0.3.9 is on up2's own subnet: no neighbour
        // entry, so the kernel resolves it: redirect_neigh).
        let syn_ack = tcp(sa(BACKEND_2), snat, TCP_SYN | TCP_ACK);
        let r = dp.run_on(UPLINK_INGRESS, &syn_ack.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert_eq!(tuple(&r.out).src, fe);
        assert_eq!(tuple(&r.out).dst, client);

        // No address known for the egress interface: the frontend address.
        dp.remove_uplink_addr(up0);
        let other = sa("192.0.3.9:51001");
        let r = dp.run_on(UPLINK_INGRESS, &tcp(other, fe, TCP_SYN).build(), up2);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let fwd = dp
            .ct(&ct_key(other, fe, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!(fwd.snat_addr, net(second));
    });
}

#[test]
fn m2_uplink_snat_without_neighbour_uses_redirect_neigh() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, _) = uplink_netns(false);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let t0 = boot_ns();
        let r = dp.run_on(UPLINK_INGRESS, &tcp(sa(EXTERNAL), fe, TCP_SYN).build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = assert_snat_entries(&mut dp, t0, &DatapathConfig::DEFAULT);
        // Translated; the MACs are left to the kernel's neighbour layer.
        let want = tcp(SocketAddrV4::new(NODE, port), sa(BACKEND_2), TCP_SYN).with_ttl(63);
        assert_frame_eq(&r.out, &want.build());
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
            (StatReason::Redirected, 1),
        ]);
    });
}

#[test]
fn m2_snat_ports_are_collision_checked_and_exhaustion_drops() {
    require_privileges!();
    in_private_netns(|| {
        // Two SNAT ports only.
        let cfg = DatapathConfig {
            snat_port_min: 61000,
            snat_port_max: 61001,
            ..DatapathConfig::DEFAULT
        };
        let (up0, _) = uplink_netns(true);
        let mut dp = Datapath::load_with(cfg);
        remote_nodeport(&mut dp);
        // One CPU: its SNAT cursor hands out the ports in turn.
        pin_to_cpu(allowed_cpus()[0]);
        let fe = SocketAddrV4::new(NODE, 30080);
        let mut ports = BTreeSet::new();
        for cport in [51000u16, 51001] {
            let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), cport);
            let r = dp.run_on(UPLINK_INGRESS, &tcp(c, fe, TCP_SYN).build(), up0);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            ports.insert(tuple(&r.out).src.port());
        }
        assert_eq!(
            ports,
            BTreeSet::from([61000, 61001]),
            "ports must not collide"
        );
        // A third flow finds no free port.
        let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 8), 51000);
        let f = tcp(c, fe, TCP_SYN).build();
        let r = dp.run_on(UPLINK_INGRESS, &f, up0);
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert!(dp.ct(&ct_key(c, fe, PROTO_TCP, CT_DIR_FORWARD)).is_none());
        assert_eq!(dp.ct_all().len(), 4);
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 2),
            (StatReason::Redirected, 2),
            // The second flow's first candidate was free; the third tried
            // every probe.
            (StatReason::SnatPortTaken, 64),
            (StatReason::DropSnatExhausted, 1),
        ]);
    });
}

#[test]
fn uplink_ingress_passes_replies_of_unsnated_flows() {
    // A pod's flow to a backend on another node: the reply arrives on the
    // uplink (untranslated there) and is reverse-NATed at the pod's egress.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_service(&ServiceEntry::cluster_ip(
            1,
            sa(VIP),
            PROTO_TCP,
            vec![be(12, BACKEND_2)],
        ));
        dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        let syn_ack = tcp(sa(BACKEND_2), sa(CLIENT), TCP_SYN | TCP_ACK);
        let r = dp.run(UPLINK_INGRESS, &syn_ack.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_eq!(r.out, syn_ack.build());
        let r = dp.run(POD_EGRESS, &syn_ack.build());
        assert_frame_eq(&r.out, &syn_ack.with_source(sa(VIP)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::PassNotService, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::PassTranslated, 2),
        ]);
    });
}

#[test]
fn c3_ttl_one_on_a_packet_the_datapath_forwards_is_answered_with_time_exceeded() {
    // As a router: a SNAT'ed packet with TTL 1 is not forwarded; its sender
    // gets ICMP time exceeded from the node address the flow uses, quoting
    // the packet as it was sent (untranslated).
    require_privileges!();
    in_private_netns(|| {
        let (up0, _) = uplink_netns(true);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let syn = tcp(sa(EXTERNAL), fe, TCP_SYN).with_ttl(1).build();
        let r = dp.run_on(UPLINK_INGRESS, &syn, up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let mut want = Ipv4Frame {
            l4: packet::L4::IcmpError {
                icmp_type: 11,
                code: 0,
                rest: [0; 4],
                quote: syn[off::IP..off::L4 + 8].to_vec(),
            },
            ..icmp_port_unreachable(NODE, *sa(EXTERNAL).ip(), &[])
        }
        .with_macs(MAC_A, MAC_B);
        want.id = 0;
        want.frag = 0x4000;
        want.ttl = 64;
        want.tos = 0xc0;
        assert_frame_eq(&r.out, &want.build());
        // A source that cannot be answered (broadcast): dropped.
        let bcast = tcp(sa("255.255.255.255:51000"), fe, TCP_SYN).with_ttl(1);
        let r = dp.run_on(UPLINK_INGRESS, &bcast.build(), up0);
        assert_eq!(r.ret, TC_ACT_SHOT);
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 2),
            (StatReason::IcmpTimeExceededSent, 1),
            (StatReason::DropFibFailed, 1),
        ]);
    });
}

#[test]
fn ttl_is_not_touched_when_the_stack_forwards() {
    // Only packets the datapath redirects itself get TTL - 1; DNAT'ed
    // packets passed to the stack keep theirs (the stack decrements it).
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN).with_ttl(1);
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_eq!(tuple(&r.out).ttl, 1);
        assert_frame_eq(&r.out, &syn.with_destination(sa(BACKEND_1)).build());
        assert_eq!(
            dp.ct_all().iter().map(|(k, _)| k.proto).collect::<Vec<_>>(),
            vec![PROTO_TCP, PROTO_TCP]
        );
    });
}

// ---------------------------------------------------------------------------
// E1: no endpoint at all -> reset / port unreachable; E2: drop
// ---------------------------------------------------------------------------

/// The reset lb sends `client` from `frontend` (tcp_v4_send_reset's shape):
/// Ethernet addresses of the offending frame swapped, IPv4 id 0 with DF,
/// TTL 64, no options, no payload, window 0.
fn reset_frame(
    frontend: SocketAddrV4,
    client: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
) -> Ipv4Frame {
    let mut f = tcp(frontend, client, flags)
        .with_seq_ack(seq, ack)
        .with_payload(&[])
        .with_macs(MAC_A, MAC_B);
    if let packet::L4::Tcp { window, .. } = &mut f.l4 {
        *window = 0;
    }
    f.id = 0;
    f.frag = 0x4000;
    f.ttl = 64;
    f.tos = 0;
    f
}

/// The reset the kernel would send for `sent` (a frame built by `tcp()`
/// and friends), from the address it was sent to.
fn reset_for(sent: &Ipv4Frame) -> Ipv4Frame {
    let packet::L4::Tcp {
        seq,
        ack,
        flags,
        payload,
        ..
    } = &sent.l4
    else {
        panic!("not TCP");
    };
    let (src, dst) = (sent.destination(), sent.source());
    if flags & TCP_ACK != 0 {
        reset_frame(src, dst, *ack, 0, TCP_RST)
    } else {
        let n = u32::from(flags & TCP_SYN != 0)
            + u32::from(flags & TCP_FIN != 0)
            + payload.len() as u32;
        reset_frame(src, dst, 0, seq.wrapping_add(n), TCP_RST | TCP_ACK)
    }
}

/// The ICMP port unreachable lb sends for the UDP frame `sent`: from the
/// address it was sent to, quoting its IPv4 header and UDP header byte for
/// byte; TOS 0xc0 as the kernel's ICMP errors, id 0, DF, TTL 64.
fn unreachable_for(sent: &[u8]) -> Ipv4Frame {
    let t = tuple(sent);
    let mut f = icmp_port_unreachable(*t.dst.ip(), *t.src.ip(), &sent[off::IP..off::L4 + 8])
        .with_macs(MAC_A, MAC_B);
    f.id = 0;
    f.frag = 0x4000;
    f.ttl = 64;
    f.tos = 0xc0;
    f
}

#[test]
fn e1_tcp_syn_to_a_port_without_endpoints_gets_a_reset() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, vec![]));
        // A SYN as Linux sends it: MSS, SACK permitted, timestamps, wscale.
        let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN).with_tcp_options(&[
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ]);
        let sent = syn.build();
        assert_eq!(sent.len(), 74);
        let r = dp.run(POD_INGRESS, &sent);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        // RST|ACK from the ClusterIP, seq 0, ack = the SYN's seq + 1: the
        // client's connect() fails with ECONNREFUSED at once.
        let want = reset_frame(sa(VIP), sa(CLIENT), 0, 0x0102_0305, TCP_RST | TCP_ACK);
        assert_eq!(r.out.len(), 54, "options must be trimmed");
        assert_frame_eq(&r.out, &want.build());
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, 1), (StatReason::RejectNoEndpoint, 1)]);
    });
}

#[test]
fn e1_reset_sequence_numbers_follow_tcp_v4_send_reset() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, vec![]));
        let (c, v) = (sa(CLIENT), sa(VIP));
        // (segment, expected seq, expected ack_seq, expected flags)
        let cases = [
            // Data with ACK: seq = its ack_seq, no ACK flag.
            (
                tcp(c, v, TCP_ACK | TCP_PSH).with_seq_ack(1000, 0xdead_beef),
                0xdead_beef,
                0,
                TCP_RST,
            ),
            // A lone ACK (no payload).
            (
                tcp(c, v, TCP_ACK).with_payload(&[]).with_seq_ack(5, 77),
                77,
                0,
                TCP_RST,
            ),
            // FIN|ACK with payload: still the ACK rule.
            (
                tcp(c, v, TCP_FIN | TCP_ACK).with_seq_ack(9, 10),
                10,
                0,
                TCP_RST,
            ),
            // No ACK: seq 0, ack = seq + SYN + FIN + payload length.
            (
                tcp(c, v, TCP_PSH).with_seq_ack(1000, 0),
                0,
                1000 + 18,
                TCP_RST | TCP_ACK,
            ),
            (
                tcp(c, v, TCP_FIN)
                    .with_payload(b"bye")
                    .with_seq_ack(1000, 0),
                0,
                1000 + 1 + 3,
                TCP_RST | TCP_ACK,
            ),
            (
                tcp(c, v, TCP_SYN | TCP_FIN).with_seq_ack(1000, 0),
                0,
                1000 + 2,
                TCP_RST | TCP_ACK,
            ),
            // Wrap-around of the sequence space.
            (
                tcp(c, v, TCP_SYN).with_seq_ack(0xffff_ffff, 0),
                0,
                0,
                TCP_RST | TCP_ACK,
            ),
            // A SYN carrying data (TCP Fast Open style) and options.
            (
                tcp(c, v, TCP_SYN)
                    .with_payload(&[7; 100])
                    .with_tcp_options(&[2, 4, 5, 0xb4])
                    .with_seq_ack(1, 0),
                0,
                1 + 1 + 100,
                TCP_RST | TCP_ACK,
            ),
        ];
        for (seg, seq, ack, flags) in &cases {
            let sent = seg.build();
            let r = dp.run(POD_INGRESS, &sent);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            let want = reset_frame(v, c, *seq, *ack, *flags);
            assert_frame_eq(&r.out, &want.build());
            // The independent rule of the helper agrees.
            assert_frame_eq(&r.out, &reset_for(seg).build());
        }
        // The ECN bits of the offending TOS are not copied; the rest is.
        let mut seg = tcp(c, v, TCP_SYN);
        seg.tos = 0x2b;
        let r = dp.run(POD_INGRESS, &seg.build());
        let mut want = reset_for(&seg);
        want.tos = 0x28;
        assert_frame_eq(&r.out, &want.build());
        let n = cases.len() as u64 + 1;
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::RejectNoEndpoint, n)]);
    });
}

#[test]
fn e1_udp_to_a_port_without_endpoints_gets_port_unreachable() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = sa("10.96.0.10:53");
        dp.add_service(&ServiceEntry::cluster_ip(7, dns, PROTO_UDP, vec![]));
        let frames = [
            // A DNS query (shorter than the answer: the packet grows).
            udp(sa(CLIENT), dns).build(),
            // No payload at all, and no checksum.
            udp_no_checksum(sa(CLIENT), dns).with_payload(&[]).build(),
            // A large datagram: trimmed to the quote.
            udp(sa(CLIENT), dns).with_payload(&[0x5a; 1200]).build(),
        ];
        for sent in &frames {
            let r = dp.run(POD_INGRESS, sent);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            assert_eq!(r.out.len(), 14 + 20 + 8 + 28);
            assert_frame_eq(&r.out, &unreachable_for(sent).build());
            // The quote is the datagram exactly as the client sent it:
            // its kernel matches it to the socket (ECONNREFUSED).
            assert_eq!(&r.out[off::L4 + 8..], &sent[off::IP..off::L4 + 8]);
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, 3), (StatReason::RejectNoEndpoint, 3)]);
    });
}

#[test]
fn e1_reject_on_every_frontend_kind_from_both_hooks() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_node_addr(NODE);
        let ext_ip = sa("203.0.113.12:80");
        let lb_ip = sa("203.0.113.20:80");
        // Two ports of one Service (TCP and UDP), each with every kind of
        // frontend and both traffic policies Local: with no endpoint at
        // all, kube-proxy rejects on every frontend whatever the policy.
        for (id, proto) in [(1, PROTO_TCP), (2, PROTO_UDP)] {
            let mut s = ServiceEntry::cluster_ip(id, sa(VIP), proto, vec![]);
            s.node_port = Some(30080);
            s.external_ips = vec![ext_ip];
            s.lb_ips = vec![lb_ip];
            s.flags |= service_flags::EXTERNAL_LOCAL | service_flags::INTERNAL_LOCAL;
            dp.add_service(&s);
        }
        let frontends = [sa(VIP), SocketAddrV4::new(NODE, 30080), ext_ip, lb_ip];
        let mut n = 0;
        for (prog, client) in [(POD_INGRESS, sa(CLIENT)), (UPLINK_INGRESS, sa(EXTERNAL))] {
            for fe in frontends {
                let seg = tcp(client, fe, TCP_SYN);
                let r = dp.run(prog, &seg.build());
                assert_eq!(r.ret, TC_ACT_REDIRECT, "{prog} {fe} TCP");
                assert_frame_eq(&r.out, &reset_for(&seg).build());
                let sent = udp(client, fe).build();
                let r = dp.run(prog, &sent);
                assert_eq!(r.ret, TC_ACT_REDIRECT, "{prog} {fe} UDP");
                assert_frame_eq(&r.out, &unreachable_for(&sent).build());
                n += 2;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::RejectNoEndpoint, n)]);
    });
}

#[test]
fn e1_no_answer_to_resets_or_non_unicast_sources() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, vec![]));
        dp.add_service(&ServiceEntry::cluster_ip(2, sa(VIP), PROTO_UDP, vec![]));
        let mut frames = vec![
            tcp(sa(CLIENT), sa(VIP), TCP_RST).build(),
            tcp(sa(CLIENT), sa(VIP), TCP_RST | TCP_ACK).build(),
        ];
        for src in [
            "0.0.0.0:68",
            "0.1.2.3:1000",
            "127.0.0.1:1000",
            "224.0.0.5:1000",
            "239.255.255.250:1900",
            "240.0.0.1:1000",
            "255.255.255.255:68",
        ] {
            frames.push(tcp(sa(src), sa(VIP), TCP_SYN).build());
            frames.push(udp(sa(src), sa(VIP)).build());
        }
        for f in &frames {
            for prog in [POD_INGRESS, UPLINK_INGRESS] {
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_SHOT, "{prog} answered {}", hex(f));
                assert_eq!(r.out, *f, "{prog} changed a dropped packet");
            }
        }
        let n = 2 * frames.len() as u64;
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::DropNoBackend, n)]);
    });
}

#[test]
fn e2_local_policies_without_a_local_endpoint_drop_instead_of_rejecting() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_node_addr(NODE);
        // Endpoints exist, none on this node.
        let mut s = ServiceEntry::cluster_ip(5, sa(VIP), PROTO_TCP, vec![be(51, BACKEND_2)]);
        s.node_port = Some(30080);
        s.flags |= service_flags::EXTERNAL_LOCAL | service_flags::INTERNAL_LOCAL;
        dp.add_service(&s);
        s.proto = PROTO_UDP;
        s.id = 6;
        s.cluster = vec![be(61, BACKEND_2)];
        dp.add_service(&s);
        let np = SocketAddrV4::new(NODE, 30080);
        for f in [
            // externalTrafficPolicy=Local from outside (E2).
            tcp(sa(EXTERNAL), np, TCP_SYN).build(),
            udp(sa(EXTERNAL), np).build(),
        ] {
            let r = dp.run(UPLINK_INGRESS, &f);
            assert_eq!(r.ret, TC_ACT_SHOT);
            assert_eq!(r.out, f);
        }
        for f in [
            // internalTrafficPolicy=Local (E5).
            tcp(sa(CLIENT), sa(VIP), TCP_SYN).build(),
            udp(sa(CLIENT), sa(VIP)).build(),
        ] {
            let r = dp.run(POD_INGRESS, &f);
            assert_eq!(r.ret, TC_ACT_SHOT);
            assert_eq!(r.out, f);
        }
        // A pod reaching the NodePort uses the cluster set (M3).
        let syn = tcp(sa(CLIENT), np, TCP_SYN);
        let r = dp.run(POD_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn.with_destination(sa(BACKEND_2)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 5),
            (StatReason::DropNoBackend, 4),
            (StatReason::NewFlow, 1),
            (StatReason::PassTranslated, 1),
        ]);
    });
}

// ---------------------------------------------------------------------------
// F7: loadBalancerSourceRanges
// ---------------------------------------------------------------------------

const LB_IP: &str = "203.0.113.20:80";

/// Service port 8: ClusterIP, NodePort 30080 and LB IP, externalTrafficPolicy
/// Local with one local backend (so uplink flows pass to the stack), ranges
/// 198.51.100.0/24 and 10.244.0.5/32 programmed and flagged.
fn ranged_lb(dp: &mut Datapath) -> ServiceEntry {
    dp.add_node_addr(NODE);
    let local = local_be(81, "10.244.0.81:8080");
    let mut s = ServiceEntry::cluster_ip(8, sa(VIP), PROTO_TCP, vec![local.clone()]);
    s.local = vec![local];
    s.node_port = Some(30080);
    s.lb_ips = vec![sa(LB_IP)];
    s.flags |= service_flags::EXTERNAL_LOCAL | service_flags::SOURCE_RANGES;
    dp.add_source_range(8, Ipv4Addr::new(198, 51, 100, 0), 24);
    dp.add_source_range(8, Ipv4Addr::new(10, 244, 0, 5), 32);
    dp.add_service(&s);
    s
}

#[test]
fn f7_source_ranges_filter_new_flows_to_lb_ips_only() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let s = ranged_lb(&mut dp);
        // Another port's range covers the outsider: ranges are per port.
        dp.add_source_range(9, Ipv4Addr::new(203, 0, 113, 0), 24);
        let backend = sa("10.244.0.81:8080");
        let np = SocketAddrV4::new(NODE, 30080);
        let outsider = sa("203.0.113.99:52000");
        let other_pod = sa("10.244.0.6:40000");

        // (hook, client, frontend, allowed); each flow from its own port, so
        // that no two flows share a REPLY key (C2 is another matter).
        let cases = [
            (UPLINK_INGRESS, sa(EXTERNAL), sa(LB_IP), true),
            (UPLINK_INGRESS, outsider, sa(LB_IP), false),
            // NodePort and ClusterIP of the same port: not filtered.
            (UPLINK_INGRESS, outsider, np, true),
            (UPLINK_INGRESS, outsider, sa(VIP), true),
            (POD_INGRESS, sa(CLIENT), sa(LB_IP), true),
            (POD_INGRESS, other_pod, sa(LB_IP), false),
            (POD_INGRESS, other_pod, np, true),
            (POD_INGRESS, other_pod, sa(VIP), true),
        ];
        for (i, (prog, client, fe, allowed)) in cases.into_iter().enumerate() {
            let client = SocketAddrV4::new(*client.ip(), client.port() + i as u16);
            let syn = tcp(client, fe, TCP_SYN);
            let r = dp.run(prog, &syn.build());
            let fwd = dp.ct(&ct_key(client, fe, PROTO_TCP, CT_DIR_FORWARD));
            if allowed {
                assert_eq!(r.ret, TC_ACT_UNSPEC, "{prog} {client} -> {fe}");
                assert_frame_eq(&r.out, &syn.with_destination(backend).build());
                assert!(fwd.is_some());
            } else {
                assert_eq!(r.ret, TC_ACT_SHOT, "{prog} {client} -> {fe}");
                assert_eq!(r.out, syn.build());
                assert!(fwd.is_none(), "a filtered flow left an entry");
            }
        }
        assert_eq!(dp.ct_all().len(), 2 * 6);

        // An established flow is not checked again: the range goes, the
        // flow keeps working; a new flow from the same client is dropped.
        dp.remove_source_range(8, Ipv4Addr::new(198, 51, 100, 0), 24);
        let ack = tcp(sa(EXTERNAL), sa(LB_IP), TCP_ACK);
        let r = dp.run(UPLINK_INGRESS, &ack.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &ack.with_destination(backend).build());
        let again = SocketAddrV4::new(*sa(EXTERNAL).ip(), 51001);
        let r = dp.run(UPLINK_INGRESS, &tcp(again, sa(LB_IP), TCP_SYN).build());
        assert_eq!(r.ret, TC_ACT_SHOT);

        // Without SOURCE_RANGES (ranges not programmed yet) nothing is
        // filtered.
        let mut open = s.clone();
        open.flags &= !service_flags::SOURCE_RANGES;
        dp.add_service(&open);
        let syn = tcp(outsider, sa(LB_IP), TCP_SYN);
        let r = dp.run(UPLINK_INGRESS, &syn.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &syn.with_destination(backend).build());
        dp.assert_stats(&[
            (StatReason::Packets, 11),
            (StatReason::NewFlow, 7),
            (StatReason::ForwardTranslated, 1),
            (StatReason::DropSourceRange, 3),
            (StatReason::PassTranslated, 8),
        ]);
    });
}

#[test]
fn f7_source_ranges_apply_before_the_reject_of_an_empty_port() {
    // A source outside the ranges learns nothing, not even that the port
    // has no endpoints; a source inside gets the reset (E1).
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let mut s = ranged_lb(&mut dp);
        s.cluster.clear();
        s.local.clear();
        dp.add_service(&s);
        let out = tcp(sa("203.0.113.99:52000"), sa(LB_IP), TCP_SYN).build();
        let r = dp.run(UPLINK_INGRESS, &out);
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert_eq!(r.out, out);
        let seg = tcp(sa(EXTERNAL), sa(LB_IP), TCP_SYN);
        let r = dp.run(UPLINK_INGRESS, &seg.build());
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert_frame_eq(&r.out, &reset_for(&seg).build());
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::DropSourceRange, 1),
            (StatReason::RejectNoEndpoint, 1),
        ]);
    });
}

// ---------------------------------------------------------------------------
// C6 / F8: affinity never sends a client where the port no longer serves
// ---------------------------------------------------------------------------

#[test]
fn c6_affinity_is_used_only_while_its_backend_serves_the_port() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let mut s = ServiceEntry::cluster_ip(
            1,
            sa(VIP),
            PROTO_TCP,
            vec![be(11, BACKEND_1), be(12, BACKEND_2)],
        );
        s.flags |= service_flags::AFFINITY;
        s.affinity_timeout_sec = 2;
        dp.add_service(&s);
        let odd = sa("10.244.9.9:8080");
        // Id 13 was reused by another service port.
        dp.put_backend(13, odd, PROTO_TCP, backend_flags::IN_CLUSTER_SET, 2);
        // Id 14 is an endpoint of this port, but only in its node-local set
        // (the cluster-wide set follows topology hints, E6).
        dp.put_backend(14, odd, PROTO_TCP, backend_flags::IN_LOCAL_SET, 1);
        // Id 15 is still this port's, in no set (terminating, not needed as
        // a fallback, E3).
        dp.put_backend(
            15,
            odd,
            PROTO_TCP,
            backend_flags::TERMINATING | backend_flags::LOCAL,
            1,
        );
        let client = Ipv4Addr::new(10, 244, 0, 5);
        let akey = AffinityKey {
            client_addr: net(client),
            service_id: 1,
        };
        let now = boot_ns();
        // (remembered backend, last used, honoured, stale)
        let cases = [
            (12u32, now, true, false),
            (13, now, false, true),
            (14, now, false, true),
            (15, now, false, true),
            (999, now, false, true),
            // Expired: a normal new choice, not stale.
            (13, now - 5_000_000_000, false, false),
        ];
        let mut stale = 0;
        for (i, (backend_id, last_used_ns, honoured, is_stale)) in cases.into_iter().enumerate() {
            dp.affinity()
                .insert(
                    akey,
                    AffinityValue {
                        backend_id,
                        _pad: 0,
                        last_used_ns,
                    },
                    0,
                )
                .unwrap();
            let c = SocketAddrV4::new(client, 42000 + i as u16);
            let t0 = boot_ns();
            let r = dp.run(POD_INGRESS, &tcp(c, sa(VIP), TCP_SYN).build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let to = tuple(&r.out).dst;
            let a = dp.affinity().get(&akey, 0).unwrap();
            assert!(a.last_used_ns >= t0, "affinity entry not refreshed");
            let fwd = dp
                .ct(&ct_key(c, sa(VIP), PROTO_TCP, CT_DIR_FORWARD))
                .unwrap();
            if honoured {
                assert_eq!((to, a.backend_id), (sa(BACKEND_2), 12));
            } else {
                // A live member of the set, and the entry now names it.
                assert!(
                    [sa(BACKEND_1), sa(BACKEND_2)].contains(&to),
                    "case {i}: sent to {to}"
                );
                assert!([11, 12].contains(&a.backend_id), "case {i}");
            }
            assert_eq!(fwd.backend_id, a.backend_id);
            if is_stale {
                stale += 1;
            }
        }
        dp.assert_stats(&[
            (StatReason::Packets, cases.len() as u64),
            (StatReason::NewFlow, cases.len() as u64),
            (StatReason::AffinityStale, stale),
            (StatReason::PassTranslated, 6),
        ]);
    });
}

#[test]
fn c6_affinity_checks_the_set_in_use() {
    // The same remembered backend is good for the cluster-wide set and
    // stale for the node-local set (externalTrafficPolicy=Local from
    // outside, M3).
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let mut s = etp_local(&mut dp);
        s.flags |= service_flags::AFFINITY;
        s.affinity_timeout_sec = 10800;
        dp.add_service(&s);
        let np = SocketAddrV4::new(NODE, 30080);
        let remote = 51; // cluster set only
        for (prog, client, stale) in [
            (POD_INGRESS, sa(CLIENT), false),
            (UPLINK_INGRESS, sa(EXTERNAL), true),
        ] {
            let akey = AffinityKey {
                client_addr: net(*client.ip()),
                service_id: 5,
            };
            dp.affinity()
                .insert(
                    akey,
                    AffinityValue {
                        backend_id: remote,
                        _pad: 0,
                        last_used_ns: boot_ns(),
                    },
                    0,
                )
                .unwrap();
            let r = dp.run(prog, &tcp(client, np, TCP_SYN).build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let (to, id) = if stale {
                (sa("10.244.0.52:8080"), 52)
            } else {
                (sa(BACKEND_1), remote)
            };
            assert_eq!(tuple(&r.out).dst, to, "{prog}");
            assert_eq!(dp.affinity().get(&akey, 0).unwrap().backend_id, id);
        }
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 2),
            (StatReason::AffinityStale, 1),
            (StatReason::PassTranslated, 2),
        ]);
    });
}

// ---------------------------------------------------------------------------
// E4: UDP flows follow membership exactly; TCP flows stay
// ---------------------------------------------------------------------------

#[test]
fn e4_udp_flow_moves_when_its_backend_leaves_the_port() {
    require_privileges!();
    in_private_netns(|| {
        let dns = sa("10.96.0.10:53");
        let (a, b) = (sa("10.244.3.3:5353"), sa("10.244.4.4:5353"));
        // How the backend of an open flow changes; whether the flow moves.
        type Change = fn(&mut Datapath);
        let cases: [(&str, Change, bool); 5] = [
            (
                "id reused by another service port",
                |dp| {
                    dp.put_backend(
                        70,
                        sa("10.244.3.3:5353"),
                        PROTO_UDP,
                        backend_flags::IN_CLUSTER_SET,
                        8,
                    )
                },
                true,
            ),
            (
                "in neither set any more",
                |dp| dp.put_backend(70, sa("10.244.3.3:5353"), PROTO_UDP, 0, 7),
                true,
            ),
            (
                "id names another endpoint",
                |dp| {
                    dp.put_backend(
                        70,
                        sa("10.244.3.4:5353"),
                        PROTO_UDP,
                        backend_flags::IN_CLUSTER_SET,
                        7,
                    )
                },
                true,
            ),
            (
                "left the cluster set, still in the local set",
                |dp| {
                    dp.put_backend(
                        70,
                        sa("10.244.3.3:5353"),
                        PROTO_UDP,
                        backend_flags::IN_LOCAL_SET,
                        7,
                    )
                },
                false,
            ),
            ("unchanged", |_| {}, false),
        ];
        for (what, change, moves) in cases {
            let mut dp = Datapath::load();
            dp.add_service(&ServiceEntry::cluster_ip(
                7,
                dns,
                PROTO_UDP,
                vec![be(70, "10.244.3.3:5353")],
            ));
            let tq = tcp(sa(CLIENT), dns, TCP_SYN);
            // The same backend id for a TCP port (id 70 serves both in this
            // test; TCP must never move).
            dp.add_frontend(
                exact_key(dns, PROTO_TCP),
                ServiceValue {
                    service_id: 7,
                    backend_count: 1,
                    flags: service_flags::CLUSTER_IP,
                    ..ServiceValue::default()
                },
            );
            let q = udp(sa(CLIENT), dns);
            let r = dp.run(POD_INGRESS, &q.build());
            assert_frame_eq(&r.out, &q.clone().with_destination(a).build());
            let r = dp.run(POD_INGRESS, &tq.build());
            assert_eq!(tuple(&r.out).dst, a);
            // The port's slot now holds backend 71 at `b`.
            dp.put_backend(71, b, PROTO_UDP, backend_flags::IN_CLUSTER_SET, 7);
            dp.set_slot(7, 0, 71);
            change(&mut dp);
            let r = dp.run(POD_INGRESS, &q.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let to = if moves { b } else { a };
            assert_frame_eq(&r.out, &q.clone().with_destination(to).build());
            assert_eq!(
                backend_of(&mut dp, sa(CLIENT), dns, PROTO_UDP),
                to,
                "{what}"
            );
            let data = tcp(sa(CLIENT), dns, TCP_ACK);
            let r = dp.run(POD_INGRESS, &data.build());
            assert_frame_eq(&r.out, &data.with_destination(a).build());
            let mut want = vec![
                (StatReason::Packets, 4),
                (StatReason::NewFlow, 2),
                (StatReason::ForwardTranslated, 1),
                (StatReason::PassTranslated, 4),
            ];
            if moves {
                want.push((StatReason::FlowMoved, 1));
                want.push((StatReason::NewFlow, 1));
            } else {
                want.push((StatReason::ForwardTranslated, 1));
            }
            dp.assert_stats(&want);
        }
    });
}

// ---------------------------------------------------------------------------
// Masquerade as kube-proxy decides it: M2 (local backends too), M1, M4
// ---------------------------------------------------------------------------

/// A node in the current (private) netns: the uplink of `uplink_netns`
/// (192.0.2.1/24 on `up0`, gateway 192.0.2.3 for 198.51.100.0/24) and a
/// `cni0` bridge 10.244.0.1/24 with one pod veth `vpod0` (peer `vpod1`).
/// The pod 10.244.0.52 has a permanent neighbour entry on cni0 when
/// `pod_neighbour`.
struct Node {
    up0: u32,
    up0_mac: [u8; 6],
    cni0_mac: [u8; 6],
    vpod0: u32,
}

const POD_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x52];
const GW_MAC: [u8; 6] = [2, 0, 0, 0, 2, 3];
const LOCAL_BACKEND: &str = "10.244.0.52:8080";

fn node_netns(pod_neighbour: bool) -> Node {
    sh(&["ip", "link", "add", "cni0", "type", "bridge"]);
    sh(&[
        "ip", "link", "add", "vpod0", "type", "veth", "peer", "name", "vpod1",
    ]);
    sh(&["ip", "link", "set", "vpod0", "master", "cni0"]);
    sh(&["ip", "addr", "add", "10.244.0.1/24", "dev", "cni0"]);
    for l in ["cni0", "vpod0", "vpod1"] {
        sh(&["ip", "link", "set", l, "up"]);
    }
    if pod_neighbour {
        sh(&[
            "ip",
            "neigh",
            "replace",
            "10.244.0.52",
            "lladdr",
            "02:00:00:00:00:52",
            "dev",
            "cni0",
            "nud",
            "permanent",
        ]);
    }
    // Sets forwarding on every interface, the ones above included.
    let (up0, up0_mac) = uplink_netns(true);
    Node {
        up0,
        up0_mac,
        cni0_mac: mac_of("cni0"),
        vpod0: ifindex("vpod0"),
    }
}

/// A NodePort service (externalTrafficPolicy Cluster) whose only backend is
/// a pod on this node.
fn local_nodeport(dp: &mut Datapath) {
    dp.add_node_addr(NODE);
    let mut s = ServiceEntry::cluster_ip(4, sa(VIP), PROTO_TCP, vec![local_be(41, LOCAL_BACKEND)]);
    s.node_port = Some(30080);
    s.local = vec![local_be(41, LOCAL_BACKEND)];
    dp.add_service(&s);
}

/// The FORWARD and REPLY entries of a SNAT'ed flow `client -> fe` to
/// `backend`, SNAT'ed to `snat_ip`, after its SYN; returns the SNAT port.
fn assert_snat_flow(
    dp: &mut Datapath,
    client: SocketAddrV4,
    fe: SocketAddrV4,
    backend: (u32, SocketAddrV4),
    service_id: u32,
    snat_ip: Ipv4Addr,
    t0: u64,
) -> u16 {
    let fwd = dp
        .ct(&ct_key(client, fe, PROTO_TCP, CT_DIR_FORWARD))
        .expect("forward entry");
    let port = u16::from_be(fwd.snat_port);
    let cfg = DatapathConfig::DEFAULT;
    assert!((cfg.snat_port_min..=cfg.snat_port_max).contains(&port));
    let snat = SocketAddrV4::new(snat_ip, port);
    let flags = ct_flags::SNAT | ct_flags::TCP_SYN;
    assert_entry(
        &fwd,
        &Ct {
            nat: backend.1,
            snat: Some(snat),
            backend_id: backend.0,
            service_id,
            flags,
        },
        t0,
    );
    let rev = dp
        .ct(&ct_key(backend.1, snat, PROTO_TCP, CT_DIR_REPLY))
        .expect("reply entry keyed by the SNAT address and port");
    assert_entry(
        &rev,
        &Ct {
            nat: fe,
            snat: Some(client),
            backend_id: backend.0,
            service_id,
            flags,
        },
        t0,
    );
    port
}

#[test]
fn m2_nodeport_etp_cluster_to_a_local_backend_is_snated_and_redirected_to_the_pod() {
    // kube-proxy masquerades all externalTrafficPolicy=Cluster traffic, to a
    // local endpoint too: the backend sees the node, not the client. The
    // SNAT'ed packet has a node address as source, so the stack would drop
    // it as martian: the datapath forwards it to the pod itself (the FIB
    // lookup from the uplink gives cni0 and the pod's MAC), and the pod's
    // reply is caught at the pod's own interface (TC ingress) and sent back
    // out of the uplink.
    require_privileges!();
    in_private_netns(|| {
        let n = node_netns(true);
        let mut dp = Datapath::load();
        local_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let backend = sa(LOCAL_BACKEND);
        let syn = tcp(sa(EXTERNAL), fe, TCP_SYN).with_macs(n.up0_mac, GW_MAC);
        let t0 = boot_ns();
        let r = dp.run_on(UPLINK_INGRESS, &syn.build(), n.up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = assert_snat_flow(&mut dp, sa(EXTERNAL), fe, (41, backend), 4, NODE, t0);
        let snat = SocketAddrV4::new(NODE, port);
        let to_pod = tcp(snat, backend, TCP_SYN)
            .with_ttl(63)
            .with_macs(POD_MAC, n.cni0_mac);
        assert_frame_eq(&r.out, &to_pod.build());

        // On its way to the pod it crosses the pod's TC egress: untouched.
        let r = dp.run_on(POD_EGRESS, &to_pod.build(), n.vpod0);
        assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &to_pod.build()));

        // The pod answers the node address; its interface's TC ingress
        // reverses both translations and sends the reply out of the uplink.
        let syn_ack = tcp(backend, snat, TCP_SYN | TCP_ACK).with_macs(n.cni0_mac, POD_MAC);
        let r = dp.run_on(POD_INGRESS, &syn_ack.build(), n.vpod0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let out = tcp(fe, sa(EXTERNAL), TCP_SYN | TCP_ACK)
            .with_ttl(63)
            .with_macs(GW_MAC, n.up0_mac);
        assert_frame_eq(&r.out, &out.build());
        // Leaving the uplink (TC egress): untouched.
        let r = dp.run_on(UPLINK_EGRESS, &out.build(), n.up0);
        assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &out.build()));

        // The client's ACK: known flow, same SNAT, to the pod again.
        let ack = tcp(sa(EXTERNAL), fe, TCP_ACK).with_macs(n.up0_mac, GW_MAC);
        let r = dp.run_on(UPLINK_INGRESS, &ack.build(), n.up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let want = tcp(snat, backend, TCP_ACK)
            .with_ttl(63)
            .with_macs(POD_MAC, n.cni0_mac);
        assert_frame_eq(&r.out, &want.build());
        let est =
            ct_flags::SNAT | ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        let fwd = dp
            .ct(&ct_key(sa(EXTERNAL), fe, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        let rev = dp
            .ct(&ct_key(backend, snat, PROTO_TCP, CT_DIR_REPLY))
            .unwrap();
        assert_eq!((fwd.flags, rev.flags), (est, est));
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 5),
            (StatReason::NewFlow, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::Redirected, 3),
            (StatReason::PassNotService, 2),
        ]);
    });
}

#[test]
fn m2_local_backend_without_a_pod_neighbour_uses_redirect_neigh() {
    require_privileges!();
    in_private_netns(|| {
        let n = node_netns(false);
        let mut dp = Datapath::load();
        local_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let t0 = boot_ns();
        let r = dp.run_on(
            UPLINK_INGRESS,
            &tcp(sa(EXTERNAL), fe, TCP_SYN).build(),
            n.up0,
        );
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = assert_snat_flow(
            &mut dp,
            sa(EXTERNAL),
            fe,
            (41, sa(LOCAL_BACKEND)),
            4,
            NODE,
            t0,
        );
        // Translated; the MACs are left to the kernel's neighbour layer.
        let want = tcp(SocketAddrV4::new(NODE, port), sa(LOCAL_BACKEND), TCP_SYN).with_ttl(63);
        assert_frame_eq(&r.out, &want.build());
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
            (StatReason::Redirected, 1),
        ]);
    });
}

#[test]
fn m2_external_ip_and_lb_ip_to_a_local_backend_snat_to_the_uplink_address() {
    require_privileges!();
    in_private_netns(|| {
        let n = node_netns(true);
        let mut dp = Datapath::load();
        dp.set_uplink_addr(n.up0, NODE);
        let ext_ip = sa("203.0.113.12:80");
        let mut s =
            ServiceEntry::cluster_ip(4, sa(VIP), PROTO_TCP, vec![local_be(41, LOCAL_BACKEND)]);
        s.external_ips = vec![ext_ip];
        s.lb_ips = vec![sa(LB_IP)];
        dp.add_service(&s);
        for (i, fe) in [ext_ip, sa(LB_IP)].into_iter().enumerate() {
            let client = SocketAddrV4::new(*sa(EXTERNAL).ip(), 51000 + i as u16);
            let t0 = boot_ns();
            let r = dp.run_on(UPLINK_INGRESS, &tcp(client, fe, TCP_SYN).build(), n.up0);
            assert_eq!(r.ret, TC_ACT_REDIRECT, "{fe}");
            let port = assert_snat_flow(&mut dp, client, fe, (41, sa(LOCAL_BACKEND)), 4, NODE, t0);
            let snat = SocketAddrV4::new(NODE, port);
            let want = tcp(snat, sa(LOCAL_BACKEND), TCP_SYN)
                .with_ttl(63)
                .with_macs(POD_MAC, n.cni0_mac);
            assert_frame_eq(&r.out, &want.build());
            // The reply leaves with the frontend it was sent to as source.
            let reply = tcp(sa(LOCAL_BACKEND), snat, TCP_SYN | TCP_ACK);
            let r = dp.run_on(POD_INGRESS, &reply.build(), n.vpod0);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            let want = tcp(fe, client, TCP_SYN | TCP_ACK)
                .with_ttl(63)
                .with_macs(GW_MAC, n.up0_mac);
            assert_frame_eq(&r.out, &want.build());
        }
        dp.assert_stats(&[
            (StatReason::Packets, 4),
            (StatReason::NewFlow, 2),
            (StatReason::ReplyTranslated, 2),
            (StatReason::Redirected, 4),
        ]);
    });
}

#[test]
fn m3_etp_local_keeps_the_client_address_and_passes_to_the_stack() {
    // externalTrafficPolicy=Local: no SNAT, the local backend sees the
    // client; the packet goes up the stack (not redirected).
    require_privileges!();
    in_private_netns(|| {
        let n = node_netns(true);
        let mut dp = Datapath::load();
        etp_local(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let syn = tcp(sa(EXTERNAL), fe, TCP_SYN);
        let r = dp.run_on(UPLINK_INGRESS, &syn.build(), n.up0);
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(
            &r.out,
            &syn.with_destination(sa("10.244.0.52:8080")).build(),
        );
        let fwd = dp
            .ct(&ct_key(sa(EXTERNAL), fe, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        assert_eq!(fwd.flags & ct_flags::SNAT, 0);
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
            (StatReason::PassTranslated, 1),
        ]);
    });
}

#[test]
fn m1_cluster_ip_from_outside_the_cluster_cidr_is_snated() {
    require_privileges!();
    in_private_netns(|| {
        let n = node_netns(true);
        let cidr = DatapathConfig {
            cluster_cidr_addr: net(Ipv4Addr::new(10, 244, 0, 0)),
            cluster_cidr_mask: net(Ipv4Addr::new(255, 255, 0, 0)),
            ..DatapathConfig::DEFAULT
        };
        let outside = sa(EXTERNAL);
        let inside = sa("10.244.2.7:40000");
        // (config, client, SNAT'ed)
        for (cfg, client, snat) in [
            (cidr, outside, true),
            (cidr, inside, false),
            // No --cluster-cidr: kube-proxy does not masquerade it either.
            (DatapathConfig::DEFAULT, outside, false),
        ] {
            let mut dp = Datapath::load_with(cfg);
            dp.set_uplink_addr(n.up0, NODE);
            dp.add_service(&ServiceEntry::cluster_ip(
                4,
                sa(VIP),
                PROTO_TCP,
                vec![local_be(41, LOCAL_BACKEND)],
            ));
            let syn = tcp(client, sa(VIP), TCP_SYN);
            let t0 = boot_ns();
            let r = dp.run_on(UPLINK_INGRESS, &syn.build(), n.up0);
            if snat {
                assert_eq!(r.ret, TC_ACT_REDIRECT);
                // The ClusterIP is no node address: the uplink's address.
                let port = assert_snat_flow(
                    &mut dp,
                    client,
                    sa(VIP),
                    (41, sa(LOCAL_BACKEND)),
                    4,
                    NODE,
                    t0,
                );
                let want = tcp(SocketAddrV4::new(NODE, port), sa(LOCAL_BACKEND), TCP_SYN)
                    .with_ttl(63)
                    .with_macs(POD_MAC, n.cni0_mac);
                assert_frame_eq(&r.out, &want.build());
                dp.assert_stats(&[
                    (StatReason::Packets, 1),
                    (StatReason::NewFlow, 1),
                    (StatReason::Redirected, 1),
                ]);
            } else {
                assert_eq!(r.ret, TC_ACT_UNSPEC);
                assert_frame_eq(&r.out, &syn.with_destination(sa(LOCAL_BACKEND)).build());
                dp.assert_stats(&[
                    (StatReason::Packets, 1),
                    (StatReason::NewFlow, 1),
                    (StatReason::PassTranslated, 1),
                ]);
            }
        }
        // A remote backend is SNAT'ed from inside the CIDR too (as before:
        // its reply would otherwise bypass this node).
        let mut dp = Datapath::load_with(cidr);
        dp.set_uplink_addr(n.up0, NODE);
        dp.add_service(&ServiceEntry::cluster_ip(
            4,
            sa(VIP),
            PROTO_TCP,
            vec![be(42, BACKEND_2)],
        ));
        let r = dp.run_on(
            UPLINK_INGRESS,
            &tcp(inside, sa(VIP), TCP_SYN).build(),
            n.up0,
        );
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = assert_snat_flow(&mut dp, inside, sa(VIP), (42, sa(BACKEND_2)), 4, NODE, 0);
        let want = tcp(SocketAddrV4::new(NODE, port), sa(BACKEND_2), TCP_SYN)
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 2], n.up0_mac);
        assert_frame_eq(&r.out, &want.build());
    });
}

/// A pod that is the only backend of its own Service.
const SELF: &str = "10.244.0.5:8080";

#[test]
fn m4_pod_reaching_itself_through_its_service_is_hairpinned() {
    require_privileges!();
    in_private_netns(|| {
        for hairpin in [
            DatapathConfig::DEFAULT.hairpin_addr,
            // kube-proxy's choice: the bridge's own address.
            net(Ipv4Addr::new(10, 244, 0, 1)),
        ] {
            let cfg = DatapathConfig {
                hairpin_addr: hairpin,
                ..DatapathConfig::DEFAULT
            };
            let hairpin = Ipv4Addr::from(hairpin.to_ne_bytes());
            let mut dp = Datapath::load_with(cfg);
            dp.add_service(&ServiceEntry::cluster_ip(
                3,
                sa(VIP),
                PROTO_TCP,
                vec![local_be(31, SELF)],
            ));
            let veth = 1; // any existing interface; the redirect is not run
            let syn = tcp(sa(CLIENT), sa(VIP), TCP_SYN);
            let t0 = boot_ns();
            let r = dp.run_on(POD_INGRESS, &syn.build(), veth);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            let port =
                assert_snat_flow(&mut dp, sa(CLIENT), sa(VIP), (31, sa(SELF)), 3, hairpin, t0);
            let h = SocketAddrV4::new(hairpin, port);
            // Straight back to the pod: from the hairpin address, MACs
            // swapped (from its gateway to itself), TTL - 1.
            let back = tcp(h, sa(SELF), TCP_SYN)
                .with_ttl(63)
                .with_macs(MAC_A, MAC_B);
            assert_frame_eq(&r.out, &back.build());
            // Delivered through the pod's TC egress: untouched.
            let r = dp.run_on(POD_EGRESS, &back.build(), veth);
            assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &back.build()));

            // The pod answers the hairpin address (through its gateway);
            // the answer comes back from the ClusterIP.
            let syn_ack = tcp(sa(SELF), h, TCP_SYN | TCP_ACK);
            let r = dp.run_on(POD_INGRESS, &syn_ack.build(), veth);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            let want = tcp(sa(VIP), sa(CLIENT), TCP_SYN | TCP_ACK)
                .with_ttl(63)
                .with_macs(MAC_A, MAC_B);
            assert_frame_eq(&r.out, &want.build());

            // Known flow: the ACK takes the same way.
            let ack = tcp(sa(CLIENT), sa(VIP), TCP_ACK);
            let r = dp.run_on(POD_INGRESS, &ack.build(), veth);
            assert_eq!(r.ret, TC_ACT_REDIRECT);
            let want = tcp(h, sa(SELF), TCP_ACK)
                .with_ttl(63)
                .with_macs(MAC_A, MAC_B);
            assert_frame_eq(&r.out, &want.build());
            assert_eq!(dp.ct_all().len(), 2);
            dp.assert_stats(&[
                (StatReason::Packets, 4),
                (StatReason::NewFlow, 1),
                (StatReason::ForwardTranslated, 1),
                (StatReason::ReplyTranslated, 1),
                (StatReason::Redirected, 3),
                (StatReason::PassNotService, 1),
            ]);
        }
    });
}

#[test]
fn m4_hairpin_udp_and_other_pods_are_not_hairpinned() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let dns = sa("10.96.0.10:53");
        let me = sa("10.244.0.5:5353");
        dp.add_service(&ServiceEntry::cluster_ip(
            3,
            dns,
            PROTO_UDP,
            vec![local_be(31, "10.244.0.5:5353")],
        ));
        let hairpin = Ipv4Addr::new(169, 254, 42, 1);
        let q = udp(sa(CLIENT), dns);
        let r = dp.run(POD_INGRESS, &q.build());
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let t = tuple(&r.out);
        assert_eq!((*t.src.ip(), t.dst), (hairpin, me));
        let back = q
            .clone()
            .with_source(t.src)
            .with_destination(me)
            .with_ttl(63)
            .with_macs(MAC_A, MAC_B);
        assert_frame_eq(&r.out, &back.build());
        let a = udp(me, t.src);
        let r = dp.run(POD_INGRESS, &a.build());
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let want = a
            .with_source(dns)
            .with_destination(sa(CLIENT))
            .with_ttl(63)
            .with_macs(MAC_A, MAC_B);
        assert_frame_eq(&r.out, &want.build());
        // Another pod reaching the same backend: plain DNAT (F1).
        let other = sa("10.244.0.6:40000");
        let q = udp(other, dns);
        let r = dp.run(POD_INGRESS, &q.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &q.with_destination(me).build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 2),
            (StatReason::ReplyTranslated, 1),
            (StatReason::Redirected, 2),
            (StatReason::PassTranslated, 1),
        ]);
    });
}

#[test]
fn snat_reply_lookup_happens_only_for_ports_in_the_snat_range() {
    // The pod hook looks for SNAT'ed replies only when the destination port
    // is a SNAT port (every such reply has one), so ordinary pod traffic
    // pays nothing; the uplink does the same. A SNAT entry keyed outside the
    // range (which the datapath never writes) is therefore never used.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let entry = ConntrackEntry {
            nat_addr: net(*sa(VIP).ip()),
            nat_port: nport(80),
            snat_addr: net(*sa(CLIENT).ip()),
            snat_port: nport(40000),
            backend_id: 11,
            service_id: 1,
            flags: ct_flags::SNAT,
            last_seen_ns: boot_ns(),
            ..ConntrackEntry::default()
        };
        let outside = SocketAddrV4::new(NODE, 5000);
        dp.ct_insert(
            ct_key(sa(BACKEND_1), outside, PROTO_TCP, CT_DIR_REPLY),
            entry,
        );
        let inside = SocketAddrV4::new(NODE, 61000);
        let mut n = 0;
        for f in [
            tcp(sa(BACKEND_1), outside, TCP_SYN | TCP_ACK).build(),
            tcp(sa(BACKEND_1), inside, TCP_SYN | TCP_ACK).build(),
        ] {
            for prog in [POD_INGRESS, UPLINK_INGRESS] {
                let r = dp.run(prog, &f);
                assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &f), "{prog}");
                n += 1;
            }
        }
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassNotService, n)]);
    });
}

// ---------------------------------------------------------------------------
// C1: one flow, one lifetime (both directions live, die and are repaired
// together)
// ---------------------------------------------------------------------------

/// A UDP flow CLIENT -> 10.96.0.10:53 -> 10.244.3.3:5353 after its first
/// query; returns (forward key, reply key).
fn dns_flow(dp: &mut Datapath) -> (ConntrackKey, ConntrackKey) {
    let dns = sa("10.96.0.10:53");
    dp.add_service(&ServiceEntry::cluster_ip(
        7,
        dns,
        PROTO_UDP,
        vec![be(70, "10.244.3.3:5353")],
    ));
    let r = dp.run(POD_INGRESS, &udp(sa(CLIENT), dns).build());
    assert_eq!(r.ret, TC_ACT_UNSPEC);
    (
        ct_key(sa(CLIENT), dns, PROTO_UDP, CT_DIR_FORWARD),
        ct_key(sa("10.244.3.3:5353"), sa(CLIENT), PROTO_UDP, CT_DIR_REPLY),
    )
}

/// Sets the `last_seen_ns` of the entry under `key`.
fn age(dp: &mut Datapath, key: ConntrackKey, last_seen_ns: u64) {
    let mut e = dp.ct(&key).expect("entry to age");
    e.last_seen_ns = last_seen_ns;
    dp.ct_insert(key, e);
}

#[test]
fn c1_replies_refresh_both_directions_and_keep_the_flow_alive() {
    // One query, then only answers (a backend streaming to a client that
    // sent once): every answer refreshes the FORWARD entry too, and a
    // FORWARD entry that is idle while its REPLY entry is not is alive.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load_with(DatapathConfig {
            ct_udp_ns: 5_000_000_000,
            ..DatapathConfig::DEFAULT
        });
        let (fkey, rkey) = dns_flow(&mut dp);
        let long_ago = boot_ns() - 60_000_000_000;
        age(&mut dp, fkey, long_ago);
        age(&mut dp, rkey, long_ago);
        let answer = udp(sa("10.244.3.3:5353"), sa(CLIENT));
        let t0 = boot_ns();
        let r = dp.run(POD_EGRESS, &answer.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &answer.with_source(sa("10.96.0.10:53")).build());
        for k in [fkey, rkey] {
            let e = dp.ct(&k).unwrap();
            assert!(e.last_seen_ns >= t0, "{k:?} not refreshed by the reply");
            assert_eq!(e.flags, ct_flags::SEEN_REPLY);
        }
        // The FORWARD entry idle past the UDP lifetime, its REPLY entry
        // fresh: the flow is alive, the client's next query keeps its
        // backend (no re-creation).
        age(&mut dp, fkey, long_ago);
        let q = udp(sa(CLIENT), sa("10.96.0.10:53"));
        let r = dp.run(POD_INGRESS, &q.build());
        assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());
        assert!(dp.ct(&fkey).unwrap().last_seen_ns >= t0);
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

#[test]
fn c1_a_flow_expires_only_when_both_directions_are_idle() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load_with(DatapathConfig {
            ct_udp_ns: 5_000_000_000,
            ..DatapathConfig::DEFAULT
        });
        let (fkey, rkey) = dns_flow(&mut dp);
        let long_ago = boot_ns() - 60_000_000_000;
        age(&mut dp, fkey, long_ago);
        age(&mut dp, rkey, long_ago);
        // Both idle: the next query is a new flow (same key, re-created).
        let q = udp(sa(CLIENT), sa("10.96.0.10:53"));
        let t0 = boot_ns();
        let r = dp.run(POD_INGRESS, &q.build());
        assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());
        for k in [fkey, rkey] {
            assert!(dp.ct(&k).unwrap().last_seen_ns >= t0);
        }
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 2),
            (StatReason::ConntrackExpired, 1),
            (StatReason::PassTranslated, 2),
        ]);
    });
}

#[test]
fn c1_a_tcp_flow_idle_past_the_transient_timeout_lives_when_established() {
    // Established: the long lifetime applies, read from both entries'
    // state; a flow that never completed its handshake gets the short one.
    require_privileges!();
    in_private_netns(|| {
        let mut dp =
            Datapath::load_with(DatapathConfig::DEFAULT.with_tcp_transient_ns(5_000_000_000));
        web(&mut dp);
        let fkey = ct_key(sa(CLIENT), sa(VIP), PROTO_TCP, CT_DIR_FORWARD);
        let rkey = ct_key(sa(BACKEND_1), sa(CLIENT), PROTO_TCP, CT_DIR_REPLY);
        dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        dp.run(
            POD_EGRESS,
            &tcp(sa(BACKEND_1), sa(CLIENT), TCP_SYN | TCP_ACK).build(),
        );
        dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_ACK).build());
        let est = ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        assert_eq!(dp.ct(&fkey).unwrap().flags, est);
        assert_eq!(dp.ct(&rkey).unwrap().flags, est);
        let idle = boot_ns() - 20_000_000_000; // 20 s: > transient, < established
        age(&mut dp, fkey, idle);
        age(&mut dp, rkey, idle);
        let data = tcp(sa(CLIENT), sa(VIP), TCP_ACK | TCP_PSH);
        let r = dp.run(POD_INGRESS, &data.build());
        assert_frame_eq(&r.out, &data.with_destination(sa(BACKEND_1)).build());
        // A half-open one (SYN only) idle as long is over.
        let other = sa("10.244.0.5:40001");
        dp.run(POD_INGRESS, &tcp(other, sa(VIP), TCP_SYN).build());
        let okey = ct_key(other, sa(VIP), PROTO_TCP, CT_DIR_FORWARD);
        age(&mut dp, okey, idle);
        age(
            &mut dp,
            ct_key(sa(BACKEND_1), other, PROTO_TCP, CT_DIR_REPLY),
            idle,
        );
        dp.run(POD_INGRESS, &tcp(other, sa(VIP), TCP_SYN).build());
        dp.assert_stats(&[
            (StatReason::Packets, 6),
            (StatReason::NewFlow, 3),
            (StatReason::ForwardTranslated, 2),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ConntrackExpired, 1),
            (StatReason::PassTranslated, 6),
        ]);
    });
}

#[test]
fn c1_a_lost_reply_entry_is_repaired_by_the_next_forward_packet() {
    // LRU pressure (or the GC) took one direction: the next packet in the
    // other direction re-creates it exactly, and the flow goes on.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let (fkey, rkey) = dns_flow(&mut dp);
        let want = dp.ct(&rkey).unwrap();
        dp.conntrack().remove(&rkey).unwrap();
        let q = udp(sa(CLIENT), sa("10.96.0.10:53"));
        let t0 = boot_ns();
        let r = dp.run(POD_INGRESS, &q.build());
        assert_frame_eq(
            &r.out,
            &q.clone().with_destination(sa("10.244.3.3:5353")).build(),
        );
        let repaired = dp.ct(&rkey).expect("the REPLY entry is back");
        assert_eq!(
            ConntrackEntry {
                last_seen_ns: 0,
                ..repaired
            },
            ConntrackEntry {
                last_seen_ns: 0,
                ..want
            }
        );
        assert!(repaired.last_seen_ns >= t0);
        // The answer is translated again.
        let answer = udp(sa("10.244.3.3:5353"), sa(CLIENT));
        let r = dp.run(POD_EGRESS, &answer.build());
        assert_frame_eq(&r.out, &answer.with_source(sa("10.96.0.10:53")).build());

        // The other way round: the FORWARD entry lost, an answer repairs it.
        let want = dp.ct(&fkey).unwrap();
        dp.conntrack().remove(&fkey).unwrap();
        let answer = udp(sa("10.244.3.3:5353"), sa(CLIENT));
        let r = dp.run(POD_EGRESS, &answer.build());
        assert_frame_eq(&r.out, &answer.with_source(sa("10.96.0.10:53")).build());
        let repaired = dp.ct(&fkey).expect("the FORWARD entry is back");
        assert_eq!(
            ConntrackEntry {
                last_seen_ns: 0,
                ..repaired
            },
            ConntrackEntry {
                last_seen_ns: 0,
                ..want
            }
        );
        // The next query uses it (no new flow).
        let r = dp.run(POD_INGRESS, &q.build());
        assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 5),
            (StatReason::NewFlow, 1),
            (StatReason::ForwardTranslated, 2),
            (StatReason::ReplyTranslated, 2),
            (StatReason::ConntrackPeerMissing, 2),
            (StatReason::ConntrackRepaired, 2),
            (StatReason::PassTranslated, 5),
        ]);
    });
}

#[test]
fn c1_a_lost_half_of_a_snat_flow_is_repaired_on_the_uplink() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, up0_mac) = uplink_netns(true);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let t0 = boot_ns();
        let r = dp.run_on(UPLINK_INGRESS, &tcp(sa(EXTERNAL), fe, TCP_SYN).build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = assert_snat_entries(&mut dp, t0, &DatapathConfig::DEFAULT);
        let snat = SocketAddrV4::new(NODE, port);
        let fkey = ct_key(sa(EXTERNAL), fe, PROTO_TCP, CT_DIR_FORWARD);
        let rkey = ct_key(sa(BACKEND_2), snat, PROTO_TCP, CT_DIR_REPLY);
        let (f0, r0) = (dp.ct(&fkey).unwrap(), dp.ct(&rkey).unwrap());

        // The REPLY entry lost: the client's next segment re-creates it.
        dp.conntrack().remove(&rkey).unwrap();
        let r = dp.run_on(UPLINK_INGRESS, &tcp(sa(EXTERNAL), fe, TCP_SYN).build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert_eq!(tuple(&r.out).src, snat, "same SNAT port");
        assert_eq!(
            (
                dp.ct(&rkey).unwrap().nat_addr,
                dp.ct(&rkey).unwrap().snat_port
            ),
            (r0.nat_addr, r0.snat_port)
        );
        // The FORWARD entry lost: the backend's answer re-creates it and is
        // translated back to the client.
        dp.conntrack().remove(&fkey).unwrap();
        let syn_ack =
            tcp(sa(BACKEND_2), snat, TCP_SYN | TCP_ACK).with_macs(up0_mac, [2, 0, 0, 0, 2, 2]);
        let r = dp.run_on(UPLINK_INGRESS, &syn_ack.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let want = tcp(fe, sa(EXTERNAL), TCP_SYN | TCP_ACK)
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 3], up0_mac);
        assert_frame_eq(&r.out, &want.build());
        let f1 = dp.ct(&fkey).expect("FORWARD entry re-created");
        assert_eq!(
            (
                f1.nat_addr,
                f1.nat_port,
                f1.snat_addr,
                f1.snat_port,
                f1.backend_id
            ),
            (
                f0.nat_addr,
                f0.nat_port,
                f0.snat_addr,
                f0.snat_port,
                f0.backend_id
            )
        );
        assert_eq!(
            f1.flags,
            ct_flags::SNAT | ct_flags::TCP_SYN | ct_flags::SEEN_REPLY
        );
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ConntrackPeerMissing, 2),
            (StatReason::ConntrackRepaired, 2),
            (StatReason::Redirected, 3),
        ]);
    });
}

// ---------------------------------------------------------------------------
// C2: tuple clashes
// ---------------------------------------------------------------------------

/// Two service ports (ClusterIPs VIP_A and VIP_B) whose only backend is the
/// same endpoint.
const VIP_A: &str = "10.96.0.21:80";
const VIP_B: &str = "10.96.0.22:80";

fn two_frontends_one_backend(dp: &mut Datapath, proto: u8) {
    dp.add_service(&ServiceEntry::cluster_ip(
        21,
        sa(VIP_A),
        proto,
        vec![be(210, BACKEND_1)],
    ));
    dp.add_service(&ServiceEntry::cluster_ip(
        22,
        sa(VIP_B),
        proto,
        vec![be(220, BACKEND_1)],
    ));
}

fn frame(proto: u8, src: SocketAddrV4, dst: SocketAddrV4) -> Ipv4Frame {
    if proto == PROTO_TCP {
        tcp(src, dst, TCP_ACK | TCP_PSH)
    } else {
        udp(src, dst)
    }
}

#[test]
fn c2_one_client_port_to_two_frontends_of_one_backend_remaps_the_second() {
    require_privileges!();
    in_private_netns(|| {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut dp = Datapath::load();
            two_frontends_one_backend(&mut dp, proto);
            let cfg = DatapathConfig::DEFAULT;
            // The first flow: plain DNAT.
            let a = frame(proto, sa(CLIENT), sa(VIP_A));
            let r = dp.run(POD_INGRESS, &a.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(&r.out, &a.clone().with_destination(sa(BACKEND_1)).build());
            // The second: its reply tuple (backend -> client:40000) is the
            // first's: the client's source port is remapped, its address
            // kept (the backend still sees the pod).
            let b = frame(proto, sa(CLIENT), sa(VIP_B));
            let t0 = boot_ns();
            let r = dp.run(POD_INGRESS, &b.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let out = tuple(&r.out);
            let port = out.src.port();
            assert_eq!(*out.src.ip(), *sa(CLIENT).ip());
            assert!(
                (cfg.snat_port_min..=cfg.snat_port_max).contains(&port),
                "{port}"
            );
            let remapped = SocketAddrV4::new(*sa(CLIENT).ip(), port);
            assert_frame_eq(
                &r.out,
                &b.clone()
                    .with_source(remapped)
                    .with_destination(sa(BACKEND_1))
                    .build(),
            );
            let bits = ct_flags::SNAT | ct_flags::PORT_REMAP;
            assert_entry(
                &dp.ct(&ct_key(sa(CLIENT), sa(VIP_B), proto, CT_DIR_FORWARD))
                    .unwrap(),
                &Ct {
                    nat: sa(BACKEND_1),
                    snat: Some(remapped),
                    backend_id: 220,
                    service_id: 22,
                    flags: bits,
                },
                t0,
            );
            assert_entry(
                &dp.ct(&ct_key(sa(BACKEND_1), remapped, proto, CT_DIR_REPLY))
                    .unwrap(),
                &Ct {
                    nat: sa(VIP_B),
                    snat: Some(sa(CLIENT)),
                    backend_id: 220,
                    service_id: 22,
                    flags: bits,
                },
                t0,
            );
            // The first flow's REPLY entry is untouched.
            let ra = dp
                .ct(&ct_key(sa(BACKEND_1), sa(CLIENT), proto, CT_DIR_REPLY))
                .unwrap();
            assert_eq!((ra.nat_addr, ra.service_id), (net(*sa(VIP_A).ip()), 21));

            // Replies: each from its own frontend, to the client's own port.
            let reply_a = frame(proto, sa(BACKEND_1), sa(CLIENT));
            let r = dp.run(POD_EGRESS, &reply_a.build());
            assert_frame_eq(&r.out, &reply_a.with_source(sa(VIP_A)).build());
            let reply_b = frame(proto, sa(BACKEND_1), remapped);
            // On its way it crosses the backend's ingress (a port of the
            // SNAT range): not answered there.
            let r = dp.run(POD_INGRESS, &reply_b.build());
            assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &reply_b.build()));
            let r = dp.run(POD_EGRESS, &reply_b.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(
                &r.out,
                &reply_b
                    .with_source(sa(VIP_B))
                    .with_destination(sa(CLIENT))
                    .build(),
            );
            // The next packet of the second flow: the same remap.
            let r = dp.run(POD_INGRESS, &b.build());
            assert_frame_eq(
                &r.out,
                &b.with_source(remapped)
                    .with_destination(sa(BACKEND_1))
                    .build(),
            );
            assert_eq!(dp.ct_all().len(), 4);
            dp.assert_stats(&[
                (StatReason::Packets, 6),
                (StatReason::NewFlow, 2),
                (
                    StatReason::NewFlowWithoutSyn,
                    2 * u64::from(proto == PROTO_TCP),
                ),
                (StatReason::PortRemapped, 1),
                (StatReason::ReplyTranslated, 2),
                (StatReason::ForwardTranslated, 1),
                (StatReason::PassNotService, 1),
                (StatReason::PassTranslated, 5),
            ]);
        }
    });
}

#[test]
fn c2_one_client_port_to_a_frontend_and_to_its_backend_directly() {
    // The pod reaches the backend through the ClusterIP and directly from
    // the same source port (Linux allows it: two different 4-tuples). The
    // direct flow's replies would match the translated flow's REPLY key and
    // leave with the ClusterIP as source: instead its source port is
    // remapped (as netfilter does), and both keep working.
    require_privileges!();
    in_private_netns(|| {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut dp = Datapath::load();
            dp.add_service(&ServiceEntry::cluster_ip(
                1,
                sa(VIP),
                proto,
                vec![be(11, BACKEND_1)],
            ));
            let open = |s, d| {
                if proto == PROTO_TCP {
                    tcp(s, d, TCP_SYN)
                } else {
                    udp(s, d)
                }
            };
            let r = dp.run(POD_INGRESS, &open(sa(CLIENT), sa(VIP)).build());
            assert_eq!(tuple(&r.out).dst, sa(BACKEND_1));
            // The direct flow's first packet.
            let direct = open(sa(CLIENT), sa(BACKEND_1));
            let r = dp.run(POD_INGRESS, &direct.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            let port = tuple(&r.out).src.port();
            assert_ne!(port, sa(CLIENT).port());
            let remapped = SocketAddrV4::new(*sa(CLIENT).ip(), port);
            assert_frame_eq(&r.out, &direct.clone().with_source(remapped).build());
            let f = dp
                .ct(&ct_key(sa(CLIENT), sa(BACKEND_1), proto, CT_DIR_FORWARD))
                .unwrap();
            assert_eq!((f.backend_id, f.service_id), (0, 0), "no service");
            // Its reply comes back to its own port, from the backend.
            let reply = frame(proto, sa(BACKEND_1), remapped);
            let r = dp.run(POD_EGRESS, &reply.build());
            assert_frame_eq(&r.out, &reply.with_destination(sa(CLIENT)).build());
            // The translated flow's reply is still the ClusterIP's.
            let reply = frame(proto, sa(BACKEND_1), sa(CLIENT));
            let r = dp.run(POD_EGRESS, &reply.build());
            assert_frame_eq(&r.out, &reply.with_source(sa(VIP)).build());
            // Later packets of the direct flow keep the remap.
            let data = frame(proto, sa(CLIENT), sa(BACKEND_1));
            let r = dp.run(POD_INGRESS, &data.build());
            assert_frame_eq(&r.out, &data.with_source(remapped).build());
            // Direct traffic that clashes with nothing is untouched and
            // untracked.
            let other = open(sa("10.244.0.5:40001"), sa(BACKEND_1)).build();
            let r = dp.run(POD_INGRESS, &other);
            assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &other));
            assert_eq!(dp.ct_all().len(), 4);
            dp.assert_stats(&[
                (StatReason::Packets, 6),
                (StatReason::NewFlow, 1),
                (StatReason::PortRemapped, 1),
                (StatReason::ForwardTranslated, 2),
                (StatReason::ReplyTranslated, 2),
                (StatReason::PassNotService, 1),
                (StatReason::PassTranslated, 5),
            ]);
        }
    });
}

#[test]
fn c2_a_dead_flows_reply_key_is_taken_over_without_remap() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load_with(DatapathConfig {
            ct_udp_ns: 5_000_000_000,
            ..DatapathConfig::DEFAULT
        });
        two_frontends_one_backend(&mut dp, PROTO_UDP);
        dp.run(POD_INGRESS, &udp(sa(CLIENT), sa(VIP_A)).build());
        let long_ago = boot_ns() - 60_000_000_000;
        let rkey = ct_key(sa(BACKEND_1), sa(CLIENT), PROTO_UDP, CT_DIR_REPLY);
        age(
            &mut dp,
            ct_key(sa(CLIENT), sa(VIP_A), PROTO_UDP, CT_DIR_FORWARD),
            long_ago,
        );
        age(&mut dp, rkey, long_ago);
        let b = udp(sa(CLIENT), sa(VIP_B));
        let r = dp.run(POD_INGRESS, &b.build());
        assert_frame_eq(&r.out, &b.with_destination(sa(BACKEND_1)).build());
        assert_eq!(dp.ct(&rkey).unwrap().service_id, 22);
        // The dead flow's client comes back: a new flow, remapped now (the
        // key is the live second flow's).
        let a = udp(sa(CLIENT), sa(VIP_A));
        let r = dp.run(POD_INGRESS, &a.build());
        assert_ne!(tuple(&r.out).src, sa(CLIENT));
        assert_eq!(dp.ct(&rkey).unwrap().service_id, 22);
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 3),
            (StatReason::ConntrackExpired, 1),
            (StatReason::PortRemapped, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

#[test]
fn c1_c2_a_flow_whose_lost_reply_key_another_flow_took_is_recreated_remapped() {
    // LRU evicted the first flow's REPLY entry and a second flow took its
    // key: the first flow's next datagram cannot repair it (the key is not
    // its own any more), so it becomes a new flow with a remapped port.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        two_frontends_one_backend(&mut dp, PROTO_UDP);
        dp.run(POD_INGRESS, &udp(sa(CLIENT), sa(VIP_A)).build());
        let rkey = ct_key(sa(BACKEND_1), sa(CLIENT), PROTO_UDP, CT_DIR_REPLY);
        dp.conntrack().remove(&rkey).unwrap();
        let b = udp(sa(CLIENT), sa(VIP_B));
        let r = dp.run(POD_INGRESS, &b.build());
        assert_frame_eq(&r.out, &b.with_destination(sa(BACKEND_1)).build());
        let a = udp(sa(CLIENT), sa(VIP_A));
        let r = dp.run(POD_INGRESS, &a.build());
        let remapped = tuple(&r.out).src;
        assert_ne!(remapped, sa(CLIENT));
        // Both answer right.
        let reply = udp(sa(BACKEND_1), sa(CLIENT));
        let r = dp.run(POD_EGRESS, &reply.build());
        assert_eq!(tuple(&r.out).src, sa(VIP_B));
        let reply = udp(sa(BACKEND_1), remapped);
        let r = dp.run(POD_EGRESS, &reply.build());
        assert_eq!(
            (tuple(&r.out).src, tuple(&r.out).dst),
            (sa(VIP_A), sa(CLIENT))
        );
        assert_eq!(dp.ct_all().len(), 4);
        dp.assert_stats(&[
            (StatReason::Packets, 5),
            (StatReason::NewFlow, 3),
            (StatReason::ConntrackPeerMissing, 1),
            (StatReason::PortRemapped, 1),
            (StatReason::ReplyTranslated, 2),
            (StatReason::PassTranslated, 5),
        ]);
    });
}

#[test]
fn c2_cpus_creating_one_flow_at_once_agree_on_its_backend() {
    // Two threads (two CPUs) run the first packet of the same new flows at
    // the same time, over eight backends. Whoever loses the FORWARD insert
    // uses the winner's entry: both see the same backend, and each flow has
    // exactly one pair of entries.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let backends: Vec<BackendEntry> = (0..8)
            .map(|i| be(100 + i, &format!("10.244.{}.{}:8080", 1 + i, 10 + i)))
            .collect();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_UDP, backends));
        let flows = 2_000u16;
        let barrier = std::sync::Barrier::new(2);
        let shared = &dp;
        let run = |_: usize| {
            let mut out = Vec::new();
            for i in 0..flows {
                let c = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 20_000 + i);
                barrier.wait();
                let r = shared.run(POD_INGRESS, &udp(c, sa(VIP)).build());
                assert_eq!(r.ret, TC_ACT_UNSPEC);
                out.push(tuple(&r.out).dst);
            }
            out
        };
        let (a, b) = std::thread::scope(|s| {
            let x = s.spawn(|| run(0));
            let y = s.spawn(|| run(1));
            (x.join().unwrap(), y.join().unwrap())
        });
        assert_eq!(a, b, "two CPUs sent one flow to two backends");
        let races = dp.stat(StatReason::ConntrackRaceLost);
        println!("{races} of {flows} flows were created by both CPUs at once");
        assert_eq!(dp.ct_all().len(), 2 * usize::from(flows));
        assert_eq!(dp.stat(StatReason::NewFlow), u64::from(flows));
        dp.assert_outcomes_sum();
    });
}

// ---------------------------------------------------------------------------
// C3: ICMP errors of translated flows are translated, outer and quoted
// headers, checksums included; PMTU and TTL on the SNAT redirect path
// ---------------------------------------------------------------------------

/// An ICMP error from `src` to `dst` quoting `quote`.
fn icmp_err(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Ipv4Frame {
    Ipv4Frame {
        l4: packet::L4::IcmpError {
            icmp_type,
            code,
            rest,
            quote: quote.to_vec(),
        },
        ..icmp_port_unreachable(src, dst, &[])
    }
}

/// What an ICMP error quotes of `frame`: its IPv4 header and `n` bytes of
/// its payload.
fn quote(frame: &[u8], n: usize) -> Vec<u8> {
    frame[off::IP..off::L4 + n].to_vec()
}

/// "Fragmentation needed", next-hop MTU 1400.
const FRAG_NEEDED: (u8, u8, [u8; 4]) = (3, 4, [0, 0, 0x05, 0x78]);
const PORT_UNREACH: (u8, u8, [u8; 4]) = (3, 3, [0; 4]);
const TIME_EXCEEDED: (u8, u8, [u8; 4]) = (11, 0, [0; 4]);

#[test]
fn c3_errors_toward_a_pod_client_are_translated_at_its_egress() {
    // The client's segments, DNAT'ed at its interface, meet a router with
    // a smaller MTU (or expire, or reach a closed port of the backend): the
    // error quotes client -> backend; at the client's egress the quote
    // becomes client -> ClusterIP again, exactly as the client sent it
    // (IPv4 header, ports, the TCP/UDP checksum in a long quote), with every
    // checksum right. A router's address stays; the backend's becomes the
    // ClusterIP.
    require_privileges!();
    in_private_netns(|| {
        let router = Ipv4Addr::new(192, 0, 2, 254);
        for proto in [PROTO_TCP, PROTO_UDP] {
            for (t, code, rest) in [FRAG_NEEDED, TIME_EXCEEDED, PORT_UNREACH] {
                for quoted in [8, 20] {
                    let mut dp = Datapath::load();
                    dp.add_service(&ServiceEntry::cluster_ip(
                        1,
                        sa(VIP),
                        proto,
                        vec![be(12, BACKEND_2)],
                    ));
                    let sent = frame(proto, sa(CLIENT), sa(VIP)).with_payload(&[7; 40]);
                    let r = dp.run(POD_INGRESS, &sent.build());
                    assert_eq!(tuple(&r.out).dst, sa(BACKEND_2));
                    let from = if code == 3 {
                        *sa(BACKEND_2).ip()
                    } else {
                        router
                    };
                    let err = icmp_err(
                        from,
                        *sa(CLIENT).ip(),
                        t,
                        code,
                        rest,
                        &quote(&r.out, quoted),
                    );
                    let r = dp.run(POD_EGRESS, &err.build());
                    assert_eq!(r.ret, TC_ACT_UNSPEC);
                    let want_from = if code == 3 { *sa(VIP).ip() } else { router };
                    let want = icmp_err(
                        want_from,
                        *sa(CLIENT).ip(),
                        t,
                        code,
                        rest,
                        &quote(&sent.build(), quoted),
                    );
                    assert_frame_eq(&r.out, &want.build());
                    // The inner checksums, recomputed: the quoted IPv4 header;
                    // the UDP checksum covers the whole datagram, so compare
                    // with the one the client sent.
                    let inner = &r.out[off::L4 + 8..];
                    assert_eq!(
                        packet::internet_checksum(&inner[..20]),
                        0,
                        "quoted IPv4 header checksum"
                    );
                    // The same error at ingress hooks (it came from the
                    // other side): not for them.
                    let e = err.build();
                    for prog in [POD_INGRESS, UPLINK_INGRESS] {
                        let r = dp.run(prog, &e);
                        assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, &e), "{prog}");
                    }
                    dp.assert_stats(&[
                        (StatReason::Packets, 4),
                        (StatReason::NewFlow, 1),
                        (StatReason::NewFlowWithoutSyn, u64::from(proto == PROTO_TCP)),
                        (StatReason::IcmpErrorTranslated, 1),
                        (StatReason::PassTranslated, 2),
                        (StatReason::PassOtherProto, 2),
                    ]);
                }
            }
        }
    });
}

#[test]
fn c3_errors_toward_a_remapped_client_port_get_it_back() {
    // C2's remapped port in a quote is the client's own again.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        two_frontends_one_backend(&mut dp, PROTO_UDP);
        dp.run(POD_INGRESS, &udp(sa(CLIENT), sa(VIP_A)).build());
        let sent = udp(sa(CLIENT), sa(VIP_B));
        let r = dp.run(POD_INGRESS, &sent.build());
        assert_ne!(tuple(&r.out).src, sa(CLIENT));
        let err = icmp_err(
            *sa(BACKEND_1).ip(),
            *sa(CLIENT).ip(),
            3,
            3,
            [0; 4],
            &quote(&r.out, 8),
        );
        let r = dp.run(POD_EGRESS, &err.build());
        let want = icmp_err(
            *sa(VIP_B).ip(),
            *sa(CLIENT).ip(),
            3,
            3,
            [0; 4],
            &quote(&sent.build(), 8),
        );
        assert_frame_eq(&r.out, &want.build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 2),
            (StatReason::PortRemapped, 1),
            (StatReason::IcmpErrorTranslated, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

#[test]
fn c3_errors_from_a_pod_client_about_replies_go_to_the_backend() {
    // The client's socket is gone: its "port unreachable" about the
    // ClusterIP's reply must reach the backend as about its own packet.
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let (fkey, _) = dns_flow(&mut dp);
        assert!(dp.ct(&fkey).is_some());
        let dns = sa("10.96.0.10:53");
        let backend = sa("10.244.3.3:5353");
        let reply = udp(backend, sa(CLIENT)).with_payload(&[9; 30]);
        let r = dp.run(POD_EGRESS, &reply.build());
        assert_eq!(tuple(&r.out).src, dns);
        let err = icmp_err(
            *sa(CLIENT).ip(),
            *dns.ip(),
            3,
            3,
            [0; 4],
            &quote(&r.out, 38),
        );
        let r = dp.run(POD_INGRESS, &err.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        let want = icmp_err(
            *sa(CLIENT).ip(),
            *backend.ip(),
            3,
            3,
            [0; 4],
            &quote(&reply.build(), 38),
        );
        assert_frame_eq(&r.out, &want.build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::IcmpErrorTranslated, 1),
            (StatReason::PassTranslated, 3),
        ]);
    });
}

#[test]
fn c3_errors_of_snat_flows_are_translated_and_redirected_on_the_uplink() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, up0_mac) = uplink_netns(true);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let sent = tcp(sa(EXTERNAL), fe, TCP_ACK | TCP_PSH);
        let r = dp.run_on(UPLINK_INGRESS, &sent.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let port = tuple(&r.out).src.port();
        let snat = SocketAddrV4::new(NODE, port);
        // A router toward the backend: fragmentation needed, to the node.
        let router = Ipv4Addr::new(192, 0, 2, 2);
        let (t, code, rest) = FRAG_NEEDED;
        let err = icmp_err(router, NODE, t, code, rest, &quote(&r.out, 20))
            .with_macs(up0_mac, [2, 0, 0, 0, 2, 2]);
        let r = dp.run_on(UPLINK_INGRESS, &err.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        // To the client, about what it sent (with the TTL the router saw);
        // forwarded like the flow's replies (TTL - 1, to its gateway).
        let seen = sent.clone().with_ttl(63).build();
        let want = icmp_err(router, *sa(EXTERNAL).ip(), t, code, rest, &quote(&seen, 20))
            .with_ttl(63)
            .with_macs([2, 0, 0, 0, 2, 3], up0_mac);
        assert_frame_eq(&r.out, &want.build());

        // The client's "port unreachable" about a reply from the NodePort
        // goes to the backend, from the node (SNAT).
        let reply = tcp(fe, sa(EXTERNAL), TCP_ACK);
        let err = icmp_err(
            *sa(EXTERNAL).ip(),
            NODE,
            3,
            3,
            [0; 4],
            &quote(&reply.build(), 8),
        );
        let r = dp.run_on(UPLINK_INGRESS, &err.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let backend_reply = tcp(sa(BACKEND_2), snat, TCP_ACK);
        let want = icmp_err(
            NODE,
            *sa(BACKEND_2).ip(),
            3,
            3,
            [0; 4],
            &quote(&backend_reply.build(), 8),
        )
        .with_ttl(63)
        .with_macs([2, 0, 0, 0, 2, 2], up0_mac);
        assert_frame_eq(&r.out, &want.build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::NewFlowWithoutSyn, 1),
            (StatReason::IcmpErrorTranslated, 2),
            (StatReason::Redirected, 3),
        ]);
    });
}

#[test]
fn c3_a_packet_too_big_for_the_route_is_answered_with_frag_needed() {
    // The SNAT redirect path checks the route's MTU (here a locked route
    // MTU of 1400 toward the backend's node) and answers like a router:
    // ICMP fragmentation needed with the next-hop MTU, about the packet as
    // the client sent it. A packet that fits is forwarded.
    require_privileges!();
    in_private_netns(|| {
        let (up0, _) = uplink_netns(true);
        sh(&[
            "ip",
            "route",
            "replace",
            "10.244.2.0/24",
            "via",
            "192.0.2.2",
            "mtu",
            "lock",
            "1400",
        ]);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let big = tcp(sa(EXTERNAL), fe, TCP_ACK | TCP_PSH).with_payload(&[1; 1460]);
        let sent = big.build();
        assert_eq!(sent.len(), 14 + 1500);
        let r = dp.run_on(UPLINK_INGRESS, &sent, up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let (t, code, rest) = FRAG_NEEDED;
        let mut want = icmp_err(NODE, *sa(EXTERNAL).ip(), t, code, rest, &quote(&sent, 8))
            .with_macs(MAC_A, MAC_B);
        want.id = 0;
        want.frag = 0x4000;
        want.tos = 0xc0;
        assert_frame_eq(&r.out, &want.build());
        // 1400 bytes fit.
        let fits = tcp(sa(EXTERNAL), fe, TCP_ACK | TCP_PSH).with_payload(&[1; 1360]);
        let r = dp.run_on(UPLINK_INGRESS, &fits.build(), up0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert_eq!(tuple(&r.out).dst, sa(BACKEND_2));
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 1),
            (StatReason::NewFlowWithoutSyn, 1),
            (StatReason::ForwardTranslated, 1),
            (StatReason::IcmpFragNeededSent, 1),
            (StatReason::Redirected, 1),
        ]);
    });
}

#[test]
fn c3_unrelated_or_malformed_icmp_errors_pass_unchanged() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        web(&mut dp);
        dp.run(POD_INGRESS, &tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        let translated = tcp(sa(CLIENT), sa(BACKEND_1), TCP_SYN).build();
        let other = tcp(sa("10.244.0.9:1234"), sa(BACKEND_1), TCP_SYN).build();
        let mut frames = vec![
            // About a flow lb does not know.
            icmp_err(
                *sa(BACKEND_1).ip(),
                Ipv4Addr::new(10, 244, 0, 9),
                3,
                3,
                [0; 4],
                &quote(&other, 8),
            )
            .build(),
            // Not an error (an echo reply quoting nothing).
            icmp_echo(Ipv4Addr::new(10, 244, 0, 9), *sa(CLIENT).ip()).build(),
            // A redirect (type 5) is not translated.
            icmp_err(
                *sa(BACKEND_1).ip(),
                *sa(CLIENT).ip(),
                5,
                1,
                [0; 4],
                &quote(&translated, 8),
            )
            .build(),
        ];
        // Quotes cut short: no room for the ports.
        for n in [0, 4] {
            frames.push(
                icmp_err(
                    *sa(BACKEND_1).ip(),
                    *sa(CLIENT).ip(),
                    3,
                    3,
                    [0; 4],
                    &quote(&translated, n),
                )
                .build(),
            );
        }
        // A quoted header with options, and a quoted later fragment.
        let mut q = quote(&translated, 8);
        q[0] = 0x46;
        frames.push(icmp_err(*sa(BACKEND_1).ip(), *sa(CLIENT).ip(), 3, 3, [0; 4], &q).build());
        let mut q = quote(&translated, 8);
        q[6] = 0x00;
        q[7] = 0x10;
        frames.push(icmp_err(*sa(BACKEND_1).ip(), *sa(CLIENT).ip(), 3, 3, [0; 4], &q).build());
        let mut n = 1;
        for prog in program_names::ALL {
            for f in &frames {
                let r = dp.run(prog, f);
                assert_eq!((r.ret, &r.out), (TC_ACT_UNSPEC, f), "{prog} {}", hex(f));
                n += 1;
            }
        }
        dp.assert_stats(&[
            (StatReason::Packets, n),
            (StatReason::NewFlow, 1),
            (StatReason::PassTranslated, 1),
            (StatReason::PassOtherProto, n - 1),
        ]);
    });
}

// ---------------------------------------------------------------------------
// SNAT port capacity and conntrack floods (#9 item 5)
// ---------------------------------------------------------------------------

/// The CPUs this thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE.
        .filter(|i| unsafe { libc::CPU_ISSET(*i, &set) })
        .collect()
}

/// Moves the calling thread to `cpu`: BPF_PROG_TEST_RUN runs the program
/// on the caller's CPU, so per-CPU state (counters, the SNAT cursor) is
/// that CPU's.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid pointer and size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity {cpu}");
}

/// M2/#9: how many concurrent SNAT'ed flows to one backend fit in the
/// default SNAT port range before a new one is dropped
/// (`drop_snat_exhausted`): new flows from distinct clients to a NodePort
/// whose only backend is remote, spread over every CPU in turn (each CPU
/// probes from its own state), none of them closing. A measurement: the
/// numbers are printed; the assertions are loose floors.
#[test]
fn snat_ports_per_backend_capacity() {
    require_privileges!();
    in_private_netns(|| {
        let cfg = DatapathConfig::DEFAULT;
        let (up0, _) = uplink_netns(true);
        let mut dp = Datapath::load_programs(cfg, &[UPLINK_INGRESS]).unwrap();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
        let cpus = allowed_cpus();
        let attempts = range + range / 10;
        let mut ok = 0u32;
        let mut first_fail = None;
        let mut ok_at_range = 0;
        let mut fails_by_decile = [0u32; 11];
        for i in 0..attempts {
            pin_to_cpu(cpus[i as usize % cpus.len()]);
            let c = SocketAddrV4::new(
                Ipv4Addr::new(198, 51, 100, 7 + (i / 60_000) as u8),
                1024 + (i % 60_000) as u16,
            );
            let r = dp.run_on(UPLINK_INGRESS, &tcp(c, fe, TCP_SYN).build(), up0);
            if r.ret == TC_ACT_REDIRECT {
                ok += 1;
            } else {
                assert_eq!(r.ret, TC_ACT_SHOT);
                first_fail.get_or_insert(ok);
                fails_by_decile[(i * 10 / range) as usize] += 1;
            }
            if i + 1 == range {
                ok_at_range = ok;
            }
        }
        pin_to_cpu(cpus[0]);
        let first_fail = first_fail.unwrap_or(ok);
        eprintln!(
            "SNAT range {}-{} ({range} ports), {} CPUs: first drop after {first_fail} \
             concurrent flows ({:.1}% of the range); {ok_at_range} flows after {range} \
             attempts ({:.1}%); {ok} after {attempts}; drops per tenth of the range \
             attempted: {fails_by_decile:?}",
            cfg.snat_port_min,
            cfg.snat_port_max,
            cpus.len(),
            100.0 * f64::from(first_fail) / f64::from(range),
            100.0 * f64::from(ok_at_range) / f64::from(range),
        );
        assert_eq!(dp.stat(StatReason::NewFlow), u64::from(ok));
        assert_eq!(
            dp.stat(StatReason::DropSnatExhausted),
            u64::from(attempts - ok)
        );
        dp.assert_outcomes_sum();
    });
}

// ---------------------------------------------------------------------------
// #9 item 4: conntrack lifetimes per protocol and TCP state
// ---------------------------------------------------------------------------

/// Lifetimes short enough to age entries past them (the machine has been
/// up longer), each state its own.
fn short_lifetimes() -> DatapathConfig {
    let s = 1_000_000_000;
    DatapathConfig {
        ct_tcp_syn_sent_ns: 10 * s,
        ct_tcp_syn_recv_ns: 20 * s,
        ct_tcp_established_ns: 600 * s,
        ct_tcp_fin_wait_ns: 30 * s,
        ct_tcp_close_wait_ns: 300 * s,
        ct_tcp_time_wait_ns: 50 * s,
        ct_tcp_close_ns: 5 * s,
        ct_udp_ns: 10 * s,
        ct_udp_stream_ns: 100 * s,
        ..DatapathConfig::DEFAULT
    }
}

/// Drives the flow `client` -> VIP (one backend, BACKEND_1) into `state`
/// with real packets, each translation checked byte for byte.
fn drive_tcp_into(dp: &Datapath, client: SocketAddrV4, state: CtState) {
    let fwd = |flags: u8| {
        let p = tcp(client, sa(VIP), flags);
        let r = dp.run(POD_INGRESS, &p.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &p.with_destination(sa(BACKEND_1)).build());
    };
    let rev = |flags: u8| {
        let p = tcp(sa(BACKEND_1), client, flags);
        let r = dp.run(POD_EGRESS, &p.build());
        assert_eq!(r.ret, TC_ACT_UNSPEC);
        assert_frame_eq(&r.out, &p.with_source(sa(VIP)).build());
    };
    fwd(TCP_SYN);
    match state {
        CtState::TcpSynSent => {}
        CtState::TcpFinWait => fwd(TCP_FIN | TCP_ACK),
        _ => {
            rev(TCP_SYN | TCP_ACK);
            if state == CtState::TcpSynRecv {
                return;
            }
            fwd(TCP_ACK);
            match state {
                CtState::TcpCloseWait => fwd(TCP_FIN | TCP_ACK),
                CtState::TcpTimeWait => {
                    fwd(TCP_FIN | TCP_ACK);
                    rev(TCP_FIN | TCP_ACK);
                }
                CtState::TcpClose => rev(TCP_RST),
                _ => {}
            }
        }
    }
}

/// #9 item 4: each TCP state has its own idle lifetime. A flow idle 2 s
/// less than its state's lifetime is used (same entries, no
/// `conntrack_expired`); one idle 2 s more is a new flow
/// (`conntrack_expired`, and `new_flow_without_syn` for the ACK that
/// opened it again).
#[test]
fn i9_each_tcp_state_expires_after_its_own_lifetime() {
    require_privileges!();
    in_private_netns(|| {
        let cfg = short_lifetimes();
        let s = 1_000_000_000u64;
        for (i, state) in [
            CtState::TcpSynSent,
            CtState::TcpSynRecv,
            CtState::TcpEstablished,
            CtState::TcpFinWait,
            CtState::TcpCloseWait,
            CtState::TcpTimeWait,
            CtState::TcpClose,
        ]
        .into_iter()
        .enumerate()
        {
            let mut dp = Datapath::load_with(cfg);
            dp.add_service(&ServiceEntry::cluster_ip(
                1,
                sa(VIP),
                PROTO_TCP,
                vec![be(11, BACKEND_1)],
            ));
            let lifetime = cfg.state_lifetime_ns(state);
            for (j, (idle, expires)) in [(lifetime - 2 * s, false), (lifetime + 2 * s, true)]
                .into_iter()
                .enumerate()
            {
                let client = SocketAddrV4::new(
                    Ipv4Addr::new(10, 244, 0, 5),
                    41_000 + 10 * i as u16 + j as u16,
                );
                drive_tcp_into(&dp, client, state);
                let fkey = ct_key(client, sa(VIP), PROTO_TCP, CT_DIR_FORWARD);
                let rkey = ct_key(sa(BACKEND_1), client, PROTO_TCP, CT_DIR_REPLY);
                let (f, r) = (dp.ct(&fkey).unwrap(), dp.ct(&rkey).unwrap());
                assert_eq!(
                    f.flags, r.flags,
                    "{state:?}: both entries hold both directions"
                );
                assert_eq!(CtState::of(PROTO_TCP, f.flags), state, "{:#x}", f.flags);
                let t = boot_ns() - idle;
                age(&mut dp, fkey, t);
                age(&mut dp, rkey, t);
                let expired_before = dp.stat(StatReason::ConntrackExpired);
                let p = tcp(client, sa(VIP), TCP_ACK | TCP_PSH);
                let out = dp.run(POD_INGRESS, &p.build());
                assert_eq!(out.ret, TC_ACT_UNSPEC);
                assert_frame_eq(&out.out, &p.with_destination(sa(BACKEND_1)).build());
                let f = dp.ct(&fkey).unwrap();
                assert_eq!(
                    dp.stat(StatReason::ConntrackExpired) - expired_before,
                    u64::from(expires),
                    "{state:?} idle {} s",
                    idle / s
                );
                if expires {
                    // A new flow opened by a packet without SYN: its state
                    // starts over.
                    assert_eq!(f.flags, 0, "{state:?}");
                } else {
                    // The same flow: the SYN that opened it is still in it.
                    assert_ne!(f.flags & ct_flags::TCP_SYN, 0, "{state:?}");
                }
            }
            // The second flow of each state was re-created by an ACK.
            assert_eq!(dp.stat(StatReason::NewFlowWithoutSyn), 1, "{state:?}");
            assert_eq!(dp.stat(StatReason::NewFlow), 3, "{state:?}");
            dp.assert_outcomes_sum();
        }
    });
}

/// #9 item 4: a UDP flow becomes a stream (netfilter's ASSURED UDP flow,
/// `ct_udp_stream_ns`) with a packet at least 2 s after its creation once
/// a reply was seen; a query and its answer alone stay on `ct_udp_ns`, as
/// does a flow that was never answered however old.
#[test]
fn i9_udp_flows_become_streams_after_a_reply_and_two_seconds() {
    require_privileges!();
    in_private_netns(|| {
        let cfg = short_lifetimes();
        let s = 1_000_000_000u64;
        let mut dp = Datapath::load_with(cfg);
        let dns = sa("10.96.0.10:53");
        let backend = sa("10.244.1.11:5353");
        dp.add_service(&ServiceEntry::cluster_ip(
            7,
            dns,
            PROTO_UDP,
            vec![be(71, "10.244.1.11:5353")],
        ));
        let query = |dp: &Datapath, c: SocketAddrV4| {
            let q = udp(c, dns);
            let r = dp.run(POD_INGRESS, &q.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(&r.out, &q.with_destination(backend).build());
        };
        let answer = |dp: &Datapath, c: SocketAddrV4| {
            let a = udp(backend, c);
            let r = dp.run(POD_EGRESS, &a.build());
            assert_eq!(r.ret, TC_ACT_UNSPEC);
            assert_frame_eq(&r.out, &a.with_source(dns).build());
        };
        let keys = |c: SocketAddrV4| {
            (
                ct_key(c, dns, PROTO_UDP, CT_DIR_FORWARD),
                ct_key(backend, c, PROTO_UDP, CT_DIR_REPLY),
            )
        };
        // Moves a flow's creation `secs` seconds into the past.
        let created_ago = |dp: &mut Datapath, c: SocketAddrV4, secs: u16| {
            let (fk, rk) = keys(c);
            for k in [fk, rk] {
                let mut e = dp.ct(&k).unwrap();
                e.created_s = e.created_s.wrapping_sub(secs);
                dp.ct_insert(k, e);
            }
        };
        let stream = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40100);
        let dns_only = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40101);
        let unanswered = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40102);
        let t0 = boot_ns();
        for c in [stream, dns_only, unanswered] {
            query(&dp, c);
            let (fk, rk) = keys(c);
            let now_s = lb_common::created_s(boot_ns());
            for k in [fk, rk] {
                let e = dp.ct(&k).unwrap();
                assert!(
                    e.created_s == lb_common::created_s(t0) || e.created_s == now_s,
                    "created_s {} of {k:?}",
                    e.created_s
                );
            }
        }
        // A query and its answer within the first seconds: not a stream.
        answer(&dp, stream);
        answer(&dp, dns_only);
        query(&dp, stream);
        let (fk, rk) = keys(stream);
        assert_eq!(
            CtState::of(PROTO_UDP, dp.ct(&fk).unwrap().flags),
            CtState::Udp
        );
        // 3 s later: the next packet of the answered flow makes it a
        // stream, both entries; the unanswered one stays UDP.
        created_ago(&mut dp, stream, 3);
        created_ago(&mut dp, unanswered, 3);
        query(&dp, stream);
        query(&dp, unanswered);
        let both = ct_flags::SEEN_REPLY | ct_flags::UDP_STREAM;
        assert_eq!(dp.ct(&fk).unwrap().flags, both);
        assert_eq!(dp.ct(&rk).unwrap().flags, both);
        let (ufk, _) = keys(unanswered);
        assert_eq!(dp.ct(&ufk).unwrap().flags, 0);
        // A reply alone promotes too (the answered flow's reply 3 s on).
        created_ago(&mut dp, dns_only, 3);
        answer(&dp, dns_only);
        let (dfk, drk) = keys(dns_only);
        assert_eq!(dp.ct(&drk).unwrap().flags, both);
        assert_eq!(dp.ct(&dfk).unwrap().flags, both);
        // Idle 50 s: past ct_udp_ns (10 s), within ct_udp_stream_ns (100 s).
        let idle = boot_ns() - 50 * s;
        for c in [stream, unanswered] {
            let (f, r) = keys(c);
            age(&mut dp, f, idle);
            age(&mut dp, r, idle);
        }
        let expired = dp.stat(StatReason::ConntrackExpired);
        query(&dp, stream);
        assert_eq!(dp.stat(StatReason::ConntrackExpired), expired);
        assert_eq!(dp.ct(&fk).unwrap().flags, both, "the stream is kept");
        query(&dp, unanswered);
        assert_eq!(dp.stat(StatReason::ConntrackExpired), expired + 1);
        // Idle 101 s: the stream too.
        let idle = boot_ns() - 101 * s;
        age(&mut dp, fk, idle);
        age(&mut dp, rk, idle);
        query(&dp, stream);
        assert_eq!(dp.stat(StatReason::ConntrackExpired), expired + 2);
        assert_eq!(dp.ct(&fk).unwrap().flags, 0, "a new flow");
        dp.assert_outcomes_sum();
    });
}

/// #9 item 5: SNAT port probing finds the free ports of a mostly taken
/// range (75 % of 1000 ports held by live flows to the same backend,
/// scattered), counting the taken candidates (`snat_port_taken`); a range
/// that is truly full drops the flow (`drop_snat_exhausted`) after
/// `SNAT_PROBES` (64) candidates.
#[test]
fn m2_snat_probing_finds_free_ports_in_a_mostly_taken_range() {
    require_privileges!();
    in_private_netns(|| {
        let cfg = DatapathConfig {
            snat_port_min: 20_000,
            snat_port_max: 20_999,
            ..DatapathConfig::DEFAULT
        };
        let (up0, _) = uplink_netns(true);
        let mut dp = Datapath::load_with(cfg);
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let client = |i: u32| SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 1024 + i as u16);
        let syn = |dp: &Datapath, i: u32| {
            let f = tcp(client(i), fe, TCP_SYN).build();
            dp.run_on(UPLINK_INGRESS, &f, up0)
        };
        // A first flow shows the REPLY key the SNAT ports are claimed in.
        let r = syn(&dp, 0);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        let first = dp
            .ct(&ct_key(client(0), fe, PROTO_TCP, CT_DIR_FORWARD))
            .unwrap();
        let mut taken: BTreeSet<u16> = BTreeSet::from([u16::from_be(first.snat_port)]);
        let reply_key = |port: u16| ConntrackKey {
            saddr: first.nat_addr,
            daddr: first.snat_addr,
            sport: first.nat_port,
            dport: port.to_be(),
            proto: PROTO_TCP,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        let reply = dp.ct(&reply_key(u16::from_be(first.snat_port))).unwrap();
        // Live flows on a scattered 75 % of the range (xorshift, fixed seed).
        let mut x = 0x9e37_79b9u32;
        while taken.len() < 750 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = 20_000 + (x % 1000) as u16;
            if taken.insert(port) {
                dp.ct_insert(
                    reply_key(port),
                    ConntrackEntry {
                        last_seen_ns: boot_ns(),
                        ..reply
                    },
                );
            }
        }
        let cpus = allowed_cpus();
        for i in 1..=50 {
            pin_to_cpu(cpus[i as usize % cpus.len()]);
            let r = syn(&dp, i);
            assert_eq!(r.ret, TC_ACT_REDIRECT, "flow {i}");
            let port = tuple(&r.out).src.port();
            assert!(
                (20_000..=20_999).contains(&port) && taken.insert(port),
                "flow {i}: port {port} was taken"
            );
        }
        pin_to_cpu(cpus[0]);
        let probed = dp.stat(StatReason::SnatPortTaken);
        eprintln!("51 flows in a 75 %-full range of 1000 ports: {probed} taken candidates");
        assert!(probed > 0, "candidates were taken");
        assert_eq!(dp.stat(StatReason::DropSnatExhausted), 0);
        // Full: every port held.
        for port in 20_000..=20_999u16 {
            if taken.insert(port) {
                dp.ct_insert(
                    reply_key(port),
                    ConntrackEntry {
                        last_seen_ns: boot_ns(),
                        ..reply
                    },
                );
            }
        }
        let r = syn(&dp, 60);
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert_eq!(dp.stat(StatReason::DropSnatExhausted), 1);
        assert_eq!(dp.stat(StatReason::SnatPortTaken), probed + 64);
        assert!(dp
            .ct(&ct_key(client(60), fe, PROTO_TCP, CT_DIR_FORWARD))
            .is_none());
        assert_eq!(dp.stat(StatReason::NewFlow), 51);
        dp.assert_outcomes_sum();
    });
}

/// #9 item 5: a new TCP connection takes over the SNAT port of a closed
/// flow (FIN both ways, or reset) to the same backend once it has been
/// idle 2 s (`snat_port_reclaimed`; both of the old flow's entries go),
/// instead of waiting out its TIME_WAIT lifetime; an open flow, or a
/// closed one idle less than 2 s, keeps its port.
#[test]
fn m2_snat_ports_of_closed_flows_are_reclaimed_by_new_connections() {
    require_privileges!();
    in_private_netns(|| {
        // One SNAT port.
        let cfg = DatapathConfig {
            snat_port_min: 20_000,
            snat_port_max: 20_000,
            ..DatapathConfig::DEFAULT
        };
        let (up0, _) = uplink_netns(true);
        let mut dp = Datapath::load_with(cfg);
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let c1 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 51000);
        let c2 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 8), 52000);
        let syn = |dp: &Datapath, c: SocketAddrV4| {
            dp.run_on(UPLINK_INGRESS, &tcp(c, fe, TCP_SYN).build(), up0)
        };
        let r = syn(&dp, c1);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert_eq!(tuple(&r.out).src.port(), 20_000);
        let fkey = ct_key(c1, fe, PROTO_TCP, CT_DIR_FORWARD);
        let first = dp.ct(&fkey).unwrap();
        let rkey = fkey.peer(&first);
        let set = |dp: &mut Datapath, flags: u16, idle_ns: u64| {
            for k in [fkey, rkey] {
                let mut e = dp.ct(&k).unwrap();
                e.flags = flags;
                e.last_seen_ns = boot_ns() - idle_ns;
                dp.ct_insert(k, e);
            }
        };
        let est =
            ct_flags::SNAT | ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        let time_wait = est | ct_flags::TCP_FIN | ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY;
        // Open (idle 10 s), closed one way (10 s), closed both ways but
        // only 1 s ago: the port stays taken.
        for (flags, idle) in [
            (est, 10_000_000_000),
            (
                est | ct_flags::TCP_FIN | ct_flags::FIN_FORWARD,
                10_000_000_000,
            ),
            (time_wait, 1_000_000_000),
        ] {
            set(&mut dp, flags, idle);
            let r = syn(&dp, c2);
            assert_eq!(r.ret, TC_ACT_SHOT, "{flags:#x}");
            assert!(dp.ct(&fkey).is_some());
        }
        assert_eq!(dp.stat(StatReason::DropSnatExhausted), 3);
        assert_eq!(dp.stat(StatReason::SnatPortReclaimed), 0);
        // TIME_WAIT idle 3 s: the new connection takes the port over.
        set(&mut dp, time_wait, 3_000_000_000);
        let t0 = boot_ns();
        let r = syn(&dp, c2);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert_eq!(tuple(&r.out).src.port(), 20_000);
        assert!(dp.ct(&fkey).is_none(), "the old flow's FORWARD entry went");
        let reply = dp.ct(&rkey).unwrap();
        assert_eq!(
            reply.snat_addr,
            net(*c2.ip()),
            "the REPLY entry is the new flow's"
        );
        assert!(reply.last_seen_ns >= t0);
        // A reset flow likewise (the new flow, reset and idle 3 s, to a
        // third client). UDP never reclaims.
        let c3 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 53000);
        let f2 = ct_key(c2, fe, PROTO_TCP, CT_DIR_FORWARD);
        for k in [f2, rkey] {
            let mut e = dp.ct(&k).unwrap();
            e.flags |= ct_flags::TCP_RST;
            e.last_seen_ns = boot_ns() - 3_000_000_000;
            dp.ct_insert(k, e);
        }
        let r = syn(&dp, c3);
        assert_eq!(r.ret, TC_ACT_REDIRECT);
        assert!(dp.ct(&f2).is_none());
        assert_eq!(dp.stat(StatReason::SnatPortReclaimed), 2);
        assert_eq!(dp.stat(StatReason::NewFlow), 3);
        assert_eq!(dp.ct_all().len(), 2);
        dp.assert_outcomes_sum();
    });
}
