//! Packet rewrites (DNAT, SNAT, reverse NAT) and the two ways the datapath
//! forwards a packet itself, for packets the stack must not see with a
//! rewritten source (SNAT'ed flows: their source is the node's own address,
//! which the stack would drop as martian, or the hairpin address):
//! [`route`] then [`fib_redirect`] (FIB lookup before the translation, so
//! that a packet that cannot be forwarded is answered with an ICMP error
//! about what its sender sent, C3; then out of the interface the route
//! names) and [`reflect`] (straight back out of the interface the packet
//! came in on: M4 hairpin).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext,
};
use lb_common::StatReason;

use crate::{
    csum::{
        decrement_ttl, rewrite_addr, rewrite_port, RewriteError, IP_DADDR_OFF, IP_SADDR_OFF,
        L4_DPORT_OFF, L4_SPORT_OFF,
    },
    maps::{LB_FIB_SCRATCH, LB_UPLINK_ADDRS},
    parse::{Packet, Sent},
    stats::{count, drop},
};

const AF_INET: u8 = 2;

/// Rewrites the destination of `pkt` to `addr:port`; updates `pkt`.
#[inline(always)]
pub fn dnat(ctx: &TcContext, pkt: &mut Packet, addr: u32, port: u16) -> Result<(), RewriteError> {
    rewrite_addr(ctx, pkt.proto, IP_DADDR_OFF, pkt.daddr, addr)?;
    rewrite_port(ctx, pkt.proto, L4_DPORT_OFF, pkt.dport, port)?;
    pkt.daddr = addr;
    pkt.dport = port;
    Ok(())
}

/// Rewrites the source of `pkt` to `addr:port` (SNAT, and the reverse
/// translation of replies); updates `pkt`.
#[inline(always)]
pub fn snat(ctx: &TcContext, pkt: &mut Packet, addr: u32, port: u16) -> Result<(), RewriteError> {
    rewrite_addr(ctx, pkt.proto, IP_SADDR_OFF, pkt.saddr, addr)?;
    rewrite_port(ctx, pkt.proto, L4_SPORT_OFF, pkt.sport, port)?;
    pkt.saddr = addr;
    pkt.sport = port;
    Ok(())
}

/// Where [`route`] says a packet goes.
#[derive(Clone, Copy, Default)]
pub struct Route {
    /// The egress interface.
    ifindex: u32,
    /// The next hop, when its neighbour entry is not resolved
    /// (`bpf_redirect_neigh`); 0: `macs` holds the destination and source
    /// MAC (`bpf_redirect`).
    nexthop: u32,
    macs: [u8; 12],
}

/// The length the FIB compares with the route's MTU: the IPv4 total
/// length, or for a GSO packet (a TSO/GRO super-packet) the size of each
/// segment it will be cut into.
#[inline(always)]
fn mtu_len(ctx: &TcContext, pkt: &Packet) -> u16 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return pkt.tot_len;
    }
    let seg = gso_size + crate::csum::IP_HLEN as u32 + u32::from(pkt.l4_hlen);
    if seg > 0xffff {
        0xffff
    } else {
        seg as u16
    }
}

/// Decides where a packet the datapath forwards itself goes, **before** it
/// is translated, so that what cannot be forwarded is answered with an ICMP
/// error about the packet as its sender sent it (C3). `out` is the packet as
/// it will leave (translated addresses and ports). As the kernel's
/// forwarding path would:
/// - TTL <= 1: ICMP time exceeded (a router does not forward it);
/// - `bpf_fib_lookup` as if forwarded from the interface it arrived on,
///   with its length, so the route's MTU (a locked route MTU, a learned
///   path MTU, the device's) is checked: too big is answered with ICMP
///   fragmentation needed and the next-hop MTU (lb cannot fragment);
/// - no route, forwarding disabled, an unreachable or prohibit route, ...:
///   dropped (`drop_fib_failed`).
///
/// `node` is the node address errors would come from, 0 for no ICMP error
/// at all (never about a later fragment, RFC 792, nor about an ICMP error):
/// those packets are dropped. Returns [`ROUTED`] with `route` filled in,
/// [`ANSWER`] + the next-hop MTU (0: TTL) when the caller is to answer with
/// `reject::router_error`, or the verdict of a dropped packet. A BPF
/// function of its own, to keep the callers' stack small; it calls nothing
/// heavy itself, so no call chain grows deeper than two frames.
#[inline(never)]
pub fn route(ctx: &TcContext, pkt: &Packet, out: &Packet, node: u32, route: &mut Route) -> i32 {
    if pkt.ttl_proto.to_ne_bytes()[0] <= 1 {
        return if node != 0 {
            ANSWER
        } else {
            drop(StatReason::DropFibFailed)
        };
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = out.proto;
    fib.sport = out.sport;
    fib.dport = out.dport;
    fib.__bindgen_anon_1.tot_len = mtu_len(ctx, pkt);
    fib.__bindgen_anon_2.tos = out.tos;
    fib.__bindgen_anon_3.ipv4_src = out.saddr;
    fib.__bindgen_anon_4.ipv4_dst = out.daddr;
    // SAFETY: the context pointer is valid for the program's lifetime.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };

    // SAFETY: fib is a valid, writable bpf_fib_lookup of the given size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        route.ifindex = fib.ifindex;
        route.nexthop = 0;
        route.macs[..6].copy_from_slice(&fib.dmac);
        route.macs[6..].copy_from_slice(&fib.smac);
        return 0;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The lookup left the egress interface and the next hop in `fib`.
        route.ifindex = fib.ifindex;
        // SAFETY: reading the union member the kernel filled in.
        route.nexthop = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        return 0;
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 && node != 0 {
        // SAFETY: reading the union member the kernel filled in.
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
        if mtu != 0 {
            return ANSWER + i32::from(mtu);
        }
    }
    drop(StatReason::DropFibFailed)
}

/// M2: the address a backend on another node answers an SNAT'ed flow at:
/// the primary address of the uplink the route to `backend` leaves by, as
/// kube-proxy's MASQUERADE picks the egress interface's address. A flow
/// that arrived on a second uplink (another network the backend's node may
/// not reach) is SNAT'ed to the uplink that does reach it; the frontend's
/// own address comes back on the reply through the REPLY entry. 0 when the
/// route leaves by an interface lb has no address of (the caller then
/// falls back to the frontend or arrival uplink address). Called from the
/// new-flow step, whose frame leaves no stack for a bpf_fib_lookup struct:
/// the struct lives in the per-CPU `LB_FIB_SCRATCH`.
#[inline(never)]
pub fn egress_uplink_addr(ctx: &TcContext, backend: u32) -> u32 {
    const _: () = assert!(core::mem::size_of::<FibParams>() <= 64);
    let Some(room) = LB_FIB_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let fib = room.cast::<FibParams>();
    // SAFETY: `room` is this CPU's 64-byte, 8-aligned scratch value, large
    // enough for a bpf_fib_lookup (checked above); all-zero is a valid one.
    let rc = unsafe {
        core::ptr::write_bytes(room, 0, 1);
        (*fib).family = AF_INET;
        (*fib).__bindgen_anon_4.ipv4_dst = backend;
        (*fib).ifindex = (*ctx.skb.skb).ifindex;
        bpf_fib_lookup(
            ctx.as_ptr(),
            fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return 0;
    }
    // SAFETY: the helper filled in the egress ifindex; a valid map value
    // pointer, copied out at once.
    LB_UPLINK_ADDRS
        .get_ptr(unsafe { (*fib).ifindex })
        .map_or(0, |a| unsafe { (*a).addr })
}

/// [`route`] found the way.
pub const ROUTED: i32 = 0;
/// [`route`]: answer with an ICMP error; plus the next-hop MTU ("fragmentation
/// needed"), or plus 0 (TTL: "time exceeded").
pub const ANSWER: i32 = 0x1_0000;

/// Forwards a translated packet ourselves along `route` (from [`route`]):
/// decrement the TTL, then either rewrite the Ethernet addresses and
/// `bpf_redirect` to the egress interface, or, when the neighbour is not
/// resolved yet, `bpf_redirect_neigh` to let the kernel resolve it.
#[inline(always)]
pub fn fib_redirect(ctx: &TcContext, pkt: &mut Packet, route: &Route) -> i32 {
    if decrement_ttl(ctx, pkt.ttl_proto).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    pkt.sent = Sent::Fib;
    if route.nexthop == 0 {
        if ctx.store(0, &route.macs, 0).is_err() {
            return drop(StatReason::DropRewriteFailed);
        }
        count(StatReason::Redirected);
        // SAFETY: no preconditions.
        return unsafe { bpf_redirect(route.ifindex, 0) } as i32;
    }
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: route.nexthop,
        },
    };
    count(StatReason::Redirected);
    // SAFETY: nh is a valid bpf_redir_neigh of the given size.
    unsafe {
        bpf_redirect_neigh(
            route.ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// M4 hairpin: sends a translated packet straight back out of the interface
/// it came in on, to the pod that sent it (a pod that reached itself
/// through its Service, or its answer to the hairpin address).
///
/// Why not `fib_redirect`: the destination is the sender itself, and the
/// frame it sent already holds both Ethernet addresses the answer needs
/// (its own, and its gateway's). Swapping them and redirecting to the same
/// interface works for every CNI layout (a cni0 bridge, or routed veths
/// with a proxy-ARP gateway as Calico does), needs no route, no neighbour
/// entry and no forwarding sysctl, and never crosses the bridge or
/// netfilter. The TTL is lowered as a router would (the pod sees its
/// packet come back from its gateway).
#[inline(always)]
pub fn reflect(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    if pkt.ttl_proto.to_ne_bytes()[0] <= 1 {
        return drop(StatReason::DropFibFailed);
    }
    if decrement_ttl(ctx, pkt.ttl_proto).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return drop(StatReason::DropRewriteFailed);
    };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    if ctx.store(0, &swapped, 0).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    pkt.sent = Sent::Reflect;
    count(StatReason::Redirected);
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no preconditions.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
