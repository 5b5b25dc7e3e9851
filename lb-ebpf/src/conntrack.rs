//! Conntrack: one LRU entry per direction of a translated flow.
//!
//! - FORWARD key: the packet as the client sends it (client -> frontend).
//! - REPLY key: the reply as it reaches the datapath, before reverse
//!   translation: (backend -> client), or (backend -> node address:SNAT port)
//!   for SNAT'ed flows.
//!
//! The datapath never deletes entries: the agent expires them. The datapath
//! ignores an expired FORWARD entry (and re-creates the flow); REPLY entries
//! are trusted while they exist (a late reply is still translated right).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use lb_common::{
    ct_flags, BackendValue, ConntrackEntry, ConntrackKey, DatapathConfig, StatReason,
    CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{LB_BACKENDS, LB_CONNTRACK},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// How many SNAT port candidates a new flow probes at most.
pub const SNAT_PROBES: u32 = 8;

const EEXIST: i32 = 17;

#[inline(always)]
pub fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> ConntrackKey {
    ConntrackKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// The key of `pkt` as seen (no translation) in direction `dir`.
#[inline(always)]
pub fn key_of(pkt: &Packet, dir: u8) -> ConntrackKey {
    key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, dir)
}

#[inline(always)]
pub fn expired(cfg: &DatapathConfig, proto: u8, entry: &ConntrackEntry, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) > cfg.ct_lifetime_ns(proto, entry.flags)
}

/// A UDP flow whose backend left its service port must move to a live
/// backend at once (SEMANTICS E4: no UDP flow stays black-holed): the
/// backend id is gone, names another endpoint now (ids are reused), or is
/// no longer a member of the flow's service port (in neither set). TCP
/// flows keep their backend, as with kube-proxy (an established connection
/// would only be reset by another backend).
#[inline(always)]
pub fn flow_moved(proto: u8, entry: &ConntrackEntry) -> bool {
    if proto != PROTO_UDP {
        return false;
    }
    match LB_BACKENDS.get_ptr(entry.backend_id) {
        // SAFETY: a valid map value pointer; copied out at once.
        Some(b) => {
            let b: BackendValue = unsafe { *b };
            b.addr != entry.nat_addr || b.port != entry.nat_port || !b.member_of(entry.service_id)
        }
        None => true,
    }
}

/// Whether `port` (network order) lies in the SNAT port range: every reply
/// of a SNAT'ed flow is addressed to such a port, so only those packets
/// need the REPLY lookup of the ingress pipeline.
#[inline(always)]
pub fn in_snat_range(cfg: &DatapathConfig, port: u16) -> bool {
    let p = u16::from_be(port);
    p >= cfg.snat_port_min && p <= cfg.snat_port_max
}

/// Conntrack bits a TCP packet's flags set, in either direction.
#[inline(always)]
pub fn tcp_bits(pkt: &Packet) -> u16 {
    if pkt.proto != PROTO_TCP {
        return 0;
    }
    let f = pkt.tcp_flags;
    let mut bits = 0;
    if f & TCP_SYN != 0 {
        bits |= ct_flags::TCP_SYN;
    }
    if f & TCP_FIN != 0 {
        bits |= ct_flags::TCP_FIN;
    }
    if f & TCP_RST != 0 {
        bits |= ct_flags::TCP_RST;
    }
    bits
}

/// Bits a packet in the forward direction adds to an entry with `flags`:
/// TCP flags, and ESTABLISHED for an ACK-only packet after a reply was seen.
#[inline(always)]
fn forward_bits(pkt: &Packet, flags: u16) -> u16 {
    let mut bits = tcp_bits(pkt);
    if pkt.proto == PROTO_TCP
        && pkt.tcp_flags & (TCP_ACK | TCP_SYN | TCP_FIN | TCP_RST) == TCP_ACK
        && flags & ct_flags::SEEN_REPLY != 0
    {
        bits |= ct_flags::TCP_ESTABLISHED;
    }
    bits
}

/// ORs `bits` into the entry under `key` (the other direction of a flow), so
/// both entries carry the same state for the agent's expiry.
#[inline(always)]
fn mirror_bits(key: &ConntrackKey, bits: u16) {
    if let Some(peer) = LB_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer. Racing writers can only lose
        // a state bit, which a later packet sets again.
        unsafe { (*peer).flags |= bits };
    }
}

/// A FORWARD entry matched `pkt`: refresh it. `entry` is the copy read
/// from `ptr`.
#[inline(always)]
pub fn touch_forward(ptr: *mut ConntrackEntry, entry: &ConntrackEntry, pkt: &Packet, now: u64) {
    let flags = entry.flags | forward_bits(pkt, entry.flags);
    // SAFETY: a valid map value pointer (see mirror_bits for races).
    unsafe {
        (*ptr).last_seen_ns = now;
        if flags != entry.flags {
            (*ptr).flags = flags;
        }
    }
    if flags != entry.flags {
        // The REPLY key, as the backend's answer will look.
        let reply = key_of(pkt, CT_DIR_FORWARD).peer(entry);
        mirror_bits(&reply, flags & !entry.flags);
    }
}

/// A REPLY entry matched `pkt`: mark the reply seen, refresh it, and tell the
/// FORWARD entry (its ESTABLISHED transition needs SEEN_REPLY).
#[inline(always)]
pub fn touch_reply(ptr: *mut ConntrackEntry, entry: &ConntrackEntry, pkt: &Packet, now: u64) {
    let flags = entry.flags | ct_flags::SEEN_REPLY | tcp_bits(pkt);
    // SAFETY: a valid map value pointer.
    unsafe {
        (*ptr).last_seen_ns = now;
        if flags != entry.flags {
            (*ptr).flags = flags;
        }
    }
    if flags != entry.flags {
        // The FORWARD key, as the client sent it.
        let forward = key_of(pkt, CT_DIR_REPLY).peer(entry);
        mirror_bits(&forward, flags & !entry.flags);
    }
}

#[inline(always)]
pub fn insert(key: &ConntrackKey, entry: &ConntrackEntry) -> Result<(), StatReason> {
    LB_CONNTRACK
        .insert(key, entry, BPF_ANY as u64)
        .map_err(|_| StatReason::DropConntrackFull)
}

#[inline(always)]
pub fn remove(key: &ConntrackKey) {
    let _ = LB_CONNTRACK.remove(key);
}

/// Picks a SNAT source port for a flow from `node_addr` to `backend` and
/// inserts the flow's REPLY entry under it, in one step: a port is free when
/// no REPLY entry (backend, node_addr, backend port, port) exists, and
/// inserting with BPF_NOEXIST claims it atomically against other CPUs.
/// Starts at a random port of `snat_port_min..=snat_port_max` and probes at
/// most `SNAT_PROBES` consecutive ports. Returns the port, network order.
#[inline(always)]
pub fn claim_snat_port(
    cfg: &DatapathConfig,
    backend: &BackendValue,
    node_addr: u32,
    proto: u8,
    reply: &ConntrackEntry,
) -> Result<u16, StatReason> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if max < min {
        return Err(StatReason::DropSnatExhausted);
    }
    let range = max - min + 1;
    // SAFETY: no preconditions.
    let start = unsafe { bpf_get_prandom_u32() }
        .checked_rem(range)
        .unwrap_or(0);
    for i in 0..SNAT_PROBES {
        let mut off = start + i;
        if off >= range {
            off -= range;
        }
        if off >= range {
            // Only with a range smaller than SNAT_PROBES.
            break;
        }
        let port = ((min + off) as u16).to_be();
        let k = key(
            backend.addr,
            node_addr,
            backend.port,
            port,
            proto,
            CT_DIR_REPLY,
        );
        match LB_CONNTRACK.insert(k, reply, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(port),
            Err(e) if e == -EEXIST => continue,
            Err(_) => return Err(StatReason::DropConntrackFull),
        }
    }
    Err(StatReason::DropSnatExhausted)
}
