//! Ethernet II / IPv4 / TCP / UDP / ICMP-error parsing.
//!
//! The parser only reads. Three steps, each a bounded number of reads:
//! - [`ip`]: Ethernet II + IPv4 without options. Anything else is passed on
//!   unchanged with the reason as the error: not IPv4 (ARP, IPv6,
//!   VLAN-tagged), IPv4 with options, truncated or inconsistent headers;
//! - [`l4`]: the TCP or UDP header of an unfragmented packet or of a first
//!   fragment (C4);
//! - [`icmp_error`]: an ICMP error (destination unreachable, source quench,
//!   time exceeded, parameter problem) and the IPv4 + TCP/UDP header it
//!   quotes (C3).

use aya_ebpf::programs::TcContext;
use lb_common::{StatReason, PROTO_TCP, PROTO_UDP};

use crate::csum::{
    ETH_HLEN, ETH_PROTO_OFF, IP_HLEN, IP_OFF, L4_OFF, TCP_FLAGS_OFF, TCP_HLEN, UDP_HLEN,
};

const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

pub const PROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a packet stands in IP fragmentation (C4).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not a fragment.
    None,
    /// The first fragment: offset 0, more fragments follow; it carries the
    /// L4 header.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// The IPv4 header of a packet. Addresses, the id and `ttl_proto` in
/// network byte order, exactly as in the packet (and in the maps).
#[derive(Clone, Copy)]
pub struct Ip {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub tos: u8,
    /// The 16-bit word holding TTL and protocol, as in the packet.
    pub ttl_proto: u16,
    /// Total length, host order.
    pub tot_len: u16,
    pub id: u16,
    pub frag: Frag,
}

/// How a packet left the pipeline when it was not simply passed or
/// dropped; what later fragments of its datagram must get too (C4).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Passed to the stack (or dropped: the verdict tells).
    Stack,
    /// Forwarded by the datapath: FIB lookup and redirect.
    Fib,
    /// Sent back out of the interface it came in on (M4 hairpin).
    Reflect,
    /// Turned into an answer to its sender (a reject, an ICMP error).
    Answered,
}

/// What the datapath needs from a TCP/UDP packet (or from the outer header
/// of an ICMP error, with ports 0). Addresses and ports are in network byte
/// order, exactly as in the packet (and in the maps).
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The 16-bit word holding TTL and protocol, as in the packet.
    pub ttl_proto: u16,
    pub tos: u8,
    /// Length of the L4 header (TCP with options, 8 for UDP and ICMP).
    pub l4_hlen: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
    /// Set by the pipeline when it forwards or answers the packet itself.
    pub sent: Sent,
}

/// An ICMP error and the header it quotes (C3). `outer` is the ICMP packet
/// itself (proto ICMP, ports 0); `inner` is the quoted packet as its sender
/// sent it (the receiver of the error).
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub outer: Packet,
    pub inner_saddr: u32,
    pub inner_daddr: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub inner_proto: u8,
}

/// The bytes the parser looks at directly: Ethernet, IPv4 without options,
/// and the fixed part of a TCP header (the longer of TCP and UDP).
const PARSE_LEN: usize = L4_OFF + TCP_HLEN;

/// ICMP error layout: the ICMP header, then the quoted IPv4 header and the
/// first 8 bytes of its payload (the ports).
pub const ICMP_HLEN: usize = 8;
pub const INNER_IP_OFF: usize = L4_OFF + ICMP_HLEN;
pub const INNER_L4_OFF: usize = INNER_IP_OFF + IP_HLEN;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Returns a pointer to a `T` at `off` if it lies inside the linear data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment
    // guarantee, hence read_unaligned.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Makes the headers readable with direct packet access. Headers normally
/// sit in the linear part of the skb; if they do not (a non-linear skb), pull
/// them in. Pulling never changes the packet's bytes.
#[inline(always)]
fn linearize(ctx: &TcContext) {
    let linear = ctx.data_end().saturating_sub(ctx.data());
    let total = ctx.len() as usize;
    let want = if total < PARSE_LEN { total } else { PARSE_LEN };
    if linear < want {
        let _ = ctx.pull_data(want as u32);
    }
}

/// Ethernet II + IPv4 without options, lengths consistent with the frame.
#[inline(always)]
pub fn ip(ctx: &TcContext) -> Result<Ip, StatReason> {
    linearize(ctx);

    let eth_proto: u16 = read(ctx, ETH_PROTO_OFF).ok_or(StatReason::PassTruncated)?;
    if eth_proto != ETH_P_IP.to_be() {
        return Err(StatReason::PassNotIpv4);
    }
    // A tag the device took out of the frame (VLAN acceleration): not ours.
    // SAFETY: the context pointer is valid for the program's lifetime.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(StatReason::PassNotIpv4);
    }

    let vihl: u8 = read(ctx, IP_OFF).ok_or(StatReason::PassTruncated)?;
    if ptr_at::<[u8; IP_HLEN]>(ctx, IP_OFF).is_none() {
        return Err(StatReason::PassTruncated);
    }
    if vihl >> 4 != 4 {
        return Err(StatReason::PassNotIpv4);
    }
    if vihl & 0x0f != 5 {
        return Err(StatReason::PassIpOptions);
    }
    let tot_len = u16::from_be(read::<u16>(ctx, IP_OFF + 2).ok_or(StatReason::PassTruncated)?);
    if (tot_len as usize) < IP_HLEN || ETH_HLEN + tot_len as usize > ctx.len() as usize {
        return Err(StatReason::PassTruncated);
    }
    let frag_word = u16::from_be(read::<u16>(ctx, IP_OFF + 6).ok_or(StatReason::PassTruncated)?);
    let frag = if frag_word & IP_OFFSET_MASK != 0 {
        Frag::Later
    } else if frag_word & IP_MF != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let ttl_proto: u16 = read(ctx, IP_OFF + 8).ok_or(StatReason::PassTruncated)?;
    Ok(Ip {
        saddr: read(ctx, IP_OFF + 12).ok_or(StatReason::PassTruncated)?,
        daddr: read(ctx, IP_OFF + 16).ok_or(StatReason::PassTruncated)?,
        proto: ttl_proto.to_ne_bytes()[1],
        tos: read(ctx, IP_OFF + 1).ok_or(StatReason::PassTruncated)?,
        ttl_proto,
        tot_len,
        id: read(ctx, IP_OFF + 4).ok_or(StatReason::PassTruncated)?,
        frag,
    })
}

/// A `Packet` with `ip`'s header and no L4 information: what the pipeline
/// holds for a packet it does not parse further.
#[inline(always)]
pub fn unparsed(ip: &Ip) -> Packet {
    Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
        tcp_flags: 0,
        ttl_proto: ip.ttl_proto,
        tos: ip.tos,
        l4_hlen: 0,
        tot_len: ip.tot_len,
        sent: Sent::Stack,
    }
}

/// The TCP or UDP header of a packet that is not a later fragment. A first
/// fragment holds only part of the datagram: its UDP length is the whole
/// datagram's.
#[inline(always)]
pub fn l4(ctx: &TcContext, ip: &Ip) -> Result<Packet, StatReason> {
    let l4_len = ip.tot_len as usize - IP_HLEN;
    let (tcp_flags, l4_hlen) = match ip.proto {
        PROTO_TCP => {
            if l4_len < TCP_HLEN || ptr_at::<[u8; TCP_HLEN]>(ctx, L4_OFF).is_none() {
                return Err(StatReason::PassTruncated);
            }
            let off_flags: u16 = read(ctx, TCP_FLAGS_OFF - 1).ok_or(StatReason::PassTruncated)?;
            let [doff, flags] = off_flags.to_ne_bytes();
            let hlen = ((doff >> 4) as usize) * 4;
            if hlen < TCP_HLEN || hlen > l4_len {
                return Err(StatReason::PassTruncated);
            }
            (flags, hlen as u8)
        }
        PROTO_UDP => {
            if l4_len < UDP_HLEN || ptr_at::<[u8; UDP_HLEN]>(ctx, L4_OFF).is_none() {
                return Err(StatReason::PassTruncated);
            }
            let udp_len =
                u16::from_be(read::<u16>(ctx, L4_OFF + 4).ok_or(StatReason::PassTruncated)?);
            let too_long = ip.frag == Frag::None && udp_len as usize > l4_len;
            if (udp_len as usize) < UDP_HLEN || too_long {
                return Err(StatReason::PassTruncated);
            }
            (0, UDP_HLEN as u8)
        }
        _ => return Err(StatReason::PassOtherProto),
    };
    let sport: u16 = read(ctx, L4_OFF).ok_or(StatReason::PassTruncated)?;
    let dport: u16 = read(ctx, L4_OFF + 2).ok_or(StatReason::PassTruncated)?;

    Ok(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
        ttl_proto: ip.ttl_proto,
        tos: ip.tos,
        l4_hlen,
        tot_len: ip.tot_len,
        sent: Sent::Stack,
    })
}

/// An ICMP error quoting an IPv4 TCP or UDP packet whose ports are in the
/// quote (an option-less header, not a later fragment): what C3 translates.
/// `None` for any other ICMP message. Read with `bpf_skb_load_bytes`, so a
/// quote outside the linear data is read too.
#[inline(always)]
pub fn icmp_error(ctx: &TcContext, ip: &Ip) -> Option<IcmpError> {
    if ip.proto != PROTO_ICMP || ip.frag != Frag::None {
        return None;
    }
    if (ip.tot_len as usize) < IP_HLEN + ICMP_HLEN + IP_HLEN + 8 {
        return None;
    }
    let icmp_type: u8 = ctx.load(L4_OFF).ok()?;
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return None;
    }
    let vihl: u8 = ctx.load(INNER_IP_OFF).ok()?;
    let frag = u16::from_be(ctx.load::<u16>(INNER_IP_OFF + 6).ok()?);
    let inner_proto: u8 = ctx.load(INNER_IP_OFF + 9).ok()?;
    if vihl != 0x45
        || frag & IP_OFFSET_MASK != 0
        || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP)
    {
        return None;
    }
    Some(IcmpError {
        outer: Packet {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: 0,
            dport: 0,
            proto: PROTO_ICMP,
            tcp_flags: 0,
            ttl_proto: ip.ttl_proto,
            tos: ip.tos,
            l4_hlen: ICMP_HLEN as u8,
            tot_len: ip.tot_len,
            sent: Sent::Stack,
        },
        inner_saddr: ctx.load(INNER_IP_OFF + 12).ok()?,
        inner_daddr: ctx.load(INNER_IP_OFF + 16).ok()?,
        inner_sport: ctx.load(INNER_L4_OFF).ok()?,
        inner_dport: ctx.load(INNER_L4_OFF + 2).ok()?,
        inner_proto,
    })
}
