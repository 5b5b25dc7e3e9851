//! Egress pipeline (pod and uplink): reverse NAT of replies.
//!
//! A reply of a flow this node translated leaves through the interface
//! towards the client with the backend's address as source; put the
//! frontend's address back (and, for a flow whose client port was remapped,
//! C2, the client's port). Both entries of the flow are refreshed, a missing
//! FORWARD entry rebuilt (C1). ICMP errors toward such a client about its
//! flow's packets are translated here too (C3), and later fragments get
//! what their first fragment got (C4). Every packet that continues,
//! translated or not, returns TCX_NEXT / TC_ACT_UNSPEC (C5). Replies of
//! SNAT'ed flows (to a node address or the hairpin address) are not
//! translated here: they are caught at the ingress of the interface they
//! arrive on (the uplink, or the backend pod's interface) and redirected
//! (see `ingress`).

use aya_ebpf::programs::TcContext;
use lb_common::{ct_flags, StatReason, CT_DIR_REPLY, FRAG_DIR_EGRESS};

use crate::{
    conntrack, frag, icmp,
    maps::LB_CONNTRACK,
    nat,
    parse::{self, Frag, IcmpError, Packet, PROTO_ICMP},
    stats::{count, drop, pass},
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    count(StatReason::Packets);
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(reason) => return pass(reason),
    };
    // C4: a later fragment gets what its first fragment got.
    if ip.frag == Frag::Later {
        return frag::later(ctx, &ip, FRAG_DIR_EGRESS);
    }
    let mut pkt = parse::unparsed(&ip);
    let verdict = if ip.proto == PROTO_ICMP {
        match parse::icmp_error(ctx, &ip) {
            Some(mut e) => icmp_error(ctx, &mut e),
            None => pass(StatReason::PassOtherProto),
        }
    } else {
        match parse::l4(ctx, &ip) {
            Ok(p) => {
                pkt = p;
                reply(ctx, &mut pkt)
            }
            Err(reason) => pass(reason),
        }
    };
    if ip.frag == Frag::First {
        frag::record(&ip, FRAG_DIR_EGRESS, verdict, &pkt);
    }
    verdict
}

/// A TCP or UDP packet: the reply of a flow translated at this client's
/// edge?
#[inline(always)]
fn reply(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    let key = conntrack::key_of(pkt, CT_DIR_REPLY);
    if let Some(ptr) = LB_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; copied out at once.
        let entry = unsafe { *ptr };
        // Plain DNAT replies, and those of flows whose client port was
        // remapped (C2); SNAT'ed flows are answered at ingress.
        let remapped = entry.flags & ct_flags::PORT_REMAP != 0;
        if entry.flags & ct_flags::SNAT == 0 || remapped {
            conntrack::touch_reply(ptr, &entry, pkt);
            if nat::snat(ctx, pkt, entry.nat_addr, entry.nat_port).is_err()
                || (remapped && nat::dnat(ctx, pkt, entry.snat_addr, entry.snat_port).is_err())
            {
                return drop(StatReason::DropRewriteFailed);
            }
            count(StatReason::ReplyTranslated);
            return pass(StatReason::PassTranslated);
        }
    }
    pass(StatReason::PassNotService)
}

/// C3: an ICMP error toward a client of a flow translated at its edge
/// (about the request as DNAT'ed, e.g. "fragmentation needed" from a router
/// on the way to the backend): quote and outer header translated back.
#[inline(never)]
fn icmp_error(ctx: &TcContext, e: &mut IcmpError) -> i32 {
    let Some(re) = icmp::related_at_egress(e) else {
        return pass(StatReason::PassOtherProto);
    };
    let w = icmp::to_client(e, &re);
    if icmp::apply(ctx, e, &w).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    icmp::translated();
    pass(StatReason::PassTranslated)
}
