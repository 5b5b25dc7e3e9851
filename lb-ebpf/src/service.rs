//! Frontend lookup: at most two hash lookups (three with the node-address
//! check), whatever the number of services.

use lb_common::{ServiceKey, ServiceValue, SCOPE_EXACT, SCOPE_NODEPORT};

use crate::{
    maps::{LB_NODE_ADDRS, LB_SERVICES},
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
