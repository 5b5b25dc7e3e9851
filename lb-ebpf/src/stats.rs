//! Per-CPU counters (`LB_STATS`), one slot per `lb_common::StatReason`.

use lb_common::StatReason;

use crate::maps::LB_STATS;

/// Adds one to the counter of `reason` on this CPU.
#[inline(always)]
pub fn count(reason: StatReason) {
    if let Some(slot) = LB_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by the program running on
        // this CPU, and programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}
