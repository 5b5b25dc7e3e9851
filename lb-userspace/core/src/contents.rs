//! What the agent-owned BPF maps hold ([`MapContents`]) and one write to
//! them ([`MapOp`]). Conntrack, affinity and counters belong to the datapath
//! and are not part of it.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use lb_common::{BackendSlot, BackendSlotKey, BackendValue, ServiceKey, ServiceValue};

use crate::desired::ServicePortName;

/// Exact contents of the agent-owned maps, in their own byte order
/// (addresses and ports in network order, as on the wire).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// LB_SERVICES: frontend -> service port.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// LB_BACKEND_SLOTS: (service id, slot) -> backend id.
    pub slots: BTreeMap<BackendSlotKey, BackendSlot>,
    /// LB_BACKENDS: backend id -> endpoint.
    pub backends: BTreeMap<u32, BackendValue>,
    /// LB_SERVICE_NAMES: service id -> the service port it belongs to.
    pub names: BTreeMap<u32, ServicePortName>,
    /// LB_NODE_ADDRS: NodePort addresses, network byte order.
    pub node_addrs: BTreeSet<u32>,
    /// LB_SOURCE_RANGES (F7): (service id, allowed source prefix).
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
}

/// One map write. The planner orders them so that the datapath never sees a
/// half-written backend set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, BackendValue),
    PutSlot(BackendSlotKey, BackendSlot),
    PutSourceRange(u32, Ipv4Net),
    /// Boxed: a name is four times the size of every other op, and a big
    /// cluster's first plan holds hundreds of thousands of ops.
    PutName(u32, Box<ServicePortName>),
    PutNodeAddr(u32),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    DeleteSlot(BackendSlotKey),
    DeleteSourceRange(u32, Ipv4Net),
    DeleteBackend(u32),
    DeleteName(u32),
    DeleteNodeAddr(u32),
}

impl MapOp {
    /// Mirrors the op into `contents` (after the dataplane executed it).
    pub fn apply_to(&self, contents: &mut MapContents) {
        match self {
            MapOp::PutBackend(id, v) => {
                contents.backends.insert(*id, *v);
            }
            MapOp::PutSlot(k, v) => {
                contents.slots.insert(*k, *v);
            }
            MapOp::PutSourceRange(id, net) => {
                contents.source_ranges.insert((*id, *net));
            }
            MapOp::DeleteSourceRange(id, net) => {
                contents.source_ranges.remove(&(*id, *net));
            }
            MapOp::PutName(id, n) => {
                contents.names.insert(*id, (**n).clone());
            }
            MapOp::PutNodeAddr(a) => {
                contents.node_addrs.insert(*a);
            }
            MapOp::PutService(k, v) => {
                contents.services.insert(*k, *v);
            }
            MapOp::DeleteService(k) => {
                contents.services.remove(k);
            }
            MapOp::DeleteSlot(k) => {
                contents.slots.remove(k);
            }
            MapOp::DeleteBackend(id) => {
                contents.backends.remove(id);
            }
            MapOp::DeleteName(id) => {
                contents.names.remove(id);
            }
            MapOp::DeleteNodeAddr(a) => {
                contents.node_addrs.remove(a);
            }
        }
    }

    /// Position in the one safe order of a plan: puts of what is reached
    /// through a frontend (backends, slots, source ranges, names, node
    /// addresses) come before the frontends that reach them, so a frontend
    /// is never published with a half-written set or without its source
    /// ranges (F7 fails closed); deletes go the other way: frontends first.
    pub fn phase(&self) -> u8 {
        match self {
            MapOp::PutBackend(..) => 0,
            MapOp::PutSlot(..) => 1,
            MapOp::PutSourceRange(..) => 2,
            MapOp::PutName(..) => 3,
            MapOp::PutNodeAddr(_) => 4,
            MapOp::PutService(..) => 5,
            MapOp::DeleteService(_) => 6,
            MapOp::DeleteSlot(_) => 7,
            MapOp::DeleteSourceRange(..) => 8,
            MapOp::DeleteBackend(_) => 9,
            MapOp::DeleteName(_) => 10,
            MapOp::DeleteNodeAddr(_) => 11,
        }
    }

    /// The first op of the delete phases.
    pub const FIRST_DELETE_PHASE: u8 = 6;
}
