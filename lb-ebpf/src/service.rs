//! Frontend lookup: at most two hash lookups (three with the node-address
//! check), whatever the number of services; the F7 source-range check (one
//! LPM trie lookup); the SNAT source of a flow from an uplink.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    service_flags, ServiceKey, ServiceValue, SourceRangeKey, SCOPE_EXACT, SCOPE_NODEPORT,
};

use crate::{
    maps::{LB_NODE_ADDRS, LB_SERVICES, LB_SOURCE_RANGES, LB_UPLINK_ADDRS},
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
    let found = lookup_dest(pkt.daddr, pkt.dport, pkt.proto);
    if let Some(v) = &found {
        // The service an event of this packet names (lbctl monitor).
        crate::monitor::note_service(v.service_id);
    }
    found
}

/// [`lookup`] by destination (address and port in network order, IP
/// protocol): also what the socket hooks (`sock`) look up, so both paths
/// match frontends by the same rules.
#[inline(always)]
pub fn lookup_dest(daddr: u32, dport: u16, proto: u8) -> Option<ServiceValue> {
    let exact = ServiceKey {
        addr: daddr,
        port: dport,
        proto,
        scope: SCOPE_EXACT,
    };
    if let Some(v) = get(&exact) {
        return Some(v);
    }
    LB_NODE_ADDRS.get_ptr(daddr)?;
    get(&ServiceKey {
        addr: 0,
        port: dport,
        proto,
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

/// F7 loadBalancerSourceRanges: whether a new flow from `saddr` may use
/// frontend `svc`. Only LoadBalancer frontends whose ranges are programmed
/// (`SOURCE_RANGES`) are filtered; the NodePort, ClusterIP and externalIP
/// frontends of the same port are not (kube-proxy's firewall chain hangs
/// off the LB IP rules only). One LPM lookup: (service id, source/32).
#[inline(always)]
pub fn source_allowed(svc: &ServiceValue, saddr: u32) -> bool {
    let filtered = service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES;
    if svc.flags & filtered != filtered {
        return true;
    }
    let key = Key::new(
        SourceRangeKey::prefix_len(32),
        SourceRangeKey::new(svc.service_id, saddr),
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}
