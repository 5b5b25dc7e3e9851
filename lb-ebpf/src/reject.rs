//! E1: a frontend with no usable endpoint at all answers like kube-proxy's
//! REJECT: a TCP reset for TCP, an ICMP port unreachable for UDP, built from
//! the offending packet and sent back out of the interface it came in on.
//! C3: a packet the datapath forwards itself but cannot (TTL, MTU) gets the
//! ICMP error a router sends, built the same way ([`router_error`]).
//!
//! The answer is written over the packet itself: resize it with
//! `bpf_skb_change_tail` (a slow-path helper meant for exactly this: it
//! linearises, unclones and drops GSO state), write the new headers with
//! `bpf_skb_store_bytes`, and `bpf_redirect(ifindex, 0)`, which from TC
//! ingress transmits on the same device, towards the sender. The Ethernet
//! addresses are swapped, so the frame goes to whoever sent the original
//! (the pod, or the router / client in front of the uplink).
//!
//! Checksums are computed from scratch over the new headers (fixed sizes,
//! so every loop here is bounded and unrolled). Two notes on the skb's
//! checksum state, which `BPF_PROG_TEST_RUN` cannot show:
//! - CHECKSUM_COMPLETE (a NIC that sums received packets): the L3/L4 bytes
//!   are stored with `BPF_F_RECOMPUTE_CSUM`, so `skb->csum` follows the new
//!   content (and a trim turns COMPLETE into NONE anyway). The Ethernet
//!   header is stored without it: at TC ingress `skb->csum` does not cover
//!   the MAC header.
//! - CHECKSUM_PARTIAL (a local sender with checksum offload, e.g. a pod
//!   behind a veth): no helper can clear it. Such a packet was sent by this
//!   machine's own kernel, so the answer goes back to a local receiver
//!   without touching a NIC, and a local receiver trusts a PARTIAL skb
//!   (`skb_csum_unnecessary`) instead of verifying it. The checksum start
//!   and offset still lie inside the new packet (34+16 for the reset, 34+6
//!   for the ICMP error), so nothing reads past its end.

use aya_ebpf::{
    bindings::{BPF_F_INVALIDATE_HASH, BPF_F_RECOMPUTE_CSUM},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
    EbpfContext,
};
use lb_common::{StatReason, PROTO_TCP};

use crate::{
    csum::{ETH_HLEN, IP_HLEN, IP_OFF, L4_OFF, TCP_HLEN, UDP_HLEN},
    parse::{Packet, Sent, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{count, drop},
};

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes: the offending IPv4 header (no options reach
/// here) and the first 8 bytes of its payload, the whole UDP header.
const ICMP_QUOTE: usize = IP_HLEN + UDP_HLEN;
/// The TTL of generated packets (the kernel's default ip_default_ttl).
const TTL: u8 = 64;
/// Don't Fragment, with IP id 0: the answers are far below any MTU, and an
/// atomic datagram needs no unique id (RFC 6864). The kernel's own resets
/// look the same.
const DF: [u8; 2] = [0x40, 0x00];
/// IPTOS_PREC_INTERNETCONTROL, as the kernel's icmp_send uses for errors.
const TOS_ICMP_ERROR: u8 = 0xc0;
/// ECN bits of the TOS byte: never copied into an answer.
const TOS_ECN_MASK: u8 = 0x03;

/// Frame sizes of the answers.
const RST_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
const UNREACH_L3_LEN: usize = IP_HLEN + ICMP_HLEN + ICMP_QUOTE;
const UNREACH_LEN: usize = ETH_HLEN + UNREACH_L3_LEN;

/// Whether `saddr` (network order) may be answered at all: never the zero
/// network, loopback, multicast, or the reserved/broadcast range
/// (240.0.0.0/4, which holds 255.255.255.255). A subnet's directed
/// broadcast cannot be told apart here; the kernel would not have delivered
/// such a packet as unicast to us in the first place.
#[inline(always)]
fn answerable(saddr: u32) -> bool {
    let first = saddr.to_ne_bytes()[0];
    first != 0 && first != 127 && first < 224
}

/// One's-complement sum of big-endian 16-bit words, not folded.
#[inline(always)]
fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Folds and complements a sum into an Internet checksum (RFC 1071).
#[inline(always)]
fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Writes a 20-byte IPv4 header (no options, id 0, DF, TTL 64) with its
/// checksum into `h`.
#[inline(always)]
fn ipv4_header(h: &mut [u8], tos: u8, tot_len: u16, proto: u8, saddr: u32, daddr: u32) {
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[4..6].copy_from_slice(&[0, 0]);
    h[6..8].copy_from_slice(&DF);
    h[8] = TTL;
    h[9] = proto;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&saddr.to_ne_bytes());
    h[16..20].copy_from_slice(&daddr.to_ne_bytes());
    let c = fold(sum16(&h[..IP_HLEN], 0));
    h[10..12].copy_from_slice(&c);
}

/// The Ethernet header of the answer: the original's addresses swapped.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Result<[u8; ETH_HLEN], i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    let mut eth = [0u8; ETH_HLEN];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..14].copy_from_slice(&ETH_P_IP);
    Ok(eth)
}

/// Resizes the packet to `len` bytes and writes `eth` and `l3` (everything
/// after the Ethernet header) into it.
#[inline(always)]
fn rewrite<const L3: usize>(
    ctx: &TcContext,
    len: usize,
    eth: &[u8; ETH_HLEN],
    l3: &[u8; L3],
) -> Result<(), i64> {
    // SAFETY: the context's skb is valid; the helper checks the length.
    let rc = unsafe { bpf_skb_change_tail(ctx.as_ptr() as *mut _, len as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ctx.store(0, eth, BPF_F_INVALIDATE_HASH as u64)?;
    ctx.store(IP_OFF, l3, BPF_F_RECOMPUTE_CSUM as u64)
}

/// Turns a TCP segment into the reset the kernel's tcp_v4_send_reset would
/// send for it: addresses and ports swapped; with ACK in the offending
/// segment, seq = its ack_seq and no ACK flag; otherwise seq 0, ACK, and
/// ack_seq = seq + SYN + FIN + payload length. No options, no payload,
/// window 0.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), i64> {
    let eth = ethernet(ctx)?;
    let tot_len = u16::from_be(ctx.load::<u16>(IP_OFF + 2)?);
    let seq = u32::from_be(ctx.load::<u32>(L4_OFF + 4)?);
    let ack_seq: [u8; 4] = ctx.load(L4_OFF + 8)?;
    let doff = usize::from(ctx.load::<u8>(L4_OFF + 12)? >> 4) * 4;
    // The parser guaranteed IP_HLEN + doff <= tot_len.
    let payload = u32::from(tot_len).wrapping_sub((IP_HLEN + doff) as u32);

    let mut l3 = [0u8; IP_HLEN + TCP_HLEN];
    ipv4_header(
        &mut l3[..IP_HLEN],
        pkt.tos & !TOS_ECN_MASK,
        (IP_HLEN + TCP_HLEN) as u16,
        PROTO_TCP,
        pkt.daddr,
        pkt.saddr,
    );
    let t = &mut l3[IP_HLEN..];
    t[0..2].copy_from_slice(&pkt.dport.to_ne_bytes());
    t[2..4].copy_from_slice(&pkt.sport.to_ne_bytes());
    let flags = pkt.tcp_flags;
    if flags & TCP_ACK != 0 {
        t[4..8].copy_from_slice(&ack_seq);
        t[13] = TCP_RST;
    } else {
        let ack = seq
            .wrapping_add(u32::from(flags & TCP_SYN != 0))
            .wrapping_add(u32::from(flags & TCP_FIN != 0))
            .wrapping_add(payload);
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[13] = TCP_RST | TCP_ACK;
    }
    t[12] = ((TCP_HLEN / 4) as u8) << 4;
    // Pseudo-header (new source, new destination, protocol, TCP length),
    // then the header with a zero checksum field.
    let mut sum = sum16(&pkt.daddr.to_ne_bytes(), 0);
    sum = sum16(&pkt.saddr.to_ne_bytes(), sum);
    sum += u32::from(PROTO_TCP) + TCP_HLEN as u32;
    let c = fold(sum16(t, sum));
    t[16..18].copy_from_slice(&c);

    rewrite(ctx, RST_LEN, &eth, &l3)
}

/// Turns a packet into an ICMP error (`icmp_type`, `code`, the 4-byte
/// `rest` of the header: unused, or the next-hop MTU of "fragmentation
/// needed") from `saddr` to the packet's sender, quoting the packet's IPv4
/// header and the first 8 bytes of its payload (the ports, and TCP's
/// sequence number) exactly as they arrived, so that the sender's kernel
/// finds the socket.
#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    pkt: &Packet,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    saddr: u32,
) -> Result<(), i64> {
    let eth = ethernet(ctx)?;
    let quote: [u8; ICMP_QUOTE] = ctx.load(IP_OFF)?;

    let mut l3 = [0u8; UNREACH_L3_LEN];
    ipv4_header(
        &mut l3[..IP_HLEN],
        TOS_ICMP_ERROR,
        UNREACH_L3_LEN as u16,
        PROTO_ICMP,
        saddr,
        pkt.saddr,
    );
    let icmp = &mut l3[IP_HLEN..];
    icmp[0] = icmp_type;
    icmp[1] = code;
    // The checksum (2..4) stays zero for the sum.
    icmp[4..ICMP_HLEN].copy_from_slice(&rest);
    icmp[ICMP_HLEN..].copy_from_slice(&quote);
    let c = fold(sum16(icmp, 0));
    icmp[2..4].copy_from_slice(&c);

    rewrite(ctx, UNREACH_LEN, &eth, &l3)
}

/// Answers a new flow to a frontend without any endpoint (E1) and sends the
/// answer back where the packet came from. A TCP reset is never answered,
/// nor a packet from an address that cannot be a unicast sender: those are
/// dropped (`drop_no_backend`).
#[inline(never)]
pub fn reject(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    let is_tcp = pkt.proto == PROTO_TCP;
    if !answerable(pkt.saddr) || (is_tcp && pkt.tcp_flags & TCP_RST != 0) {
        return drop(StatReason::DropNoBackend);
    }
    let built = if is_tcp {
        tcp_reset(ctx, pkt)
    } else {
        icmp_error(
            ctx,
            pkt,
            ICMP_DEST_UNREACH,
            ICMP_PORT_UNREACH,
            [0; 4],
            pkt.daddr,
        )
    };
    if built.is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    pkt.sent = Sent::Answered;
    count(StatReason::RejectNoEndpoint);
    back(ctx)
}

/// Sends the rewritten packet back out of the interface it came in on.
#[inline(always)]
fn back(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no preconditions.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// C3: answers a packet the datapath would forward itself (a SNAT'ed flow)
/// but cannot, as the kernel's forwarding path would: with `mtu` 0 (TTL
/// <= 1), ICMP time exceeded in transit (type 11, code 0); otherwise (too
/// big for the route), ICMP fragmentation needed (type 3, code 4) with the
/// next-hop MTU; from `saddr` (the node address the flow uses),
/// quoting the packet as it arrived, sent back out of the interface it came
/// in on. A packet from an address that cannot be answered is dropped
/// (`drop_fib_failed`). lb cannot fragment, so "fragmentation needed" also
/// answers a packet without DF: Linux senders then fragment to the MTU
/// given, and the packet at hand is lost, as with a drop.
#[inline(never)]
pub fn router_error(ctx: &TcContext, pkt: &mut Packet, mtu: u16, saddr: u32) -> i32 {
    if !answerable(pkt.saddr) {
        return drop(StatReason::DropFibFailed);
    }
    let m = mtu.to_be_bytes();
    let (t, code, rest, reason) = if mtu == 0 {
        (
            ICMP_TIME_EXCEEDED,
            0,
            [0; 4],
            StatReason::IcmpTimeExceededSent,
        )
    } else {
        (
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            [0, 0, m[0], m[1]],
            StatReason::IcmpFragNeededSent,
        )
    };
    if icmp_error(ctx, pkt, t, code, rest, saddr).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    pkt.sent = Sent::Answered;
    count(reason);
    back(ctx)
}
