//! Header offsets and incremental checksum rewrites.
//!
//! Only IPv4 without options reaches a rewrite (the parser passes everything
//! else unchanged), so every offset is a constant.
//!
//! Checksums follow the kernel's rules (as Cilium does):
//! - an address is part of the IPv4 header checksum and of the TCP/UDP
//!   pseudo-header: `bpf_l3_csum_replace` + `bpf_l4_csum_replace` with
//!   `BPF_F_PSEUDO_HDR` (which also keeps `CHECKSUM_PARTIAL` and
//!   `CHECKSUM_COMPLETE` skbs right);
//! - a port is plain L4 data: `bpf_l4_csum_replace` without the flag;
//! - UDP uses `BPF_F_MARK_MANGLED_0`: a zero checksum ("none") stays zero and
//!   a computed 0 is written as 0xffff.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

pub const ETH_HLEN: usize = 14;
pub const ETH_PROTO_OFF: usize = 12;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_HLEN: usize = 20;
pub const IP_TTL_OFF: usize = IP_OFF + 8;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
pub const L4_OFF: usize = IP_OFF + IP_HLEN;
pub const L4_SPORT_OFF: usize = L4_OFF;
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
pub const TCP_HLEN: usize = 20;
pub const TCP_FLAGS_OFF: usize = L4_OFF + 13;
pub const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub const UDP_HLEN: usize = 8;
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// The rewrite failed half-way; the packet must be dropped.
pub struct RewriteError;

#[inline(always)]
fn l4_csum_off(proto: u8) -> usize {
    if proto == PROTO_UDP {
        UDP_CSUM_OFF
    } else {
        TCP_CSUM_OFF
    }
}

#[inline(always)]
fn l4_flags(proto: u8) -> u64 {
    if proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Replaces the IPv4 address at `off` (`IP_SADDR_OFF` or `IP_DADDR_OFF`),
/// both in network byte order as stored in the packet, fixing the IPv4 header
/// checksum and the TCP/UDP pseudo-header checksum.
#[inline(always)]
pub fn rewrite_addr(
    ctx: &TcContext,
    proto: u8,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| RewriteError)?;
    ctx.l4_csum_replace(
        l4_csum_off(proto),
        u64::from(old),
        u64::from(new),
        BPF_F_PSEUDO_HDR as u64 | l4_flags(proto) | 4,
    )
    .map_err(|_| RewriteError)?;
    ctx.store(off, &new, 0).map_err(|_| RewriteError)
}

/// Replaces the TCP/UDP port at `off` (`L4_SPORT_OFF` or `L4_DPORT_OFF`),
/// network byte order, fixing the L4 checksum.
#[inline(always)]
pub fn rewrite_port(
    ctx: &TcContext,
    proto: u8,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        l4_csum_off(proto),
        u64::from(old),
        u64::from(new),
        l4_flags(proto) | 2,
    )
    .map_err(|_| RewriteError)?;
    ctx.store(off, &new, 0).map_err(|_| RewriteError)
}

/// Decrements the IPv4 TTL (for packets the datapath forwards itself),
/// fixing the header checksum. `ttl_proto` is the 16-bit word at
/// `IP_TTL_OFF` as read from the packet (TTL, then protocol).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ttl_proto: u16) -> Result<(), RewriteError> {
    let bytes = ttl_proto.to_ne_bytes();
    let new = u16::from_ne_bytes([bytes[0].wrapping_sub(1), bytes[1]]);
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(ttl_proto), u64::from(new), 2)
        .map_err(|_| RewriteError)?;
    ctx.store(IP_TTL_OFF, &new, 0).map_err(|_| RewriteError)
}

/// Replaces an IPv4 address of a header whose protocol has no
/// pseudo-header (the outer header of an ICMP message), fixing only the
/// IPv4 header checksum.
#[inline(always)]
pub fn rewrite_ip_addr(
    ctx: &TcContext,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| RewriteError)?;
    ctx.store(off, &new, 0).map_err(|_| RewriteError)
}

/// Incremental update of an Internet checksum field (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')) over any number of changed 16-bit words, for
/// rewrites the kernel helpers cannot do (the headers quoted in an ICMP
/// error). Words are big-endian values as in the packet.
pub struct CsumUpdate(u32);

impl CsumUpdate {
    /// Starts from the checksum field's current value.
    #[inline(always)]
    pub fn new(check: u16) -> Self {
        Self(u32::from(!check))
    }

    /// One word changed from `old` to `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    /// An IPv4 address (network order, as stored) changed.
    #[inline(always)]
    pub fn addr(&mut self, old: u32, new: u32) {
        let (o, n) = (old.to_ne_bytes(), new.to_ne_bytes());
        self.word(
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([n[0], n[1]]),
        );
        self.word(
            u16::from_be_bytes([o[2], o[3]]),
            u16::from_be_bytes([n[2], n[3]]),
        );
    }

    /// A port (network order, as stored) changed.
    #[inline(always)]
    pub fn port(&mut self, old: u16, new: u16) {
        self.word(u16::from_be(old), u16::from_be(new));
    }

    /// The new checksum field.
    #[inline(always)]
    pub fn finish(self) -> u16 {
        let mut s = self.0;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}
