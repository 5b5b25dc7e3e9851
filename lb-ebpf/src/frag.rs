//! C4: IP fragments. Only a datagram's first fragment carries the TCP/UDP
//! header, so only it can be matched to a flow (or a frontend); the later
//! fragments carry no ports. As Cilium does, each hook remembers what it did
//! to a first fragment in `LB_FRAGMENTS`, keyed by (direction, source,
//! destination, protocol, IP id) as the first fragment arrived, and does the
//! same to the later ones: the same addresses (checksums: the IPv4 header
//! only; the UDP/TCP checksum is in the first fragment and was updated
//! there), the same way out (the stack, a FIB redirect, a hairpin
//! reflection), or a drop when the first one was dropped or answered.
//!
//! Every first fragment is recorded, translated or not, so that the later
//! fragments of ordinary traffic pass unchanged too. A later fragment with
//! no entry (it overtook its first fragment, or the entry was evicted or is
//! older than the kernel's reassembly timeout) is **dropped** and counted
//! (`drop_fragment_no_first`): lb cannot tell whether it belongs to a
//! translated datagram, and passing it could leak a service datagram's
//! piece with the wrong addresses. Netfilter's defrag would hold it until
//! the datagram is complete; lb cannot hold packets, so such a datagram is
//! lost, as if one fragment were lost, and the sender's retry (DNS, any
//! UDP protocol) goes through. Fragments are emitted in order by the
//! sending kernel and veths and bridges keep that order: only a network
//! that reorders packets before an uplink can produce this.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_boot_ns, programs::TcContext};
use lb_common::{frag_action, FragKey, FragValue, StatReason, FRAG_LIFETIME_NS};

use crate::{
    csum::{rewrite_ip_addr, IP_DADDR_OFF, IP_SADDR_OFF},
    maps::LB_FRAGMENTS,
    nat::{self, Route},
    parse::{self, Ip, Packet, Sent},
    stats::{count, drop, pass},
};

#[inline(always)]
fn key(ip: &Ip, dir: u8) -> FragKey {
    FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        dir,
    }
}

/// Records what became of a first fragment (`ip` as it arrived): its
/// `verdict`, how `pkt` was sent, and its addresses now. A drop, a reject
/// or an ICMP answer drops the rest of the datagram too.
#[inline(never)]
pub fn record(ip: &Ip, dir: u8, verdict: i32, pkt: &Packet) {
    let action = if verdict == aya_ebpf::bindings::TC_ACT_SHOT {
        frag_action::DROP
    } else {
        match pkt.sent {
            Sent::Stack => frag_action::PASS,
            Sent::Fib => frag_action::FIB,
            Sent::Reflect => frag_action::REFLECT,
            Sent::Answered => frag_action::DROP,
        }
    };
    let value = FragValue {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        action,
        _pad: [0; 7],
        // SAFETY: no preconditions.
        created_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    // Best effort: an LRU insert only fails on allocation failure; the
    // later fragments are then dropped as having no first.
    let _ = LB_FRAGMENTS.insert(key(ip, dir), value, BPF_ANY as u64);
}

/// A later fragment: gets what its first fragment got.
#[inline(never)]
pub fn later(ctx: &TcContext, ip: &Ip, dir: u8) -> i32 {
    // SAFETY: a valid map value pointer; copied out at once.
    let Some(v) = LB_FRAGMENTS.get_ptr(key(ip, dir)).map(|p| unsafe { *p }) else {
        return drop(StatReason::DropFragmentNoFirst);
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if v.action == frag_action::DROP || now.saturating_sub(v.created_ns) > FRAG_LIFETIME_NS {
        return drop(StatReason::DropFragmentNoFirst);
    }
    let mut pkt = parse::unparsed(ip);
    let mut route = Route::default();
    if v.action == frag_action::FIB {
        // Routed before the rewrite, as its first fragment was; never
        // answered with an ICMP error (RFC 792: only about first fragments).
        let out = Packet {
            saddr: v.saddr,
            daddr: v.daddr,
            ..pkt
        };
        let code = nat::route(ctx, &pkt, &out, 0, &mut route);
        if code != nat::ROUTED {
            return code;
        }
    }
    let translated = v.saddr != ip.saddr || v.daddr != ip.daddr;
    if rewrite_ip_addr(ctx, IP_SADDR_OFF, ip.saddr, v.saddr).is_err()
        || rewrite_ip_addr(ctx, IP_DADDR_OFF, ip.daddr, v.daddr).is_err()
    {
        return drop(StatReason::DropRewriteFailed);
    }
    pkt.saddr = v.saddr;
    pkt.daddr = v.daddr;
    if translated {
        count(StatReason::FragmentTranslated);
    }
    match v.action {
        frag_action::FIB => nat::fib_redirect(ctx, &mut pkt, &route),
        frag_action::REFLECT => nat::reflect(ctx, &mut pkt),
        _ if translated => pass(StatReason::PassTranslated),
        _ => pass(StatReason::PassFragment),
    }
}
