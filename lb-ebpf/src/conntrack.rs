//! Conntrack: one LRU entry per direction of a translated flow.
//!
//! - FORWARD key: the packet as the client sends it (client -> frontend).
//! - REPLY key: the reply as it reaches the datapath, before reverse
//!   translation: (backend -> client), or (backend -> node address:SNAT port)
//!   for SNAT'ed flows.
//!
//! The two entries of a flow live and die together (SEMANTICS C1):
//! - every packet, in either direction, refreshes both (`last_seen_ns` and
//!   the state bits), so a flow whose traffic is all replies stays alive;
//! - a flow is expired only when both entries are idle past its lifetime
//!   (`DatapathConfig::flow_expired`, also what the agent's GC uses);
//! - a hit in one direction always looks up its peer; a peer that is
//!   missing (LRU eviction, the GC racing a packet) is re-created from the
//!   entry that was found (`ConntrackKey::peer_entry`), with BPF_NOEXIST so
//!   that a key another flow took meanwhile is never overwritten.
//!
//! The datapath never deletes entries of live flows: the agent's GC
//! deletes idle ones. The datapath ignores an expired FORWARD entry (and
//! re-creates the flow); a REPLY entry is trusted while it exists (a late
//! reply is still translated right, and revives its flow).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
};
use lb_common::{
    ct_flags, BackendValue, ConntrackEntry, ConntrackKey, DatapathConfig, StatReason,
    CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{LB_BACKENDS, LB_CONNTRACK},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
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

/// CLOCK_BOOTTIME in ns, the clock of every `last_seen_ns`.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The entry under `key`: a pointer to it and a copy.
#[inline(always)]
fn get(key: &ConntrackKey) -> Option<(*mut ConntrackEntry, ConntrackEntry)> {
    // SAFETY: a valid map value pointer; copied out at once.
    LB_CONNTRACK.get_ptr_mut(key).map(|p| (p, unsafe { *p }))
}

/// The entry under `key` if it belongs to the flow whose other direction
/// is `peer` (it pairs back to it).
#[inline(always)]
fn get_paired(
    key: &ConntrackKey,
    peer: &ConntrackKey,
) -> Option<(*mut ConntrackEntry, ConntrackEntry)> {
    get(key).filter(|(_, e)| key.peer(e) == *peer)
}

/// Refreshes an entry: `last_seen_ns` and the new state `bits`.
#[inline(always)]
fn refresh(ptr: *mut ConntrackEntry, bits: u16, now: u64) {
    // SAFETY: a valid map value pointer. Racing writers can only lose a
    // state bit (a later packet sets it again) or a refresh of a few ns.
    unsafe {
        (*ptr).last_seen_ns = now;
        let flags = (*ptr).flags;
        if flags | bits != flags {
            (*ptr).flags = flags | bits;
        }
    }
}

/// Re-creates the missing direction `key` of a flow from its other
/// direction `peer` (C1). BPF_NOEXIST: if another CPU repaired it first,
/// fine; if another flow took the key meanwhile, it stays that flow's and
/// the repair fails. Counts `conntrack_repaired` when this call wrote it.
#[inline(always)]
fn repair(key: &ConntrackKey, entry: &ConntrackEntry, peer: &ConntrackKey) -> bool {
    match LB_CONNTRACK.insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(StatReason::ConntrackRepaired);
            true
        }
        Err(e) if e == -EEXIST => get_paired(key, peer).is_some(),
        Err(_) => false,
    }
}

/// A FORWARD entry matched a packet.
pub enum Forward {
    /// Translate with this entry (both directions refreshed).
    Use(ConntrackEntry),
    /// Handle the packet as a new flow: the flow expired (both directions
    /// idle), its UDP backend left (E4), or its REPLY direction is gone and
    /// its key now belongs to another flow.
    Recreate,
}

/// Looks up the FORWARD entry of `pkt` and checks it against its REPLY
/// peer (C1): `None` on a miss. A live flow is refreshed in both
/// directions; a missing REPLY entry is re-created.
#[inline(always)]
pub fn lookup_forward(cfg: &DatapathConfig, pkt: &Packet) -> Option<Forward> {
    let fkey = key_of(pkt, CT_DIR_FORWARD);
    let (fptr, fwd) = get(&fkey)?;
    // Read the clock only on a hit: most traffic is no known flow.
    let now = now();
    let rkey = fkey.peer(&fwd);
    let rev = get_paired(&rkey, &fkey);
    if cfg.flow_expired(pkt.proto, &fwd, rev.as_ref().map(|r| &r.1), now) {
        count(StatReason::ConntrackExpired);
        return Some(Forward::Recreate);
    }
    if flow_moved(pkt.proto, &fwd) {
        count(StatReason::FlowMoved);
        return Some(Forward::Recreate);
    }
    let flags = fwd.flags | rev.map_or(0, |r| r.1.flags);
    if reopens_closed_flow(pkt, flags) {
        count(StatReason::ConntrackReopened);
        return Some(Forward::Recreate);
    }
    let bits = forward_bits(pkt, flags);
    match rev {
        Some((rptr, _)) => refresh(rptr, bits, now),
        None => {
            count(StatReason::ConntrackPeerMissing);
            let mut entry = fkey.peer_entry(&fwd);
            entry.flags |= bits;
            entry.last_seen_ns = now;
            if !repair(&rkey, &entry, &fkey) {
                return Some(Forward::Recreate);
            }
        }
    }
    refresh(fptr, bits, now);
    Some(Forward::Use(fwd))
}

/// A REPLY entry `entry` (at `ptr`) matched `pkt`: refresh it and its
/// FORWARD peer with the reply's bits (SEEN_REPLY, TCP flags), or re-create
/// the FORWARD entry when it is missing (C1). A FORWARD entry that pairs
/// with another REPLY key (the flow was re-created, e.g. moved to another
/// backend) is left alone: this REPLY entry is a leftover that still
/// translates late replies until the GC takes it.
#[inline(always)]
pub fn touch_reply(ptr: *mut ConntrackEntry, entry: &ConntrackEntry, pkt: &Packet) {
    let now = now();
    let rkey = key_of(pkt, CT_DIR_REPLY);
    let fkey = rkey.peer(entry);
    let bits = ct_flags::SEEN_REPLY | tcp_bits(pkt);
    refresh(ptr, bits, now);
    match get(&fkey) {
        Some((fptr, fwd)) => {
            if fkey.peer(&fwd) == rkey {
                refresh(fptr, bits, now);
            }
        }
        None => {
            count(StatReason::ConntrackPeerMissing);
            let mut fwd = rkey.peer_entry(entry);
            fwd.flags |= bits;
            fwd.last_seen_ns = now;
            repair(&fkey, &fwd, &rkey);
        }
    }
}

/// F3: a SYN without ACK on a flow that saw FIN or RST is a new connection
/// that reuses the client's port (a client that binds a fixed port, or
/// port reuse within the closing timeout), not a retransmission: it gets a
/// new backend pick, as netfilter re-opens a TIME_WAIT/CLOSE entry on a
/// SYN. A SYN on a flow that never closed is a retransmission and keeps
/// its backend.
#[inline(always)]
fn reopens_closed_flow(pkt: &Packet, flags: u16) -> bool {
    pkt.proto == PROTO_TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && flags & (ct_flags::TCP_FIN | ct_flags::TCP_RST) != 0
}

/// A UDP flow whose backend left its service port must move to a live
/// backend at once (SEMANTICS E4: no UDP flow stays black-holed): the
/// backend id is gone, names another endpoint now (ids are reused), or is
/// no longer a member of the flow's service port (in neither set). TCP
/// flows keep their backend, as with kube-proxy (an established connection
/// would only be reset by another backend).
#[inline(always)]
pub fn flow_moved(proto: u8, entry: &ConntrackEntry) -> bool {
    // Backend id 0 is never allocated: a direct flow with a remapped port
    // (C2), which has no backend to lose.
    if proto != PROTO_UDP || entry.backend_id == 0 {
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

/// C2: claims the REPLY key `rkey` for a new flow whose FORWARD key is
/// `fkey`, keeping the client's address and port. Inserted with
/// BPF_NOEXIST; a key that is already there is taken over only when it is
/// this flow's own (a re-created flow to the same backend) or its flow is
/// dead (both directions idle past their lifetime). Otherwise it belongs to
/// another live flow, a **clash** (`Ok(true)`): the caller remaps the
/// client's source port, as netfilter does. Before this, the second flow's
/// REPLY entry replaced the first's, whose replies then left with the
/// wrong source address.
#[inline(always)]
pub fn claim_reply(
    cfg: &DatapathConfig,
    rkey: &ConntrackKey,
    rev: &ConntrackEntry,
    fkey: &ConntrackKey,
    now: u64,
) -> Result<bool, StatReason> {
    match LB_CONNTRACK.insert(rkey, rev, BPF_NOEXIST as u64) {
        Ok(()) => return Ok(false),
        Err(e) if e == -EEXIST => {}
        Err(_) => return Err(StatReason::DropConntrackFull),
    }
    if let Some((_, old)) = get(rkey) {
        let old_fkey = rkey.peer(&old);
        if old_fkey != *fkey {
            let old_fwd = get_paired(&old_fkey, rkey);
            if !cfg.flow_expired(rkey.proto, &old, old_fwd.as_ref().map(|f| &f.1), now) {
                return Ok(true);
            }
        }
    }
    LB_CONNTRACK
        .insert(rkey, rev, BPF_ANY as u64)
        .map(|()| false)
        .map_err(|_| StatReason::DropConntrackFull)
}

/// C2: inserts a new flow's FORWARD entry with BPF_NOEXIST, so that two
/// CPUs creating the same flow at once never send it to two backends: the
/// one that loses gets `Ok(Some(winner))` and uses the winner's entry.
#[inline(always)]
pub fn insert_forward(
    fkey: &ConntrackKey,
    fwd: &ConntrackEntry,
) -> Result<Option<ConntrackEntry>, StatReason> {
    match LB_CONNTRACK.insert(fkey, fwd, BPF_NOEXIST as u64) {
        Ok(()) => Ok(None),
        Err(e) if e == -EEXIST => match get(fkey) {
            Some((_, winner)) => Ok(Some(winner)),
            // Gone again at once (the GC): ours then.
            None => LB_CONNTRACK
                .insert(fkey, fwd, BPF_ANY as u64)
                .map(|()| None)
                .map_err(|_| StatReason::DropConntrackFull),
        },
        Err(_) => Err(StatReason::DropConntrackFull),
    }
}

/// C2: whether replies to `pkt` (which is not service traffic) would be
/// taken for a translated flow's: a REPLY entry is keyed by its reverse
/// tuple (the pod reuses the source port of a flow to a frontend, now
/// towards that flow's backend directly). Only asked for packets that
/// open a flow (a TCP SYN, any UDP datagram).
#[inline(always)]
pub fn reply_tuple_taken(pkt: &Packet) -> bool {
    let opens = match pkt.proto {
        PROTO_UDP => true,
        PROTO_TCP => pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        _ => false,
    };
    opens
        && LB_CONNTRACK
            .get_ptr(key(
                pkt.daddr,
                pkt.saddr,
                pkt.dport,
                pkt.sport,
                pkt.proto,
                CT_DIR_REPLY,
            ))
            .is_some()
}

/// C2: tracks a direct (untranslated) flow whose reverse tuple clashes
/// with a translated flow's REPLY key, with its source port remapped, as
/// netfilter does: FORWARD (client:port -> server) {nat: the server itself,
/// snat: client:new port} and REPLY (server -> client:new port) {nat: the
/// server, snat: client:port}, backend and service id 0. Returns the entry
/// its packets get.
#[inline(always)]
pub fn remap_direct(
    cfg: &DatapathConfig,
    pkt: &Packet,
    now: u64,
) -> Result<ConntrackEntry, StatReason> {
    let server = BackendValue {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        flags: 0,
        service_id: 0,
    };
    let rev = ConntrackEntry {
        nat_addr: pkt.daddr,
        snat_addr: pkt.saddr,
        nat_port: pkt.dport,
        snat_port: pkt.sport,
        backend_id: 0,
        service_id: 0,
        flags: tcp_bits(pkt) | ct_flags::SNAT | ct_flags::PORT_REMAP,
        _pad: 0,
        last_seen_ns: now,
    };
    let port = claim_snat_port(cfg, &server, pkt.saddr, pkt.proto, &rev)?;
    let fwd = ConntrackEntry {
        snat_port: port,
        ..rev
    };
    let rkey = key(
        pkt.daddr,
        pkt.saddr,
        pkt.dport,
        port,
        pkt.proto,
        CT_DIR_REPLY,
    );
    let fkey = key_of(pkt, CT_DIR_FORWARD);
    match insert_forward(&fkey, &fwd) {
        Ok(None) => {
            count(StatReason::PortRemapped);
            Ok(fwd)
        }
        Ok(Some(winner)) => {
            remove(&rkey);
            count(StatReason::ConntrackRaceLost);
            Ok(winner)
        }
        Err(reason) => {
            remove(&rkey);
            Err(reason)
        }
    }
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
