//! Per-CPU counters (`LB_STATS`), one slot per `lb_common::StatReason`, and
//! the verdicts that end a program run, each with its outcome counted
//! (`StatReason::is_outcome`: every run ends on exactly one).

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use lb_common::{
    monitor::{counted_kind, kind},
    StatReason,
};

use crate::{maps::LB_STATS, monitor};

/// The verdict of every packet that continues, translated or not: TCX_NEXT
/// under TCX, TC_ACT_UNSPEC on a legacy clsact filter (the same value, -1).
/// The next TCX program, then the legacy tc filters of the interface (the
/// CNI bandwidth plugin's, observability tools'), still see the packet;
/// when none is left, it goes up the stack (SEMANTICS C5). TC_ACT_OK would
/// end the chain there.
pub const NEXT: i32 = TC_ACT_UNSPEC;

/// Adds one to the counter of `reason` on this CPU, and notes it for
/// `lbctl monitor` when it is one of the reasons reported as an event
/// (`lb_common::monitor::counted_kind`; decided at compile time for the
/// constant reasons almost every call passes).
#[inline(always)]
pub fn count(reason: StatReason) {
    bump(reason);
    let kind = counted_kind(reason);
    if kind != 0 {
        monitor::note_kind(kind, reason);
    }
}

#[inline(always)]
fn bump(reason: StatReason) {
    if let Some(slot) = LB_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by the program running on
        // this CPU, and programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

/// Lets the packet continue (`NEXT`), counting `reason` as its outcome.
/// No pass reason is an event: counted without the monitor's check, which
/// would otherwise stay in the hot path for the run-time reasons.
#[inline(always)]
pub fn pass(reason: StatReason) -> i32 {
    bump(reason);
    NEXT
}

/// Drops the packet, counting `reason` as its outcome; every drop is a
/// `lbctl monitor` event.
#[inline(always)]
pub fn drop(reason: StatReason) -> i32 {
    bump(reason);
    monitor::note_kind(kind::DROP, reason);
    TC_ACT_SHOT
}
