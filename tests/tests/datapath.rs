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
    ct_flags, ipv4_to_net, map_names, program_names, service_flags, AffinityKey, AffinityValue,
    ConntrackEntry, ConntrackKey, DatapathConfig, ServiceValue, StatReason, CT_DIR_FORWARD,
    CT_DIR_REPLY, MAX_AFFINITY, MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_CONNTRACK, MAX_NODE_ADDRS,
    MAX_SERVICES, PROTO_TCP, PROTO_UDP, STAT_COUNT,
};
use lb_tests::datapath::{exact_key, BackendEntry, Datapath, ServiceEntry};
use lb_tests::netns::in_private_netns;
use lb_tests::packet::{self, *};
use lb_tests::require_privileges;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

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
        _pad: 0,
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
        ];
        for (name, ty, key, value, max, flags) in want {
            let info = match dp.ebpf.map(name).unwrap() {
                Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) | Map::LpmTrie(d) => {
                    d.info().unwrap()
                }
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
        assert_eq!(r.ret, TC_ACT_OK);
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
        dp.assert_stats(&[(StatReason::Packets, 1), (StatReason::NewFlow, 1)]);
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
        assert_eq!(r.ret, TC_ACT_OK);
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
        assert_eq!(r.ret, TC_ACT_OK);
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_eq!(&r.out[off::UDP_CSUM..off::UDP_CSUM + 2], &[0, 0]);
        assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());

        let a = udp_no_checksum(sa("10.244.3.3:5353"), sa(CLIENT));
        let r = dp.run(POD_EGRESS, &a.build());
        assert_eq!(r.ret, TC_ACT_OK);
        assert_eq!(&r.out[off::UDP_CSUM..off::UDP_CSUM + 2], &[0, 0]);
        assert_frame_eq(&r.out, &a.with_source(sa(dns)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 1),
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
            assert_eq!(r.ret, TC_ACT_OK);
            assert_frame_eq(&r.out, &q.with_destination(sa("10.244.3.3:5353")).build());
        }
        dp.assert_stats(&[(StatReason::Packets, 300), (StatReason::NewFlow, 300)]);
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_eq!(r.out, want, "\n{}\n{}", hex(&r.out), hex(&want));
        dp.assert_stats(&[(StatReason::Packets, 1), (StatReason::NewFlow, 1)]);
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
                assert_eq!(r.ret, TC_ACT_OK, "{prog}");
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
                assert_eq!(r.ret, TC_ACT_OK);
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
                assert_eq!(r.ret, TC_ACT_OK);
                assert_eq!(r.out, *f, "{prog} changed truncated {}", hex(f));
                n += 1;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassTruncated, n)]);
    });
}

#[test]
fn fragments_pass_unchanged() {
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
        let mut frames = Vec::new();
        for frag in [0x2000u16, 0x0001, 0x2010, 0x1fff] {
            let mut t = tcp(sa(CLIENT), sa(VIP), TCP_SYN);
            t.frag = frag;
            frames.push(t.build());
            let mut u = udp(sa(CLIENT), sa(dns));
            u.frag = frag;
            frames.push(u.build());
        }
        let mut n = 0;
        for prog in [POD_INGRESS, UPLINK_INGRESS, POD_EGRESS] {
            for f in &frames {
                let r = dp.run(prog, f);
                assert_eq!(r.ret, TC_ACT_OK);
                assert_eq!(r.out, *f, "{prog} changed fragment {}", hex(f));
                n += 1;
            }
        }
        assert!(dp.ct_all().is_empty());
        dp.assert_stats(&[(StatReason::Packets, n), (StatReason::PassFragment, n)]);
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
                assert_eq!(r.ret, TC_ACT_OK);
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
                assert_eq!(r.ret, TC_ACT_OK);
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
        assert_eq!(r.ret, TC_ACT_OK);

        let syn_ack = tcp(sa(BACKEND_1), sa(CLIENT), TCP_SYN | TCP_ACK);
        let t0 = boot_ns();
        let r = dp.run(POD_EGRESS, &syn_ack.build());
        assert_eq!(r.ret, TC_ACT_OK);
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_frame_eq(&r.out, &data.with_source(sa(VIP)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::ReplyTranslated, 2),
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
        assert_eq!(r.ret, TC_ACT_OK);
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_frame_eq(&r.out, &ack.clone().with_destination(chosen).build());
        let est = ct_flags::TCP_SYN | ct_flags::SEEN_REPLY | ct_flags::TCP_ESTABLISHED;
        assert_eq!(dp.ct(&fkey).unwrap().flags, est);
        assert_eq!(dp.ct(&rkey).unwrap().flags, est);

        // Every later packet goes to the same backend.
        for _ in 0..50 {
            let data = tcp(sa(CLIENT), sa(VIP), TCP_ACK | TCP_PSH);
            let r = dp.run(POD_INGRESS, &data.build());
            assert_eq!(r.ret, TC_ACT_OK);
            assert_frame_eq(&r.out, &data.with_destination(chosen).build());
        }
        // FIN from the client, RST from the backend: both entries see both.
        dp.run(
            POD_INGRESS,
            &tcp(sa(CLIENT), sa(VIP), TCP_FIN | TCP_ACK).build(),
        );
        let closing = est | ct_flags::TCP_FIN;
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
            ct_tcp_transient_ns: 5_000_000_000,
            ..DatapathConfig::DEFAULT
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
        assert_eq!(r.ret, TC_ACT_OK);
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
            // Both backends exist; the service now only has `new`.
            dp.add_service(&ServiceEntry::cluster_ip(
                7,
                sa(dns),
                PROTO_UDP,
                vec![be(71, new)],
            ));
            dp.add_backend(70, sa(old), PROTO_UDP, 0);
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
            assert_eq!(r.ret, TC_ACT_OK);
            let to = if reused { old } else { new };
            assert_frame_eq(&r.out, &q.with_destination(sa(to)).build());
            if reused {
                dp.assert_stats(&[(StatReason::Packets, 1), (StatReason::ForwardTranslated, 1)]);
            } else {
                dp.assert_stats(&[
                    (StatReason::Packets, 1),
                    (StatReason::ConntrackExpired, 1),
                    (StatReason::NewFlow, 1),
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
        dp.add_backend(71, sa(b), PROTO_UDP, 0);
        dp.set_slot(7, 0, 71);
        dp.remove_backend(70);
        let r = dp.run(POD_INGRESS, &q.build());
        assert_eq!(r.ret, TC_ACT_OK);
        assert_frame_eq(&r.out, &q.clone().with_destination(sa(b)).build());
        assert_eq!(backend_of(&mut dp, sa(CLIENT), sa(dns), PROTO_UDP), sa(b));
        dp.assert_stats(&[
            (StatReason::Packets, 2),
            (StatReason::NewFlow, 2),
            (StatReason::ConntrackExpired, 1),
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

        // From a pod to this node's addresses at the NodePort.
        for node in [NODE, Ipv4Addr::new(10, 244, 0, 1)] {
            let fe = SocketAddrV4::new(node, 30080);
            let syn = tcp(sa(CLIENT), fe, TCP_SYN);
            let r = dp.run(POD_INGRESS, &syn.build());
            assert_eq!(r.ret, TC_ACT_OK);
            assert_frame_eq(&r.out, &syn.with_destination(sa(BACKEND_1)).build());
            let fwd = dp
                .ct(&ct_key(sa(CLIENT), fe, PROTO_TCP, CT_DIR_FORWARD))
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
            assert_eq!(r.ret, TC_ACT_OK);
            assert_eq!(r.out, *f);
        }
        dp.assert_stats(&[
            (StatReason::Packets, 6),
            (StatReason::NewFlow, 2),
            (StatReason::PassNotService, 4),
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
            assert_eq!(r.ret, TC_ACT_OK);
            let to = tuple(&r.out).dst;
            assert!(addrs.contains(&to.to_string().as_str()), "{to}");
            assert_eq!(backend_of(&mut dp, c, sa(VIP), PROTO_TCP), to);
            seen.insert(to);
        }
        // P(fewer than 3 backends in 60 uniform draws) is about 3 * (2/3)^60.
        assert_eq!(seen.len(), 3, "{seen:?}");
        dp.assert_stats(&[(StatReason::Packets, 60), (StatReason::NewFlow, 60)]);
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

        // Backend 50 exists but is in no slot: a flow reaches it only
        // through the affinity entry. A fresh entry is honoured; one older
        // than the timeout (1 s here) is not; nor one whose backend is gone.
        let odd = sa("10.244.50.50:8080");
        dp.add_backend(50, odd, PROTO_TCP, 0);
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
            assert_eq!(r.ret, TC_ACT_OK);
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
        dp.assert_stats(&[(StatReason::Packets, 33), (StatReason::NewFlow, 33)]);
    });
}

#[test]
fn e1_service_without_backends_drops() {
    require_privileges!();
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.add_service(&ServiceEntry::cluster_ip(1, sa(VIP), PROTO_TCP, vec![]));
        let f = tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
        let r = dp.run(POD_INGRESS, &f);
        assert_eq!(r.ret, TC_ACT_SHOT);
        assert!(dp.ct_all().is_empty());
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
            (StatReason::Packets, 3),
            (StatReason::DropNoBackend, 1),
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
            assert_eq!(r.ret, TC_ACT_OK);
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
        dp.assert_stats(&[(StatReason::Packets, 60), (StatReason::NewFlow, 60)]);
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
        assert_eq!(r.ret, TC_ACT_OK);
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_frame_eq(&r.out, &syn_ack.with_source(fe).build());
        // Next client packet: known flow, still no SNAT, no redirect.
        let ack = tcp(sa(EXTERNAL), fe, TCP_ACK);
        let r = dp.run(UPLINK_INGRESS, &ack.build());
        assert_eq!(r.ret, TC_ACT_OK);
        assert_frame_eq(&r.out, &ack.with_destination(local).build());
        dp.assert_stats(&[
            (StatReason::Packets, 4),
            (StatReason::NewFlow, 1),
            (StatReason::PassNotService, 1),
            (StatReason::ReplyTranslated, 1),
            (StatReason::ForwardTranslated, 1),
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
        let port = assert_snat_entries(&mut dp, t0, &DatapathConfig::DEFAULT);
        // The packet was translated before the lookup (TTL already lowered).
        let want = tcp(SocketAddrV4::new(NODE, port), sa(BACKEND_2), TCP_SYN).with_ttl(63);
        assert_frame_eq(&r.out, &want.build());
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
        // No route in this namespace: dropped at the FIB, but translated.
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
        let want = tcp(SocketAddrV4::new(NODE, port), sa(BACKEND_2), TCP_SYN).with_ttl(63);
        assert_frame_eq(&r.out, &want.build());
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_eq!(r.out, syn_ack.build());
        let r = dp.run(POD_EGRESS, &syn_ack.build());
        assert_frame_eq(&r.out, &syn_ack.with_source(sa(VIP)).build());
        dp.assert_stats(&[
            (StatReason::Packets, 3),
            (StatReason::NewFlow, 1),
            (StatReason::PassNotService, 1),
            (StatReason::ReplyTranslated, 1),
        ]);
    });
}

#[test]
fn ttl_one_is_not_redirected() {
    require_privileges!();
    in_private_netns(|| {
        let (up0, _) = uplink_netns(true);
        let mut dp = Datapath::load();
        remote_nodeport(&mut dp);
        let fe = SocketAddrV4::new(NODE, 30080);
        let r = dp.run_on(
            UPLINK_INGRESS,
            &tcp(sa(EXTERNAL), fe, TCP_SYN).with_ttl(1).build(),
            up0,
        );
        assert_eq!(r.ret, TC_ACT_SHOT);
        dp.assert_stats(&[
            (StatReason::Packets, 1),
            (StatReason::NewFlow, 1),
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
        assert_eq!(r.ret, TC_ACT_OK);
        assert_eq!(tuple(&r.out).ttl, 1);
        assert_frame_eq(&r.out, &syn.with_destination(sa(BACKEND_1)).build());
        assert_eq!(
            dp.ct_all().iter().map(|(k, _)| k.proto).collect::<Vec<_>>(),
            vec![PROTO_TCP, PROTO_TCP]
        );
    });
}
