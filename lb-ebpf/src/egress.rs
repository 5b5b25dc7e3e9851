//! Egress pipeline (pod and uplink): reverse NAT of replies.
//!
//! A reply of a flow this node translated leaves through the interface
//! towards the client with the backend's address as source; put the
//! frontend's address back. SNAT'ed flows never get here: their replies come
//! back in on the uplink (see `ingress`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_boot_ns,
    programs::TcContext,
};
use lb_common::{ct_flags, StatReason, CT_DIR_REPLY};

use crate::{conntrack, maps::LB_CONNTRACK, nat, parse::parse, stats::count};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    count(StatReason::Packets);
    let mut pkt = match parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            count(reason);
            return TC_ACT_OK;
        }
    };

    let key = conntrack::key_of(&pkt, CT_DIR_REPLY);
    if let Some(ptr) = LB_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; copied out at once.
        let entry = unsafe { *ptr };
        if entry.flags & ct_flags::SNAT == 0 {
            // SAFETY: no preconditions.
            let now = unsafe { bpf_ktime_get_boot_ns() };
            conntrack::touch_reply(ptr, &entry, &pkt, now);
            if nat::snat(ctx, &mut pkt, entry.nat_addr, entry.nat_port).is_err() {
                count(StatReason::DropRewriteFailed);
                return TC_ACT_SHOT;
            }
            count(StatReason::ReplyTranslated);
            return TC_ACT_OK;
        }
    }
    count(StatReason::PassNotService);
    TC_ACT_OK
}
