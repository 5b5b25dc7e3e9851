//! C3: ICMP errors about translated flows are translated back, outer and
//! embedded (quoted) headers alike, as netfilter's NAT does for RELATED
//! packets. Without this, a router's "fragmentation needed" about a packet
//! lb DNAT'ed names the backend, and the client, which only knows the
//! frontend, ignores it: path MTU discovery, "port unreachable" and "time
//! exceeded" break through Services.
//!
//! An ICMP error quotes the packet that caused it, as its sender sent it.
//! The quoted packet, reversed, is a conntrack key:
//! - **toward the client** (about a forward packet: the client's request
//!   after DNAT, `client -> backend`, or `node:snat port -> backend` when
//!   SNAT'ed): reversed, it is the flow's REPLY key. The quote's destination
//!   goes back to the frontend (and, SNAT'ed or port-remapped, its source
//!   back to the client), like the reply itself would be. Plain DNAT and
//!   port-remapped flows are translated at the client's edge, the egress
//!   hook where their replies are; SNAT'ed ones at ingress, where their
//!   replies are, and redirected like them.
//! - **toward the backend** (about a reply the client received from the
//!   frontend: the client's "port unreachable", say): reversed, it is the
//!   flow's FORWARD key, seen at the client's ingress. The quote's source
//!   goes to the backend (and its destination to the SNAT address), and the
//!   error is sent on like the flow's forward packets.
//!
//! The outer header follows: its destination becomes the one the error's
//! real receiver has; an outer source that is the backend itself becomes
//! the frontend (a router's address stays). Checksums: the outer IPv4
//! header with the kernel helper; the quoted IPv4 header, the quoted UDP or
//! TCP checksum (when in the quote; a UDP checksum of 0 stays 0) and the
//! ICMP checksum incrementally (RFC 1624), so each stays exactly as right
//! as it was. Every change is balanced by its checksum, so a
//! CHECKSUM_COMPLETE skb's sum stays valid too.

use lb_common::{ct_flags, ConntrackEntry, ConntrackKey, StatReason, PROTO_UDP};

use crate::{
    conntrack,
    csum::{rewrite_ip_addr, CsumUpdate, RewriteError, IP_DADDR_OFF, IP_OFF, IP_SADDR_OFF, L4_OFF},
    maps::LB_CONNTRACK,
    parse::{IcmpError, INNER_IP_OFF, INNER_L4_OFF},
};
use aya_ebpf::programs::TcContext;
use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY};

const ICMP_CSUM_OFF: usize = L4_OFF + 2;
const INNER_CSUM_OFF: usize = INNER_IP_OFF + 10;
const INNER_SADDR_OFF: usize = INNER_IP_OFF + 12;
const INNER_DADDR_OFF: usize = INNER_IP_OFF + 16;
const INNER_SPORT_OFF: usize = INNER_L4_OFF;
const INNER_DPORT_OFF: usize = INNER_L4_OFF + 2;
const INNER_UDP_CSUM_OFF: usize = INNER_L4_OFF + 6;
const INNER_TCP_CSUM_OFF: usize = INNER_L4_OFF + 16;

/// The flow an ICMP error at ingress belongs to, and which way it travels.
pub enum Related {
    /// None of lb's (or translated at egress).
    No,
    /// About a SNAT'ed flow's forward packet; travels to the client,
    /// forwarded by the datapath.
    ToClient,
    /// About a reply; travels to the backend, forwarded by the datapath
    /// when the flow is SNAT'ed (not just port-remapped).
    ToBackend { snat: bool },
}

/// The conntrack key of the quoted packet reversed, in direction `dir`.
#[inline(always)]
fn reversed(e: &IcmpError, dir: u8) -> ConntrackKey {
    conntrack::key(
        e.inner_daddr,
        e.inner_saddr,
        e.inner_dport,
        e.inner_sport,
        e.inner_proto,
        dir,
    )
}

#[inline(always)]
fn entry(key: &ConntrackKey) -> Option<ConntrackEntry> {
    // SAFETY: a valid map value pointer; copied out at once.
    LB_CONNTRACK.get_ptr(key).map(|p| unsafe { *p })
}

/// At an egress hook: an error toward a client whose flow is translated
/// here (plain DNAT, or port-remapped). One lookup.
#[inline(always)]
pub fn related_at_egress(e: &IcmpError) -> Option<ConntrackEntry> {
    let re = entry(&reversed(e, CT_DIR_REPLY))?;
    let snat = re.flags & ct_flags::SNAT != 0;
    let remap = re.flags & ct_flags::PORT_REMAP != 0;
    (!snat || remap).then_some(re)
}

/// At an ingress hook: an error toward a backend (about a reply), or toward
/// a client of a SNAT'ed flow (whose quoted source port is a SNAT port).
/// One or two lookups; fills in `w` for the first two.
#[inline(always)]
pub fn related_at_ingress(e: &IcmpError, snat_port: bool, w: &mut Rewrite) -> Related {
    if let Some(fe) = entry(&reversed(e, CT_DIR_FORWARD)) {
        *w = to_backend(e, &fe);
        let snat = fe.flags & (ct_flags::SNAT | ct_flags::PORT_REMAP) == ct_flags::SNAT;
        return Related::ToBackend { snat };
    }
    if !snat_port {
        return Related::No;
    }
    match entry(&reversed(e, CT_DIR_REPLY)) {
        Some(re) if re.flags & (ct_flags::SNAT | ct_flags::PORT_REMAP) == ct_flags::SNAT => {
            *w = to_client(e, &re);
            Related::ToClient
        }
        _ => Related::No,
    }
}

/// The quoted packet and the outer header after translation.
#[derive(Clone, Copy, Default)]
pub struct Rewrite {
    pub outer_saddr: u32,
    pub outer_daddr: u32,
    pub inner_saddr: u32,
    pub inner_sport: u16,
    pub inner_daddr: u32,
    pub inner_dport: u16,
}

/// The rewrite of an error toward the client, with the flow's REPLY entry:
/// the quote's destination (the backend) back to the frontend; with SNAT
/// or a remapped port, the quote's source back to the client and the outer
/// destination to the client's address.
#[inline(always)]
pub fn to_client(e: &IcmpError, re: &ConntrackEntry) -> Rewrite {
    let snat = re.flags & ct_flags::SNAT != 0;
    let (client, client_port) = if snat {
        (re.snat_addr, re.snat_port)
    } else {
        (e.inner_saddr, e.inner_sport)
    };
    Rewrite {
        outer_saddr: if e.outer.saddr == e.inner_daddr {
            re.nat_addr
        } else {
            e.outer.saddr
        },
        outer_daddr: if snat { client } else { e.outer.daddr },
        inner_saddr: client,
        inner_sport: client_port,
        inner_daddr: re.nat_addr,
        inner_dport: re.nat_port,
    }
}

/// The rewrite of an error toward the backend, with the flow's FORWARD
/// entry: the quote's source (the frontend) to the backend, the outer
/// destination to the backend; with SNAT or a remapped port, the quote's
/// destination (the client) to the SNAT address and port, the outer source
/// to the SNAT address.
#[inline(always)]
pub fn to_backend(e: &IcmpError, fe: &ConntrackEntry) -> Rewrite {
    let snat = fe.flags & ct_flags::SNAT != 0;
    let (src, src_port) = if snat {
        (fe.snat_addr, fe.snat_port)
    } else {
        (e.inner_daddr, e.inner_dport)
    };
    Rewrite {
        outer_saddr: if snat { src } else { e.outer.saddr },
        outer_daddr: fe.nat_addr,
        inner_saddr: fe.nat_addr,
        inner_sport: fe.nat_port,
        inner_daddr: src,
        inner_dport: src_port,
    }
}

#[inline(always)]
fn load16(ctx: &TcContext, off: usize) -> Result<u16, RewriteError> {
    ctx.load::<u16>(off)
        .map(u16::from_be)
        .map_err(|_| RewriteError)
}

#[inline(always)]
fn store16(ctx: &TcContext, off: usize, v: u16) -> Result<(), RewriteError> {
    ctx.store(off, &v.to_be(), 0).map_err(|_| RewriteError)
}

/// Applies `w` to the ICMP error `e` in the packet, and updates `e.outer`.
#[inline(always)]
pub fn apply(ctx: &TcContext, e: &mut IcmpError, w: &Rewrite) -> Result<(), RewriteError> {
    let mut icmp = CsumUpdate::new(load16(ctx, ICMP_CSUM_OFF)?);

    // The quoted IPv4 header: addresses and its checksum.
    let old_ip_csum = load16(ctx, INNER_CSUM_OFF)?;
    let mut ip_csum = CsumUpdate::new(old_ip_csum);
    ip_csum.addr(e.inner_saddr, w.inner_saddr);
    ip_csum.addr(e.inner_daddr, w.inner_daddr);
    let new_ip_csum = ip_csum.finish();
    icmp.addr(e.inner_saddr, w.inner_saddr);
    icmp.addr(e.inner_daddr, w.inner_daddr);
    icmp.word(old_ip_csum, new_ip_csum);
    icmp.port(e.inner_sport, w.inner_sport);
    icmp.port(e.inner_dport, w.inner_dport);

    // The quoted L4 checksum, where the quote holds it: its pseudo-header
    // has the addresses, its header the ports.
    let l4_csum_off = if e.inner_proto == PROTO_UDP {
        INNER_UDP_CSUM_OFF
    } else {
        INNER_TCP_CSUM_OFF
    };
    let in_quote = IP_OFF + e.outer.tot_len as usize >= l4_csum_off + 2;
    let l4_csum = if in_quote {
        let old = load16(ctx, l4_csum_off)?;
        if e.inner_proto == PROTO_UDP && old == 0 {
            None
        } else {
            let mut c = CsumUpdate::new(old);
            c.addr(e.inner_saddr, w.inner_saddr);
            c.addr(e.inner_daddr, w.inner_daddr);
            c.port(e.inner_sport, w.inner_sport);
            c.port(e.inner_dport, w.inner_dport);
            let mut new = c.finish();
            if e.inner_proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp.word(old, new);
            Some(new)
        }
    } else {
        None
    };

    ctx.store(INNER_SADDR_OFF, &w.inner_saddr, 0)
        .map_err(|_| RewriteError)?;
    ctx.store(INNER_DADDR_OFF, &w.inner_daddr, 0)
        .map_err(|_| RewriteError)?;
    store16(ctx, INNER_CSUM_OFF, new_ip_csum)?;
    ctx.store(INNER_SPORT_OFF, &w.inner_sport, 0)
        .map_err(|_| RewriteError)?;
    ctx.store(INNER_DPORT_OFF, &w.inner_dport, 0)
        .map_err(|_| RewriteError)?;
    if let Some(c) = l4_csum {
        store16(ctx, l4_csum_off, c)?;
    }
    store16(ctx, ICMP_CSUM_OFF, icmp.finish())?;

    rewrite_ip_addr(ctx, IP_SADDR_OFF, e.outer.saddr, w.outer_saddr)?;
    rewrite_ip_addr(ctx, IP_DADDR_OFF, e.outer.daddr, w.outer_daddr)?;
    e.outer.saddr = w.outer_saddr;
    e.outer.daddr = w.outer_daddr;
    e.inner_saddr = w.inner_saddr;
    e.inner_sport = w.inner_sport;
    e.inner_daddr = w.inner_daddr;
    e.inner_dport = w.inner_dport;
    Ok(())
}

/// Counts a translated error.
#[inline(always)]
pub fn translated() {
    crate::stats::count(StatReason::IcmpErrorTranslated);
}
