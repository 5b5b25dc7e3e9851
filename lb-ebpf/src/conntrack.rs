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
    ct_flags, udp_stream_due, BackendValue, ConntrackEntry, ConntrackKey, DatapathConfig,
    StatReason, CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{config, SnatScratch, LB_BACKENDS, LB_CONNTRACK, LB_SNAT_SCRATCH},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

/// How many SNAT port candidates a new flow probes at most.
pub const SNAT_PROBES: u32 = 64;
/// After this many taken candidates in a row, probing goes on from a new
/// random place of the range (a run of taken ports, another CPU's recent
/// claims, is not walked to its end).
pub const SNAT_RUN: u32 = 8;

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
    let bits = forward_bits(pkt, flags) | udp_stream_bit(pkt, flags, fwd.created_s, now);
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
    let bits = ct_flags::SEEN_REPLY
        | tcp_bits(pkt, ct_flags::FIN_REPLY)
        | udp_stream_bit(
            pkt,
            entry.flags | ct_flags::SEEN_REPLY,
            entry.created_s,
            now,
        );
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

/// Conntrack bits a TCP packet's flags set: SYN, RST, and for a FIN both
/// `TCP_FIN` and the direction's `fin_dir` (`FIN_FORWARD`, `FIN_REPLY`).
#[inline(always)]
pub fn tcp_bits(pkt: &Packet, fin_dir: u16) -> u16 {
    if pkt.proto != PROTO_TCP {
        return 0;
    }
    let f = pkt.tcp_flags;
    let mut bits = 0;
    if f & TCP_SYN != 0 {
        bits |= ct_flags::TCP_SYN;
    }
    if f & TCP_FIN != 0 {
        bits |= ct_flags::TCP_FIN | fin_dir;
    }
    if f & TCP_RST != 0 {
        bits |= ct_flags::TCP_RST;
    }
    bits
}

/// UDP: `UDP_STREAM` when a packet of a flow with state `flags` (a reply
/// seen) passes at least `UDP_STREAM_AFTER_S` after the flow's creation
/// (`created_s`), as netfilter makes a UDP flow ASSURED: its lifetime
/// becomes `ct_udp_stream_ns`.
#[inline(always)]
fn udp_stream_bit(pkt: &Packet, flags: u16, created_s: u16, now: u64) -> u16 {
    if pkt.proto == PROTO_UDP
        && flags & (ct_flags::SEEN_REPLY | ct_flags::UDP_STREAM) == ct_flags::SEEN_REPLY
        && udp_stream_due(created_s, now)
    {
        ct_flags::UDP_STREAM
    } else {
        0
    }
}

/// Bits a packet in the forward direction adds to an entry with `flags`:
/// TCP flags, and ESTABLISHED for an ACK-only packet after a reply was seen.
#[inline(always)]
fn forward_bits(pkt: &Packet, flags: u16) -> u16 {
    let mut bits = tcp_bits(pkt, ct_flags::FIN_FORWARD);
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
pub fn remap_direct(pkt: &Packet, now: u64) -> Result<ConntrackEntry, StatReason> {
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
        flags: tcp_bits(pkt, ct_flags::FIN_FORWARD) | ct_flags::SNAT | ct_flags::PORT_REMAP,
        created_s: lb_common::created_s(now),
        last_seen_ns: now,
    };
    let port = claim_snat_port(&server, pkt.saddr, pkt.proto, &rev)?;
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
/// inserts the flow's REPLY entry `reply` under it, in one step: a port is
/// free when no REPLY entry (backend, node_addr, backend port, port)
/// exists, and inserting with BPF_NOEXIST claims it atomically against
/// other CPUs. Returns the port, network order. See
/// [`probe_snat_ports`] for how candidates are chosen.
#[inline(always)]
pub fn claim_snat_port(
    backend: &BackendValue,
    node_addr: u32,
    proto: u8,
    reply: &ConntrackEntry,
) -> Result<u16, StatReason> {
    let rc = probe_snat_ports(backend.addr, backend.port, node_addr, proto, reply);
    if rc >= 0 {
        Ok(rc as u16)
    } else if rc == SNAT_ERR_FULL {
        Err(StatReason::DropConntrackFull)
    } else {
        Err(StatReason::DropSnatExhausted)
    }
}

const SNAT_ERR_EXHAUSTED: i32 = -1;
const SNAT_ERR_FULL: i32 = -2;

/// The probing of [`claim_snat_port`]: a port (network order, >= 0) or
/// `SNAT_ERR_*`. A BPF function of its own whose frame is a few bytes:
/// it is called from the new-flow step, which leaves little of the
/// verifier's 512-byte stack; the key it probes with lives in the per-CPU
/// `LB_SNAT_SCRATCH`.
///
/// Candidates, at most `SNAT_PROBES` (64) of `snat_port_min..=snat_port_max`:
/// - start at this CPU's cursor, where its last claim ended (a random
///   place the first time), and walk on port by port. Each CPU thus hands
///   out the range in order, and the port after its cursor is the one it
///   handed out longest ago: with flows that end in the order they start,
///   the first candidate is free until the whole range is in use;
/// - after `SNAT_RUN` taken candidates in a row (another CPU's recent
///   claims, or flows that outlived their neighbours), jump to a random
///   place and walk on from there;
/// - a candidate is first looked up (cheap: a taken port costs one hash
///   lookup, counted `snat_port_taken`), and claimed with a BPF_NOEXIST
///   insert only when it looks free (another CPU may still win it: then
///   it counts as taken too);
/// - a new TCP connection (its first packet a SYN) may take over the port
///   of a closed flow idle for 2 s (`reclaim_closed`): closed flows hold
///   their ports for the TIME_WAIT lifetime (120 s) otherwise, which
///   caps the connection rate per backend at the range size / 120 s.
///
/// The cursor moves past the port claimed, or is reset (the next claim
/// starts at a random place) when nothing was found.
// The keys are passed by reference on purpose: they point into the per-CPU
// scratch value, and a by-value key would be copied onto the small stack.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn probe_snat_ports(
    backend_addr: u32,
    backend_port: u16,
    node_addr: u32,
    proto: u8,
    reply: &ConntrackEntry,
) -> i32 {
    let cfg = config();
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    let Some(s) = LB_SNAT_SCRATCH.get_ptr_mut(0) else {
        return SNAT_ERR_EXHAUSTED;
    };
    if max < min {
        return SNAT_ERR_EXHAUSTED;
    }
    let range = max - min + 1;
    // SAFETY: `s` is this CPU's scratch value; a program run is not
    // preempted on its CPU, so nothing else touches it meanwhile.
    unsafe {
        (*s).key = key(
            backend_addr,
            node_addr,
            backend_port,
            0,
            proto,
            CT_DIR_REPLY,
        );
        // The cursor is the offset of the next candidate + 1 (0: none yet).
        let mut off = (*s).cursor.wrapping_sub(1);
        if off >= range {
            off = random_below(range);
        }
        let mut run = 0;
        let reclaim = proto == PROTO_TCP && reply.flags & ct_flags::TCP_SYN != 0;
        for _ in 0..SNAT_PROBES {
            (*s).key.dport = ((min + off) as u16).to_be();
            let free = match LB_CONNTRACK.get_ptr(&(*s).key) {
                None => true,
                Some(old) => reclaim && reclaim_closed(s, old, reply.last_seen_ns),
            };
            if free {
                match LB_CONNTRACK.insert(&(*s).key, reply, BPF_NOEXIST as u64) {
                    Ok(()) => {
                        let next = off + 1;
                        (*s).cursor = if next >= range { 1 } else { next + 1 };
                        return i32::from((*s).key.dport);
                    }
                    Err(e) if e == -EEXIST => {}
                    Err(_) => return SNAT_ERR_FULL,
                }
            }
            count(StatReason::SnatPortTaken);
            run += 1;
            if run >= SNAT_RUN {
                run = 0;
                off = random_below(range);
            } else {
                off += 1;
                if off >= range {
                    off = 0;
                }
            }
        }
        (*s).cursor = 0;
    }
    SNAT_ERR_EXHAUSTED
}

/// How long a closed TCP flow (TIME_WAIT, CLOSE) must have been idle
/// before a new connection may take over its SNAT port: the last ACK of
/// the close and a retransmitted FIN have passed by then.
const SNAT_RECLAIM_IDLE_NS: u64 = 2_000_000_000;

/// A SNAT port candidate held by the REPLY entry `old` (under the scratch
/// key): when that flow is closed (FIN both ways, or reset) and idle for
/// `SNAT_RECLAIM_IDLE_NS`, both its entries are deleted and the port is
/// free for a new connection (its SYN opens a new flow; netfilter likewise
/// lets a new connection take over a tuple in TIME_WAIT). Counted
/// `snat_port_reclaimed`. Otherwise the port is taken.
#[allow(clippy::needless_borrows_for_generic_args)] // as in probe_snat_ports
#[inline(always)]
unsafe fn reclaim_closed(s: *mut SnatScratch, old: *const ConntrackEntry, now: u64) -> bool {
    // SAFETY (whole function): `s` is this CPU's scratch value, `old` a
    // valid map value pointer (read field by field, never kept).
    unsafe {
        let flags = (*old).flags;
        let fin_both = ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY;
        if flags & ct_flags::TCP_RST == 0 && flags & fin_both != fin_both {
            return false;
        }
        if now.saturating_sub((*old).last_seen_ns) < SNAT_RECLAIM_IDLE_NS {
            return false;
        }
        // The flow's FORWARD entry goes too, if it is still this flow's.
        (*s).old_forward = (*s).key.peer(&*old);
        if let Some(f) = LB_CONNTRACK.get_ptr(&(*s).old_forward) {
            if (*s).old_forward.peer(&*f) == (*s).key {
                let _ = LB_CONNTRACK.remove(&(*s).old_forward);
            }
        }
        let _ = LB_CONNTRACK.remove(&(*s).key);
        count(StatReason::SnatPortReclaimed);
        true
    }
}

/// A random number in `0..n` (n > 0); the modulo bias is negligible for
/// port ranges.
#[inline(always)]
fn random_below(n: u32) -> u32 {
    // SAFETY: no preconditions.
    unsafe { bpf_get_prandom_u32() }.checked_rem(n).unwrap_or(0)
}
