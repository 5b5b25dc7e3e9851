//! `lbctl monitor`: the events the datapath writes into its ring buffer
//! (`LB_MONITOR_EVENTS`) when the agent loaded it with `--monitor`.
//!
//! The switch is a load-time global (`LB_MONITOR`, patched into `.rodata`
//! before verification): with 0 the verifier proves every monitoring branch
//! dead and removes it, so a datapath without `--monitor` pays nothing for
//! it per packet. The aya-log debug lines (`--datapath-debug-log`) are
//! behind a bit of the same global.

use bytemuck::{Pod, Zeroable};

use crate::StatReason;

/// Name of the ring buffer map (also the static's name in lb-ebpf). Pinned
/// under the agent's pin directory only while the agent runs with
/// `--monitor`: an absent pin means monitoring is off.
pub const EVENTS_MAP: &str = "LB_MONITOR_EVENTS";
/// The load-time global (u8) holding the `switch` bits; 0 = all off.
pub const SWITCH_GLOBAL: &str = "LB_MONITOR";

/// Bits of `SWITCH_GLOBAL`. One global for both, so that a datapath with
/// both off tests one constant where it would test two.
pub mod switch {
    /// Events into `LB_MONITOR_EVENTS` (`lb-agent --monitor`).
    pub const EVENTS: u8 = 1 << 0;
    /// aya-log debug lines (`lb-agent --datapath-debug-log`).
    pub const DEBUG_LOG: u8 = 1 << 1;
}
/// Bytes of the ring buffer with `--monitor` (a power of two, a multiple
/// of the page size): about 4,600 events queue up while the reader is
/// slow; what does not fit is lost (the datapath never waits).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Bytes of the ring buffer without `--monitor`: the map is part of the
/// object either way, so it is made as small as the kernel allows.
pub const EVENTS_BYTES_OFF: u32 = 4096;
/// Written into every event; a reader refuses other versions instead of
/// misreading them (the agent and lbctl may be of different releases).
pub const EVENT_VERSION: u8 = 1;

/// `MonitorEvent::kind`.
pub mod kind {
    /// The packet was dropped (`reason`: a `StatReason` that `is_drop`).
    pub const DROP: u8 = 1;
    /// The packet was turned into a TCP reset / ICMP port unreachable to
    /// its sender: the service port has no endpoint (E1).
    pub const REJECT: u8 = 2;
    /// A new flow was translated to a backend (`nat_*`: the packet as it
    /// left the program).
    pub const TRANSLATE: u8 = 3;
    /// One direction of a known flow was found without the other: evicted
    /// by the conntrack LRU, or removed by the GC racing the packet (C1).
    pub const EVICT: u8 = 4;

    /// (kind, name), for parsing and printing.
    pub const ALL: [(u8, &str); 4] = [
        (DROP, "drop"),
        (REJECT, "reject"),
        (TRANSLATE, "translate"),
        (EVICT, "evict"),
    ];

    pub fn name(kind: u8) -> Option<&'static str> {
        ALL.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n)
    }
}

/// `MonitorEvent::hook`: the program that wrote the event.
pub mod hook {
    pub const POD_INGRESS: u8 = 1;
    pub const POD_EGRESS: u8 = 2;
    pub const UPLINK_INGRESS: u8 = 3;
    pub const UPLINK_EGRESS: u8 = 4;

    pub fn name(hook: u8) -> &'static str {
        match hook {
            POD_INGRESS => "pod-ingress",
            POD_EGRESS => "pod-egress",
            UPLINK_INGRESS => "uplink-ingress",
            UPLINK_EGRESS => "uplink-egress",
            _ => "unknown",
        }
    }
}

/// The event kind a counted `StatReason` is reported as, besides drops
/// (every `drop()` is a DROP event). One rule for the datapath (which
/// notes these reasons when it counts them) and for lbctl (`--reason`).
#[inline(always)]
pub const fn counted_kind(reason: StatReason) -> u8 {
    match reason {
        StatReason::RejectNoEndpoint => kind::REJECT,
        StatReason::NewFlow => kind::TRANSLATE,
        StatReason::ConntrackPeerMissing => kind::EVICT,
        _ => 0,
    }
}

/// One event in `LB_MONITOR_EVENTS`. Addresses and ports in network byte
/// order, as in the packet and the maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MonitorEvent {
    /// bpf_ktime_get_boot_ns() when the program ended.
    pub ts_ns: u64,
    /// `EVENT_VERSION`.
    pub version: u8,
    /// `kind::*`.
    pub kind: u8,
    /// `hook::*`.
    pub hook: u8,
    /// IP protocol of the packet (0: not IPv4).
    pub proto: u8,
    /// The `StatReason` (as u32) that decided the event.
    pub reason: u32,
    /// The service port the packet was addressed to (its frontend looked up
    /// by this packet); 0: none was looked up.
    pub service_id: u32,
    /// The interface the program ran on.
    pub ifindex: u32,
    /// The packet as it reached the program. Ports 0 when it has none
    /// (ICMP, a later fragment, IPv4 with options).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// TRANSLATE: the packet as it left the program (after DNAT, and SNAT
    /// if any). Zero for other kinds.
    pub nat_saddr: u32,
    pub nat_daddr: u32,
    pub nat_sport: u16,
    pub nat_dport: u16,
}

impl MonitorEvent {
    /// The reason as a `StatReason`, if it is one this build knows.
    pub fn stat_reason(&self) -> Option<StatReason> {
        StatReason::ALL.get(self.reason as usize).copied()
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy and bytemuck::Pod (no padding, any bit pattern
// valid), which is what aya::Pod requires.
unsafe impl aya::Pod for MonitorEvent {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_layout_is_fixed() {
        // lbctl reads these bytes from the ring buffer: a change is a new
        // EVENT_VERSION.
        assert_eq!(core::mem::size_of::<MonitorEvent>(), 48);
        assert_eq!(core::mem::align_of::<MonitorEvent>(), 8);
        assert_eq!(EVENTS_BYTES % 4096, 0);
        assert!(EVENTS_BYTES.is_power_of_two());
    }

    #[test]
    fn counted_kinds_are_not_drops() {
        for r in StatReason::ALL {
            if counted_kind(r) != 0 {
                assert!(!r.is_drop(), "{} is counted as a drop already", r.name());
            }
        }
        assert_eq!(kind::name(kind::EVICT), Some("evict"));
        assert_eq!(kind::name(9), None);
    }
}
