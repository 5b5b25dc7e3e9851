//! Frontend lookup: at most two hash lookups (three with the node-address
//! check), whatever the number of services.

use lb_common::{ServiceKey, ServiceValue, SCOPE_EXACT, SCOPE_NODEPORT};

use crate::{
    maps::{LB_NODE_ADDRS, LB_SERVICES, LB_UPLINK_ADDRS},
    parse::Packet,
};

#[inline(always)]
fn get(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: a valid map value pointer; copied out at once.
    LB_SERVICES.get_ptr(key).map(|p| unsafe { *p })
}

/// The frontend `pkt` is addressed to: the exact (address, port, protocol)
/// frontend (ClusterIP, externalIP, LoadBalancer IP), else the NodePort
/// frontend of (port, protocol) when the destination is one of this node's
/// addresses (SEMANTICS F4). TCP and UDP are separate keys (F9).
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<ServiceValue> {
    let exact = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_EXACT,
    };
    if let Some(v) = get(&exact) {
        return Some(v);
    }
    LB_NODE_ADDRS.get_ptr(pkt.daddr)?;
    get(&ServiceKey {
        addr: 0,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_NODEPORT,
    })
}

/// The source address for SNAT'ing a new flow that arrived on uplink
/// `ifindex`: the frontend address itself when it is one of this node's
/// addresses (NodePort: the reply must come from what the client addressed),
/// otherwise the uplink's own address (an externalIP or LoadBalancer IP the
/// node does not own would not route back here).
#[inline(always)]
pub fn snat_source(pkt: &Packet, ifindex: u32) -> Option<u32> {
    if LB_NODE_ADDRS.get_ptr(pkt.daddr).is_some() {
        return Some(pkt.daddr);
    }
    // SAFETY: a valid map value pointer; copied out at once.
    LB_UPLINK_ADDRS
        .get_ptr(ifindex)
        .map(|a| unsafe { (*a).addr })
}
