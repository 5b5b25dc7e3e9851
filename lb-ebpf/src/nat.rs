//! Packet rewrites (DNAT, SNAT, reverse NAT) and the two ways the datapath
//! forwards a packet itself, for packets the stack must not see with a
//! rewritten source (SNAT'ed flows: their source is the node's own address,
//! which the stack would drop as martian, or the hairpin address):
//! [`fib_redirect`] (FIB lookup, then out of the interface the route names)
//! and [`reflect`] (straight back out of the interface the packet came in
//! on: M4 hairpin).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT,
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
    parse::Packet,
    stats::count,
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

#[inline(always)]
fn drop(reason: StatReason) -> i32 {
    count(reason);
    TC_ACT_SHOT
}

/// Forwards an already translated packet ourselves: decrement the TTL, look
/// the new destination up in the FIB (as a packet forwarded from the
/// interface it arrived on), then either rewrite the Ethernet addresses and
/// `bpf_redirect` to the egress interface, or, when the neighbour is not
/// resolved yet, `bpf_redirect_neigh` to let the kernel resolve it. Any other
/// FIB answer (no route, forwarding disabled, needs fragmentation, ...)
/// drops the packet.
#[inline(always)]
pub fn fib_redirect(ctx: &TcContext, pkt: &Packet) -> i32 {
    // The stack would answer TTL 1 with ICMP time exceeded; we cannot.
    if pkt.ttl_proto.to_ne_bytes()[0] <= 1 {
        return drop(StatReason::DropFibFailed);
    }
    if decrement_ttl(ctx, pkt.ttl_proto).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }

    // SAFETY: an all-zero bpf_fib_lookup is a valid value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.proto;
    fib.sport = pkt.sport;
    fib.dport = pkt.dport;
    // tot_len stays 0: the kernel then checks the skb against the egress
    // MTU with is_skb_forwardable(), which accepts GSO/GRO packets; a
    // tot_len would compare the whole super-packet with the MTU and fail.
    fib.__bindgen_anon_2.tos = pkt.tos;
    fib.__bindgen_anon_3.ipv4_src = pkt.saddr;
    fib.__bindgen_anon_4.ipv4_dst = pkt.daddr;
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
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        if ctx.store(0, &macs, 0).is_err() {
            return drop(StatReason::DropRewriteFailed);
        }
        count(StatReason::Redirected);
        // SAFETY: no preconditions.
        return unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The lookup left the egress interface and the next hop in `fib`.
        // SAFETY: reading the union members the kernel filled in.
        let mut nh = bpf_redir_neigh {
            nh_family: u32::from(AF_INET),
            __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: unsafe { fib.__bindgen_anon_4.ipv4_dst },
            },
        };
        count(StatReason::Redirected);
        // SAFETY: nh is a valid bpf_redir_neigh of the given size.
        return unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32;
    }
    drop(StatReason::DropFibFailed)
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
pub fn reflect(ctx: &TcContext, pkt: &Packet) -> i32 {
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
    count(StatReason::Redirected);
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no preconditions.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
