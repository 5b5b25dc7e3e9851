//! `lbctl monitor`: datapath events in a ring buffer (`LB_MONITOR_EVENTS`),
//! and aya-log debug lines, both behind the load-time switch `LB_MONITOR`.
//!
//! Free when off: `LB_MONITOR` lives in `.rodata`, which the loader patches
//! (`EbpfLoader::override_global`) and freezes before the programs are
//! verified. The verifier then knows its value, proves every branch that
//! tests it dead and removes that code: a datapath loaded without
//! `--monitor` runs only the load of the switch and no branch on it, not a
//! per-packet lookup of a map value. docs/datapath.md has the instruction
//! counts.
//!
//! How an event is put together, without touching the pipeline's own code
//! or its stack (the ingress chain is close to the verifier's 512 bytes):
//! - [`begin`] (entry of a TC program) records the packet as it arrived
//!   in a per-CPU note (`LB_MONITOR_NOTE`, map memory, not stack);
//! - the places that decide an outcome note it as they count it:
//!   `stats::drop` (every drop, with its reason), `stats::count` for the
//!   reasons of `lb_common::monitor::counted_kind` (rejects, new flows,
//!   conntrack peers found missing), `service::lookup` (the service id);
//! - [`finish`] (end of the program) copies each noted event from the note
//!   into the ring buffer, with the packet as it leaves for a new flow.
//!
//! One TC program runs at a time on a CPU (softirq, or with bottom halves
//! off), so the per-CPU note is never shared by two runs; [`begin`] starts
//! every run with a clean note anyway.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    btf_maps::{PerCpuArray, RingBuf},
    helpers::{bpf_ktime_get_boot_ns, bpf_map_lookup_elem},
    macros::btf_map,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    monitor::{kind, switch, MonitorEvent, EVENTS_BYTES, EVENT_VERSION},
    StatReason, PROTO_TCP, PROTO_UDP,
};

use crate::csum::{ETH_PROTO_OFF, IP_OFF, L4_OFF};

/// `lb_common::monitor::switch` bits, patched in by the loader; 0 (the
/// default of the object, and of every test that does not ask) is off.
#[unsafe(no_mangle)]
static LB_MONITOR: u8 = 0;

/// Events for `lbctl monitor`. Pinned by the agent only with `--monitor`;
/// without it the loader makes it as small as the kernel allows.
#[btf_map]
pub static LB_MONITOR_EVENTS: RingBuf<MonitorEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// The event of the current program run, put together in map memory (see
/// the module doc). Not pinned: nothing in it outlives a run.
#[btf_map]
static LB_MONITOR_NOTE: PerCpuArray<Note, 1> = PerCpuArray::new();

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Note {
    ev: MonitorEvent,
    /// Bit `1 << kind` for every kind noted in this run.
    kinds: u32,
    /// The reason of a DROP (the other kinds have one reason each).
    drop_reason: u32,
}

/// The switch bits. The volatile read keeps the compiler from folding the
/// compiled-in 0; the verifier folds the patched value instead.
#[inline(always)]
fn switches() -> u8 {
    // SAFETY: LB_MONITOR is a valid, aligned static.
    unsafe { core::ptr::read_volatile(&LB_MONITOR) }
}

/// The key of the note's one slot, in `.rodata`: the lookup helper reads
/// it from there, so the BPF functions below need no stack at all. They
/// are called from deep in the ingress chain, whose combined stack is close
/// to the verifier's 512 bytes; a frameless function adds nothing to it.
#[unsafe(no_mangle)]
static LB_MONITOR_NOTE_KEY: u32 = 0;

#[inline(always)]
fn note() -> Option<&'static mut Note> {
    // SAFETY: the map and key pointers are valid statics; the key is the
    // map's one index.
    let p = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(&LB_MONITOR_NOTE).cast_mut().cast(),
            core::ptr::from_ref(&LB_MONITOR_NOTE_KEY).cast(),
        )
    };
    // SAFETY: a per-CPU slot, used by the one program running on this CPU
    // (module doc).
    (!p.is_null()).then(|| unsafe { &mut *p.cast::<Note>() })
}

/// Entry of a TC program run on `hook` (`lb_common::monitor::hook`).
#[inline(always)]
pub fn begin(ctx: &TcContext, hook: u8) {
    if switches() != 0 {
        begin_slow(ctx, hook);
    }
}

#[inline(never)]
fn begin_slow(ctx: &TcContext, hook: u8) {
    let Some(n) = note() else { return };
    n.kinds = 0;
    n.drop_reason = 0;
    n.ev = MonitorEvent {
        version: EVENT_VERSION,
        hook,
        // SAFETY: the context's skb is valid for the program's run.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        ..MonitorEvent::default()
    };
    let (proto, saddr, daddr, sport, dport) = tuple(ctx);
    n.ev.proto = proto;
    n.ev.saddr = saddr;
    n.ev.daddr = daddr;
    n.ev.sport = sport;
    n.ev.dport = dport;
}

/// (protocol, source, destination, source port, destination port) of the
/// packet in `ctx` as it is now, network order; zeros for what it does not
/// have. Read directly from the packet, without the parser's structs: the
/// datapath handles Ethernet + IPv4 without options (the rest passes
/// unchanged and is never an event).
#[inline(always)]
fn tuple(ctx: &TcContext) -> (u8, u32, u32, u16, u16) {
    let start = ctx.data();
    if start + L4_OFF + 4 > ctx.data_end() {
        return (0, 0, 0, 0, 0);
    }
    // SAFETY: the bytes up to L4_OFF + 4 are inside the packet (checked);
    // packet data has no alignment guarantee, hence read_unaligned.
    unsafe {
        let at = |off: usize| start + off;
        let ethertype: u16 = core::ptr::read_unaligned(at(ETH_PROTO_OFF) as *const u16);
        if ethertype != 0x0800u16.to_be() {
            return (0, 0, 0, 0, 0);
        }
        let ver_ihl: u8 = *(at(IP_OFF) as *const u8);
        let proto: u8 = *(at(IP_OFF + 9) as *const u8);
        let frag: u16 = core::ptr::read_unaligned(at(IP_OFF + 6) as *const u16);
        let saddr: u32 = core::ptr::read_unaligned(at(IP_OFF + 12) as *const u32);
        let daddr: u32 = core::ptr::read_unaligned(at(IP_OFF + 16) as *const u32);
        // Ports only where they are: no options, TCP or UDP, not a later
        // fragment (offset bits 0).
        let ports = ver_ihl == 0x45
            && (proto == PROTO_TCP || proto == PROTO_UDP)
            && u16::from_be(frag) & 0x1fff == 0;
        if !ports {
            return (proto, saddr, daddr, 0, 0);
        }
        let sport: u16 = core::ptr::read_unaligned(at(L4_OFF) as *const u16);
        let dport: u16 = core::ptr::read_unaligned(at(L4_OFF + 2) as *const u16);
        (proto, saddr, daddr, sport, dport)
    }
}

/// Notes an event of `kind` for `reason` (`stats::drop`, `stats::count`).
#[inline(always)]
pub fn note_kind(kind: u8, reason: StatReason) {
    if switches() != 0 {
        note_slow(kind, reason as u32);
    }
}

#[inline(never)]
fn note_slow(kind: u8, reason: u32) {
    if let Some(n) = note() {
        n.kinds |= 1 << kind;
        if kind == kind::DROP {
            n.drop_reason = reason;
        }
    }
}

/// Notes the service port the packet is addressed to (`service::lookup`).
#[inline(always)]
pub fn note_service(service_id: u32) {
    if switches() != 0 {
        note_service_slow(service_id);
    }
}

#[inline(never)]
fn note_service_slow(service_id: u32) {
    if let Some(n) = note() {
        n.ev.service_id = service_id;
    }
}

/// End of a TC program run with `verdict`: sends what was noted.
#[inline(always)]
pub fn finish(ctx: &TcContext, verdict: i32) {
    if switches() != 0 {
        finish_slow(ctx, verdict);
    }
}

#[inline(never)]
fn finish_slow(ctx: &TcContext, verdict: i32) {
    let Some(n) = note() else { return };
    let kinds = n.kinds;
    if kinds == 0 {
        return;
    }
    n.kinds = 0;
    // SAFETY: a helper without arguments.
    n.ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    let noted = |k: u8| kinds & (1 << k) != 0;
    // A drop is an event only when the packet really was dropped.
    if noted(kind::DROP) && verdict == TC_ACT_SHOT {
        emit(ctx, n, kind::DROP, n.drop_reason);
    }
    if noted(kind::REJECT) {
        emit(ctx, n, kind::REJECT, StatReason::RejectNoEndpoint as u32);
    }
    if noted(kind::TRANSLATE) {
        let (proto, saddr, daddr, sport, dport) = tuple(ctx);
        // The first packet of a new flow that was answered instead (an
        // ICMP error, C3) left as something else: no "after" tuple.
        if proto == n.ev.proto {
            n.ev.nat_saddr = saddr;
            n.ev.nat_daddr = daddr;
            n.ev.nat_sport = sport;
            n.ev.nat_dport = dport;
        }
        emit(ctx, n, kind::TRANSLATE, StatReason::NewFlow as u32);
        n.ev.nat_saddr = 0;
        n.ev.nat_daddr = 0;
        n.ev.nat_sport = 0;
        n.ev.nat_dport = 0;
    }
    if noted(kind::EVICT) {
        emit(ctx, n, kind::EVICT, StatReason::ConntrackPeerMissing as u32);
    }
}

/// Writes the note as an event of `kind`: into the ring buffer with the
/// events switch, as a debug line with the debug-log switch. A full ring
/// buffer loses the event (the datapath never waits for the reader).
#[inline(always)]
fn emit(ctx: &TcContext, n: &mut Note, kind: u8, reason: u32) {
    n.ev.kind = kind;
    n.ev.reason = reason;
    let s = switches();
    if s & switch::EVENTS != 0 {
        // Copied from map memory into the ring buffer by the helper: the
        // event is never built on the stack (passing it by value, as clippy
        // suggests, would copy it there first).
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = LB_MONITOR_EVENTS.output(&n.ev, 0);
    }
    if s & switch::DEBUG_LOG != 0 {
        log(ctx, &n.ev);
    }
}

/// One debug line per event (aya-log, read by the agent with
/// `--datapath-debug-log`). A BPF function of its own: the log record is
/// put together on its stack, which is only as deep as `finish`'s caller.
#[inline(never)]
fn log(ctx: &TcContext, ev: &MonitorEvent) {
    let ip = |a: u32| core::net::Ipv4Addr::from(a.to_ne_bytes());
    let port = u16::from_be;
    debug!(
        ctx,
        "{}: kind {} reason {} service {} ifindex {} proto {} {}:{} -> {}:{} now {}:{} -> {}:{}",
        ev.hook,
        ev.kind,
        ev.reason,
        ev.service_id,
        ev.ifindex,
        ev.proto,
        ip(ev.saddr),
        port(ev.sport),
        ip(ev.daddr),
        port(ev.dport),
        ip(ev.nat_saddr),
        port(ev.nat_sport),
        ip(ev.nat_daddr),
        port(ev.nat_dport)
    );
}
