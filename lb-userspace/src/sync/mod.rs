//! Sync: the ordered, minimal list of map writes that turns the applied map
//! contents into the desired state.
//!
//! Two planners, one set of rules:
//! - [`plan`] / [`plan_with_limits`] / [`SyncState::plan_full`]: the whole
//!   desired state. Computes the complete target [`MapContents`] (with stable
//!   ids) and diffs it against what is applied. O(everything); for the
//!   initial list, relists and the manifest mode.
//! - [`SyncState::plan_ports`]: only the service ports one watch event
//!   changed, against an indexed mirror of the maps. Cost proportional to
//!   those ports (times log N), never to the total; a watch event changes
//!   only the entries it touches. With the other ports unchanged it gives
//!   the same ops, ids and counts as the whole-state planner (a property
//!   test holds them equal), except on conflicts (below).
//!
//! Only differences are written, never a flush: an unchanged desired state
//! against matching contents gives no ops at all, also right after an agent
//! restart ([`SyncState::new`] adopts what is in the maps).
//!
//! # Ids
//! - A service port keeps its `service_id` if one of its desired frontends is
//!   already in `applied.services` (preferring the id whose applied name is
//!   this port's, then the smallest); otherwise it gets the smallest id >= 1
//!   not used anywhere in the applied maps nor in the plan. Ids still in the
//!   applied maps are never handed to another service port in the same plan,
//!   so a frontend about to be deleted never sees another service's slots.
//! - A backend is identified by (address, port, protocol) and keeps the id
//!   it has in `applied.backends`; a new one gets the smallest id >= 1 not in
//!   `applied.backends`, not referenced by an applied slot and not yet
//!   allocated. Ids are one space over all protocols: TCP and UDP never
//!   share one.
//!
//! [`SyncState`] keeps the free ids of both spaces as intervals, so "the
//! smallest free id" is O(log n) there too.
//!
//! # Backend flags
//! A backend is shared by every service port that lists its (address, port,
//! protocol): it is LOCAL if any use is local, TERMINATING only if every use
//! is a terminating fallback. The maps hold only the combined flags, so
//! [`SyncState`] records how each service port uses each backend when it
//! plans that port, and recomputes a shared backend's flags from all its
//! uses when one port changes.
//!
//! # Order
//! `PutBackend -> PutSlot -> PutName -> PutNodeAddr -> PutService ->
//! DeleteService -> DeleteSlot -> DeleteBackend -> DeleteName ->
//! DeleteNodeAddr`: slots are complete and point to existing backends
//! before a service entry publishes counts covering them, and nothing a
//! live entry can reach is deleted before the entries stop reaching it (a
//! backend only once no slot of any service references it).
//!
//! # Capacity and conflicts
//! A service port that cannot be programmed (a backend set over
//! [`Limits::max_backends_per_service`], or a map that would overflow) is
//! skipped alone and reported in [`Plan::errors`]; everything else is
//! programmed. Service ports are admitted in [`DesiredState`] order, so which
//! ones are skipped is deterministic. A skipped port is not programmed at
//! all: entries it had are removed (a partial set would be worse). A frontend
//! key present in two desired service ports (the model never produces this)
//! stays with the first and is reported for the second.
//!
//! [`SyncState::plan_ports`] counts the ports outside the change set as they
//! are, and treats a frontend key already programmed for a port outside the
//! change set as a bad update: that port is reported and left exactly as it
//! was (a working service is not taken down by a bad update of it). Within
//! the change set the rules above apply.
//!
//! Limits count the target contents only; while a plan runs the maps hold
//! old and new entries together, so the maps need some headroom over the
//! limits given here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::state::{
    DesiredServicePort, DesiredState, Endpoint, MapContents, MapOp, Protocol, ServicePortName,
};

mod full;
mod ids;
mod incremental;
#[cfg(test)]
mod tests;

pub use incremental::SyncState;

/// Map capacities the plan must stay within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries of LB_SERVICES (frontends).
    pub max_services: u32,
    /// Entries of LB_BACKENDS.
    pub max_backends: u32,
    /// Entries of LB_BACKEND_SLOTS.
    pub max_backend_slots: u32,
    /// Backends in one set (cluster-wide or node-local) of one service port.
    pub max_backends_per_service: u32,
    /// Entries of LB_NODE_ADDRS.
    pub max_node_addrs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: lb_common::MAX_SERVICES,
            max_backends: lb_common::MAX_BACKENDS,
            max_backend_slots: lb_common::MAX_BACKEND_SLOTS,
            max_backends_per_service: lb_common::MAX_BACKENDS_PER_SERVICE,
            max_node_addrs: lb_common::MAX_NODE_ADDRS,
        }
    }
}

/// What one sync must write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Map writes, in the order they must be executed.
    pub ops: Vec<MapOp>,
    /// Service ports (service ids) added, removed, or whose frontends,
    /// flags or affinity timeout changed
    /// (kubeproxy_sync_proxy_rules_service_changes_total).
    pub service_changes: usize,
    /// Service ports whose programmed backend sets (cluster or node-local,
    /// including backend flags) changed, added or removed ones included when
    /// they have backends (kubeproxy_sync_proxy_rules_endpoint_changes_total).
    pub endpoint_changes: usize,
    /// What was not programmed and why; the rest of the plan is complete.
    pub errors: Vec<SyncError>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("{service}: {count} backends in its {set} set, more than the {max} one service port can hold; not programmed")]
    TooManyBackends {
        service: String,
        set: &'static str,
        count: usize,
        max: u32,
    },
    #[error("{service}: the {map} map would exceed its {max} entries; not programmed")]
    MapFull {
        service: String,
        map: &'static str,
        max: u32,
    },
    #[error("{service}: frontend {frontend} is already programmed for {owner}; skipped")]
    DuplicateFrontend {
        service: String,
        frontend: String,
        owner: String,
    },
    #[error("node address {addr}: more than {max} node addresses; not programmed")]
    TooManyNodeAddrs { addr: Ipv4Addr, max: u32 },
    /// The only hard error: no free id in the u32 space (cannot happen with
    /// maps of the sizes lb uses).
    #[error("no free {what} id left")]
    IdsExhausted { what: &'static str },
}

impl SyncError {
    /// namespace and name of the Service an error is about, if one.
    pub fn service_ref(&self) -> Option<(String, String)> {
        let service = match self {
            SyncError::TooManyBackends { service, .. }
            | SyncError::MapFull { service, .. }
            | SyncError::DuplicateFrontend { service, .. } => service,
            SyncError::TooManyNodeAddrs { .. } | SyncError::IdsExhausted { .. } => return None,
        };
        // ServicePortName's Display: namespace/name:port/PROTO or namespace/name/PROTO.
        let (ns, rest) = service.split_once('/')?;
        let name = rest.split([':', '/']).next()?;
        Some((ns.to_string(), name.to_string()))
    }
}

/// [`plan_with_limits`] with the capacities of lb-common.
pub fn plan(
    applied: &MapContents,
    desired: &DesiredState,
    node_addrs: &BTreeSet<Ipv4Addr>,
) -> Result<Plan, SyncError> {
    plan_with_limits(applied, desired, node_addrs, &Limits::default())
}

/// Plans the writes that make `applied` equal to `desired` (plus the node
/// addresses): [`SyncState::plan_full`] without keeping the state. See the
/// module docs.
pub fn plan_with_limits(
    applied: &MapContents,
    desired: &DesiredState,
    node_addrs: &BTreeSet<Ipv4Addr>,
    limits: &Limits,
) -> Result<Plan, SyncError> {
    // Same code as SyncState::plan_full; no index is needed for a whole
    // diff, so `applied` is not copied into a SyncState.
    full::plan(applied, &desired.services, node_addrs, limits).map(|(plan, _)| plan)
}

/// A backend's identity: (address, port, protocol), network byte order.
type BackendTuple = (u32, u16, u8);

fn backend_tuple(e: &Endpoint, proto: Protocol) -> BackendTuple {
    (
        lb_common::ipv4_to_net(e.addr.octets()),
        lb_common::port_to_net(e.port),
        proto.number(),
    )
}

/// How one service port uses one backend, over both of its sets: local if
/// any of its endpoints with that tuple is, terminating only if all are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UseBits {
    local: bool,
    terminating: bool,
}

/// The backends a desired service port uses, and how.
fn port_uses(port: &DesiredServicePort, proto: Protocol) -> BTreeMap<BackendTuple, UseBits> {
    let mut uses: BTreeMap<BackendTuple, UseBits> = BTreeMap::new();
    for e in port.backends.iter().chain(&port.local_backends) {
        let u = uses.entry(backend_tuple(e, proto)).or_insert(UseBits {
            local: false,
            terminating: true,
        });
        u.local |= e.local;
        u.terminating &= e.terminating;
    }
    uses
}

/// The per-service-port limit on one backend set: `TooManyBackends` if a set
/// of `port` is over it.
fn too_many_backends(
    name: &ServicePortName,
    port: &DesiredServicePort,
    limits: &Limits,
) -> Option<SyncError> {
    let max = limits.max_backends_per_service.min(u32::from(u16::MAX));
    [
        ("cluster-wide", port.backends.len()),
        ("node-local", port.local_backends.len()),
    ]
    .into_iter()
    .find(|(_, n)| *n as u64 > u64::from(max))
    .map(|(set, count)| SyncError::TooManyBackends {
        service: name.to_string(),
        set,
        count,
        max,
    })
}

/// The node addresses that fit in LB_NODE_ADDRS (in address order); the
/// rest are reported.
fn node_addr_target(
    node_addrs: &BTreeSet<Ipv4Addr>,
    limits: &Limits,
    errors: &mut Vec<SyncError>,
) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for (i, addr) in node_addrs.iter().enumerate() {
        if i < limits.max_node_addrs as usize {
            out.insert(lb_common::ipv4_to_net(addr.octets()));
        } else {
            errors.push(SyncError::TooManyNodeAddrs {
                addr: *addr,
                max: limits.max_node_addrs,
            });
        }
    }
    out
}
