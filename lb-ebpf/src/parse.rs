//! Ethernet II / IPv4 / TCP / UDP parsing.
//!
//! The parser only reads. Anything it does not fully understand is passed on
//! unchanged with the reason as the error: not IPv4 (ARP, IPv6, VLAN-tagged),
//! IPv4 with options, fragments, truncated headers, other protocols.

use aya_ebpf::programs::TcContext;
use lb_common::{StatReason, PROTO_TCP, PROTO_UDP};

use crate::csum::{
    ETH_HLEN, ETH_PROTO_OFF, IP_HLEN, IP_OFF, L4_OFF, TCP_FLAGS_OFF, TCP_HLEN, UDP_HLEN,
};

const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the datapath needs from a packet. Addresses and ports are in network
/// byte order, exactly as in the packet (and in the maps).
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
}

/// The bytes the parser looks at: Ethernet, IPv4 without options, and the
/// fixed part of a TCP header (the longer of TCP and UDP).
const PARSE_LEN: usize = L4_OFF + TCP_HLEN;

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

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, StatReason> {
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
    let frag = u16::from_be(read::<u16>(ctx, IP_OFF + 6).ok_or(StatReason::PassTruncated)?);
    if frag & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(StatReason::PassFragment);
    }
    let tos: u8 = read(ctx, IP_OFF + 1).ok_or(StatReason::PassTruncated)?;
    let ttl_proto: u16 = read(ctx, IP_OFF + 8).ok_or(StatReason::PassTruncated)?;
    let proto = ttl_proto.to_ne_bytes()[1];
    let saddr: u32 = read(ctx, IP_OFF + 12).ok_or(StatReason::PassTruncated)?;
    let daddr: u32 = read(ctx, IP_OFF + 16).ok_or(StatReason::PassTruncated)?;
    let l4_len = tot_len as usize - IP_HLEN;

    let tcp_flags = match proto {
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
            flags
        }
        PROTO_UDP => {
            if l4_len < UDP_HLEN || ptr_at::<[u8; UDP_HLEN]>(ctx, L4_OFF).is_none() {
                return Err(StatReason::PassTruncated);
            }
            let udp_len =
                u16::from_be(read::<u16>(ctx, L4_OFF + 4).ok_or(StatReason::PassTruncated)?);
            if (udp_len as usize) < UDP_HLEN || udp_len as usize > l4_len {
                return Err(StatReason::PassTruncated);
            }
            0
        }
        _ => return Err(StatReason::PassOtherProto),
    };
    let sport: u16 = read(ctx, L4_OFF).ok_or(StatReason::PassTruncated)?;
    let dport: u16 = read(ctx, L4_OFF + 2).ok_or(StatReason::PassTruncated)?;

    Ok(Packet {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        ttl_proto,
        tos,
    })
}
