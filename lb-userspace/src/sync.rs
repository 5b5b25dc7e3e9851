//! Sync: the ordered, minimal list of map writes that turns the applied map
//! contents into the desired state. Pure.
//!
//! [`plan`] first computes the complete target [`MapContents`] (with stable
//! ids), then diffs it against what is applied. Only differences are
//! written, never a flush: an unchanged desired state against matching
//! contents gives no ops at all, also right after an agent restart.
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
//! # Order
//! `PutBackend -> PutSlot -> PutName -> PutNodeAddr -> PutService ->
//! DeleteService -> DeleteSlot -> DeleteBackend -> DeleteName ->
//! DeleteNodeAddr`: slots are complete and point to existing backends
//! before a service entry publishes counts covering them, and nothing a
//! live entry can reach is deleted before the entries stop reaching it.
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
//! Limits count the target contents only; while a plan runs the maps hold
//! old and new entries together, so the maps need some headroom over the
//! limits given here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, BackendSlot, BackendSlotKey, BackendValue, ServiceKey, ServiceValue,
    LOCAL_SLOT_BASE,
};

use crate::state::{
    service_name_value, DesiredServicePort, DesiredState, Endpoint, MapContents, MapOp, Protocol,
    ServicePortName,
};

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

/// [`plan_with_limits`] with the capacities of lb-common.
pub fn plan(
    applied: &MapContents,
    desired: &DesiredState,
    node_addrs: &BTreeSet<Ipv4Addr>,
) -> Result<Plan, SyncError> {
    plan_with_limits(applied, desired, node_addrs, &Limits::default())
}

/// Plans the writes that make `applied` equal to `desired` (plus the node
/// addresses). See the module docs.
pub fn plan_with_limits(
    applied: &MapContents,
    desired: &DesiredState,
    node_addrs: &BTreeSet<Ipv4Addr>,
    limits: &Limits,
) -> Result<Plan, SyncError> {
    let mut errors = Vec::new();
    let admitted = admit(desired, limits, &mut errors);
    let target = target_contents(applied, &admitted, node_addrs, limits, &mut errors)?;
    let ops = diff(applied, &target);
    let (service_changes, endpoint_changes) = count_changes(applied, &target);
    Ok(Plan {
        ops,
        service_changes,
        endpoint_changes,
        errors,
    })
}

/// A service port that will be programmed, with the frontend keys it owns.
struct Admitted<'a> {
    name: &'a ServicePortName,
    port: &'a DesiredServicePort,
    /// Key -> frontend kind flag.
    keys: BTreeMap<ServiceKey, u16>,
}

type BackendTuple = (u32, u16, u8);

fn backend_tuple(e: &Endpoint, proto: Protocol) -> BackendTuple {
    (
        lb_common::ipv4_to_net(e.addr.octets()),
        lb_common::port_to_net(e.port),
        proto.number(),
    )
}

/// Decides which service ports fit, in DesiredState order.
fn admit<'a>(
    desired: &'a DesiredState,
    limits: &Limits,
    errors: &mut Vec<SyncError>,
) -> Vec<Admitted<'a>> {
    let mut out = Vec::new();
    let mut owners: BTreeMap<ServiceKey, &ServicePortName> = BTreeMap::new();
    let mut backends: BTreeSet<BackendTuple> = BTreeSet::new();
    let mut slots: u64 = 0;
    for (name, port) in &desired.services {
        let service = name.to_string();
        let too_many = [
            ("cluster-wide", port.backends.len()),
            ("node-local", port.local_backends.len()),
        ]
        .into_iter()
        .find(|(_, n)| {
            *n as u64 > u64::from(limits.max_backends_per_service).min(u64::from(u16::MAX))
        });
        if let Some((set, count)) = too_many {
            errors.push(SyncError::TooManyBackends {
                service,
                set,
                count,
                max: limits.max_backends_per_service.min(u32::from(u16::MAX)),
            });
            continue;
        }
        let mut keys = BTreeMap::new();
        for fe in &port.frontends {
            let key = fe.key();
            if keys.contains_key(&key) {
                continue; // same key twice in one port: the first kind wins
            }
            if let Some(owner) = owners.get(&key) {
                errors.push(SyncError::DuplicateFrontend {
                    service: service.clone(),
                    frontend: format!("{fe:?}"),
                    owner: owner.to_string(),
                });
                continue;
            }
            keys.insert(key, fe.kind.flag());
        }
        if keys.is_empty() {
            continue; // nothing reaches it: nothing to program
        }
        if owners.len() + keys.len() > limits.max_services as usize {
            errors.push(SyncError::MapFull {
                service,
                map: lb_common::map_names::SERVICES,
                max: limits.max_services,
            });
            continue;
        }
        let new_backends: BTreeSet<BackendTuple> = port
            .backends
            .iter()
            .chain(&port.local_backends)
            .map(|e| backend_tuple(e, name.protocol))
            .filter(|t| !backends.contains(t))
            .collect();
        if backends.len() + new_backends.len() > limits.max_backends as usize {
            errors.push(SyncError::MapFull {
                service,
                map: lb_common::map_names::BACKENDS,
                max: limits.max_backends,
            });
            continue;
        }
        let port_slots = (port.backends.len() + port.local_backends.len()) as u64;
        if slots + port_slots > u64::from(limits.max_backend_slots) {
            errors.push(SyncError::MapFull {
                service,
                map: lb_common::map_names::BACKEND_SLOTS,
                max: limits.max_backend_slots,
            });
            continue;
        }
        slots += port_slots;
        backends.extend(new_backends);
        for k in keys.keys() {
            owners.insert(*k, name);
        }
        out.push(Admitted { name, port, keys });
    }
    out
}

/// Hands out the smallest ids >= 1 that are not in `used`.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    what: &'static str,
}

impl IdAllocator {
    fn new(used: BTreeSet<u32>, what: &'static str) -> Self {
        Self {
            used,
            next: 1,
            what,
        }
    }

    fn take(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn alloc(&mut self) -> Result<u32, SyncError> {
        // `used` only grows, so the smallest free id never decreases.
        while self.used.contains(&self.next) {
            self.next = self
                .next
                .checked_add(1)
                .ok_or(SyncError::IdsExhausted { what: self.what })?;
        }
        let id = self.next;
        self.used.insert(id);
        Ok(id)
    }
}

/// The complete map contents the plan converges to.
fn target_contents(
    applied: &MapContents,
    admitted: &[Admitted<'_>],
    node_addrs: &BTreeSet<Ipv4Addr>,
    limits: &Limits,
    errors: &mut Vec<SyncError>,
) -> Result<MapContents, SyncError> {
    let names: Vec<String> = admitted
        .iter()
        .map(|a| service_name_value(&a.name.to_string()).as_str().to_string())
        .collect();

    // Service ids.
    let mut used: BTreeSet<u32> = applied.services.values().map(|v| v.service_id).collect();
    used.extend(applied.slots.keys().map(|k| k.service_id));
    used.extend(applied.names.keys());
    let mut service_ids = IdAllocator::new(used, "service");
    let mut ids: Vec<Option<u32>> = vec![None; admitted.len()];
    let mut taken = BTreeSet::new();
    let candidates: Vec<BTreeSet<u32>> = admitted
        .iter()
        .map(|a| {
            a.keys
                .keys()
                .filter_map(|k| applied.services.get(k))
                .map(|v| v.service_id)
                .filter(|id| *id != 0)
                .collect()
        })
        .collect();
    // 1. An id whose applied name is this port's.
    for (i, c) in candidates.iter().enumerate() {
        if let Some(id) = c
            .iter()
            .find(|id| !taken.contains(*id) && applied.names.get(id) == Some(&names[i]))
        {
            taken.insert(*id);
            ids[i] = Some(*id);
        }
    }
    // 2. Any id of one of its frontends, the smallest free one.
    for (i, c) in candidates.iter().enumerate() {
        if ids[i].is_none() {
            if let Some(id) = c.iter().find(|id| !taken.contains(*id)) {
                taken.insert(*id);
                ids[i] = Some(*id);
            }
        }
    }
    for id in &taken {
        service_ids.take(*id);
    }
    // 3. Fresh ids.
    let mut service_id = Vec::with_capacity(admitted.len());
    for id in ids {
        service_id.push(match id {
            Some(id) => id,
            None => service_ids.alloc()?,
        });
    }

    // Backends: one per (addr, port, proto); LOCAL if any use is local,
    // TERMINATING only if every use is a terminating fallback.
    let mut wanted: BTreeMap<BackendTuple, (bool, bool)> = BTreeMap::new();
    for a in admitted {
        for e in a.port.backends.iter().chain(&a.port.local_backends) {
            let w = wanted
                .entry(backend_tuple(e, a.name.protocol))
                .or_insert((false, true));
            w.0 |= e.local;
            w.1 &= e.terminating;
        }
    }
    let mut existing: BTreeMap<BackendTuple, u32> = BTreeMap::new();
    for (id, v) in &applied.backends {
        existing.entry((v.addr, v.port, v.proto)).or_insert(*id);
    }
    let mut used: BTreeSet<u32> = applied.backends.keys().copied().collect();
    used.extend(applied.slots.values().map(|s| s.backend_id));
    let mut backend_ids = IdAllocator::new(used, "backend");
    let mut target = MapContents::default();
    let mut backend_id: BTreeMap<BackendTuple, u32> = BTreeMap::new();
    for (tuple, (local, terminating)) in &wanted {
        let id = match existing.get(tuple) {
            Some(id) => *id,
            None => backend_ids.alloc()?,
        };
        let mut flags = 0;
        if *local {
            flags |= backend_flags::LOCAL;
        }
        if *terminating {
            flags |= backend_flags::TERMINATING;
        }
        backend_id.insert(*tuple, id);
        target.backends.insert(
            id,
            BackendValue {
                addr: tuple.0,
                port: tuple.1,
                proto: tuple.2,
                flags,
            },
        );
    }

    // Slots, names, services.
    for (i, a) in admitted.iter().enumerate() {
        let sid = service_id[i];
        let sets = [
            (0u32, &a.port.backends),
            (LOCAL_SLOT_BASE, &a.port.local_backends),
        ];
        for (base, set) in sets {
            for (slot, e) in set.iter().enumerate() {
                let tuple = backend_tuple(e, a.name.protocol);
                // Every tuple of an admitted port is in `backend_id`.
                let Some(bid) = backend_id.get(&tuple) else {
                    continue;
                };
                target.slots.insert(
                    BackendSlotKey {
                        service_id: sid,
                        slot: base + slot as u32,
                    },
                    BackendSlot { backend_id: *bid },
                );
            }
        }
        target.names.insert(sid, names[i].clone());
        for (key, kind_flag) in &a.keys {
            target.services.insert(
                *key,
                ServiceValue {
                    service_id: sid,
                    // admit() bounded both lengths by u16::MAX.
                    backend_count: a.port.backends.len() as u16,
                    local_backend_count: a.port.local_backends.len() as u16,
                    flags: kind_flag | a.port.flags,
                    _pad: 0,
                    affinity_timeout_sec: a.port.affinity_timeout_sec,
                },
            );
        }
    }

    for (i, addr) in node_addrs.iter().enumerate() {
        if i < limits.max_node_addrs as usize {
            target
                .node_addrs
                .insert(lb_common::ipv4_to_net(addr.octets()));
        } else {
            errors.push(SyncError::TooManyNodeAddrs {
                addr: *addr,
                max: limits.max_node_addrs,
            });
        }
    }
    Ok(target)
}

/// The ordered ops that turn `applied` into `target`.
fn diff(applied: &MapContents, target: &MapContents) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (id, v) in &target.backends {
        if applied.backends.get(id) != Some(v) {
            ops.push(MapOp::PutBackend(*id, *v));
        }
    }
    for (k, v) in &target.slots {
        if applied.slots.get(k) != Some(v) {
            ops.push(MapOp::PutSlot(*k, *v));
        }
    }
    for (id, n) in &target.names {
        if applied.names.get(id) != Some(n) {
            ops.push(MapOp::PutName(*id, n.clone()));
        }
    }
    for a in target.node_addrs.difference(&applied.node_addrs) {
        ops.push(MapOp::PutNodeAddr(*a));
    }
    for (k, v) in &target.services {
        if applied.services.get(k) != Some(v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    for k in applied.services.keys() {
        if !target.services.contains_key(k) {
            ops.push(MapOp::DeleteService(*k));
        }
    }
    for k in applied.slots.keys() {
        if !target.slots.contains_key(k) {
            ops.push(MapOp::DeleteSlot(*k));
        }
    }
    for id in applied.backends.keys() {
        if !target.backends.contains_key(id) {
            ops.push(MapOp::DeleteBackend(*id));
        }
    }
    for id in applied.names.keys() {
        if !target.names.contains_key(id) {
            ops.push(MapOp::DeleteName(*id));
        }
    }
    for a in applied.node_addrs.difference(&target.node_addrs) {
        ops.push(MapOp::DeleteNodeAddr(*a));
    }
    ops
}

/// Per service id: its frontends (key, flags, timeout) and its backend sets
/// as (slot, backend value) pairs.
type FrontendView = BTreeSet<(ServiceKey, u16, u32)>;
type BackendView = Vec<(u32, Option<BackendValue>)>;

fn views(c: &MapContents) -> (BTreeMap<u32, FrontendView>, BTreeMap<u32, BackendView>) {
    let mut fe: BTreeMap<u32, FrontendView> = BTreeMap::new();
    for (k, v) in &c.services {
        fe.entry(v.service_id)
            .or_default()
            .insert((*k, v.flags, v.affinity_timeout_sec));
    }
    let mut be: BTreeMap<u32, BackendView> = BTreeMap::new();
    for (k, s) in &c.slots {
        be.entry(k.service_id)
            .or_default()
            .push((k.slot, c.backends.get(&s.backend_id).copied()));
    }
    (fe, be)
}

fn count_changes(applied: &MapContents, target: &MapContents) -> (usize, usize) {
    let (afe, abe) = views(applied);
    let (tfe, tbe) = views(target);
    let ids: BTreeSet<u32> = afe.keys().chain(tfe.keys()).copied().collect();
    let service_changes = ids.iter().filter(|id| afe.get(id) != tfe.get(id)).count();
    let ids: BTreeSet<u32> = abe.keys().chain(tbe.keys()).copied().collect();
    let endpoint_changes = ids.iter().filter(|id| abe.get(id) != tbe.get(id)).count();
    (service_changes, endpoint_changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Frontend, FrontendKind};
    use lb_common::{service_flags, SCOPE_NODEPORT};

    fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port_name: port.into(),
            protocol,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn fe(kind: FrontendKind, addr: Option<&str>, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            kind,
            addr: addr.map(ip),
            port,
            protocol,
        }
    }

    fn ep(addr: &str, port: u16, local: bool) -> Endpoint {
        Endpoint {
            addr: ip(addr),
            port,
            local,
            terminating: false,
        }
    }

    fn port(frontends: &[Frontend], backends: &[Endpoint]) -> DesiredServicePort {
        DesiredServicePort {
            frontends: frontends.iter().copied().collect(),
            backends: backends.to_vec(),
            local_backends: backends.iter().filter(|e| e.local).copied().collect(),
            flags: 0,
            affinity_timeout_sec: 0,
        }
    }

    fn web() -> (ServicePortName, DesiredServicePort) {
        (
            spn("default", "web", "http", Protocol::Tcp),
            port(
                &[
                    fe(
                        FrontendKind::ClusterIp,
                        Some("10.96.0.10"),
                        80,
                        Protocol::Tcp,
                    ),
                    fe(FrontendKind::NodePort, None, 30080, Protocol::Tcp),
                ],
                &[ep("10.1.0.5", 8080, true), ep("10.1.1.5", 8080, false)],
            ),
        )
    }

    fn state(ports: Vec<(ServicePortName, DesiredServicePort)>) -> DesiredState {
        DesiredState {
            services: ports.into_iter().collect(),
        }
    }

    fn none() -> BTreeSet<Ipv4Addr> {
        BTreeSet::new()
    }

    /// Applies the plan and checks that planning again yields nothing.
    fn apply(c: &MapContents, d: &DesiredState, addrs: &BTreeSet<Ipv4Addr>) -> (Plan, MapContents) {
        let p = plan(c, d, addrs).unwrap();
        let mut next = c.clone();
        for op in &p.ops {
            op.apply_to(&mut next);
        }
        let again = plan(&next, d, addrs).unwrap();
        assert!(again.ops.is_empty(), "not converged: {:?}", again.ops);
        assert_eq!(again.service_changes, 0);
        assert_eq!(again.endpoint_changes, 0);
        (p, next)
    }

    fn kind(op: &MapOp) -> usize {
        match op {
            MapOp::PutBackend(..) => 0,
            MapOp::PutSlot(..) => 1,
            MapOp::PutName(..) => 2,
            MapOp::PutNodeAddr(..) => 3,
            MapOp::PutService(..) => 4,
            MapOp::DeleteService(..) => 5,
            MapOp::DeleteSlot(..) => 6,
            MapOp::DeleteBackend(..) => 7,
            MapOp::DeleteName(..) => 8,
            MapOp::DeleteNodeAddr(..) => 9,
        }
    }

    fn assert_ordered(ops: &[MapOp]) {
        for w in ops.windows(2) {
            assert!(
                kind(&w[0]) <= kind(&w[1]),
                "out of order: {:?} before {:?}",
                w[0],
                w[1]
            );
        }
    }

    /// Every service entry's counts reference slots that exist and point to
    /// existing backends.
    fn assert_consistent(c: &MapContents, context: &str) {
        for (k, v) in &c.services {
            let slots = (0..u32::from(v.backend_count))
                .chain((0..u32::from(v.local_backend_count)).map(|i| LOCAL_SLOT_BASE + i));
            for slot in slots {
                let key = BackendSlotKey {
                    service_id: v.service_id,
                    slot,
                };
                let s = c
                    .slots
                    .get(&key)
                    .unwrap_or_else(|| panic!("{context}: {k:?} -> missing slot {key:?}"));
                assert!(
                    c.backends.contains_key(&s.backend_id),
                    "{context}: {k:?} slot {slot} -> missing backend {}",
                    s.backend_id
                );
            }
        }
    }

    #[test]
    fn first_sync_writes_everything_in_order() {
        let d = state(vec![web()]);
        let addrs: BTreeSet<_> = [ip("192.168.1.10")].into();
        let (p, c) = apply(&MapContents::default(), &d, &addrs);
        assert_ordered(&p.ops);
        assert!(p.errors.is_empty());
        assert_eq!(p.service_changes, 1);
        assert_eq!(p.endpoint_changes, 1);
        // Two backends (ids 1, 2), three slots, a name, a node address, two frontends.
        assert_eq!(p.ops.len(), 2 + 3 + 1 + 1 + 2);
        assert_eq!(
            c.names.get(&1).map(String::as_str),
            Some("default/web:http/TCP")
        );
        let cip = fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.10"),
            80,
            Protocol::Tcp,
        )
        .key();
        let v = c.services[&cip];
        assert_eq!(v.service_id, 1);
        assert_eq!(v.backend_count, 2);
        assert_eq!(v.local_backend_count, 1);
        assert_eq!(v.flags, service_flags::CLUSTER_IP);
        let np = c
            .services
            .iter()
            .find(|(k, _)| k.scope == SCOPE_NODEPORT)
            .unwrap();
        assert_eq!(np.1.flags, service_flags::NODE_PORT);
        assert_eq!(np.0.addr, 0);
        // Slots 0..2 for the cluster set in order, LOCAL_SLOT_BASE for the local set.
        let b0 = c.slots[&BackendSlotKey {
            service_id: 1,
            slot: 0,
        }]
            .backend_id;
        let local0 = c.slots[&BackendSlotKey {
            service_id: 1,
            slot: LOCAL_SLOT_BASE,
        }]
            .backend_id;
        assert_eq!(b0, local0);
        assert_eq!(c.backends[&b0].flags, backend_flags::LOCAL);
        assert_eq!(lb_common::net_to_ipv4(c.backends[&b0].addr), [10, 1, 0, 5]);
        assert_eq!(lb_common::net_to_port(c.backends[&b0].port), 8080);
        assert_eq!(
            c.node_addrs,
            [lb_common::ipv4_to_net([192, 168, 1, 10])].into()
        );
    }

    #[test]
    fn unchanged_state_yields_no_ops() {
        let d = state(vec![web()]);
        let (_, c) = apply(&MapContents::default(), &d, &none());
        let p = plan(&c, &d, &none()).unwrap();
        assert!(p.is_empty());
        assert_eq!(p, Plan::default());
        assert!(
            plan(&MapContents::default(), &DesiredState::default(), &none())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn ids_are_stable_and_smallest_free_ids_are_used() {
        let (w, wp) = web();
        let dns = spn("kube-system", "dns", "dns", Protocol::Udp);
        let dnsp = port(
            &[fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.53"),
                53,
                Protocol::Udp,
            )],
            &[ep("10.1.0.9", 53, false)],
        );
        let (_, c1) = apply(
            &MapContents::default(),
            &state(vec![(w.clone(), wp.clone())]),
            &none(),
        );
        let (_, c2) = apply(
            &c1,
            &state(vec![(w.clone(), wp.clone()), (dns.clone(), dnsp.clone())]),
            &none(),
        );
        let web_id = |c: &MapContents| {
            c.names
                .iter()
                .find(|(_, n)| n.contains("web"))
                .map(|(i, _)| *i)
        };
        let dns_id = |c: &MapContents| {
            c.names
                .iter()
                .find(|(_, n)| n.contains("dns"))
                .map(|(i, _)| *i)
        };
        // "kube-system/dns" sorts before "default/web"? No: "default" < "kube-system".
        assert_eq!(web_id(&c2), Some(1));
        assert_eq!(dns_id(&c2), Some(2));
        // Removing web keeps dns's ids (service and backend).
        let dns_backend = c2.slots[&BackendSlotKey {
            service_id: 2,
            slot: 0,
        }]
            .backend_id;
        let (p3, c3) = apply(&c2, &state(vec![(dns.clone(), dnsp.clone())]), &none());
        assert_eq!(dns_id(&c3), Some(2));
        assert_eq!(
            c3.slots[&BackendSlotKey {
                service_id: 2,
                slot: 0
            }]
                .backend_id,
            dns_backend
        );
        assert_eq!(p3.service_changes, 1);
        assert_eq!(p3.endpoint_changes, 1);
        assert!(p3.ops.iter().all(|op| matches!(
            op,
            MapOp::DeleteService(_)
                | MapOp::DeleteSlot(_)
                | MapOp::DeleteBackend(_)
                | MapOp::DeleteName(_)
        )));
        // A new service then gets the smallest free id again (1).
        let (_, c4) = apply(
            &c3,
            &state(vec![(w.clone(), wp.clone()), (dns, dnsp)]),
            &none(),
        );
        assert_eq!(web_id(&c4), Some(1));
        assert_eq!(dns_id(&c4), Some(2));
    }

    #[test]
    fn ids_of_a_deleted_service_are_not_reused_in_the_same_plan() {
        let (w, wp) = web();
        let (_, c1) = apply(&MapContents::default(), &state(vec![(w, wp)]), &none());
        let other = spn("default", "other", "", Protocol::Tcp);
        let op = port(
            &[fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.11"),
                80,
                Protocol::Tcp,
            )],
            &[ep("10.1.2.1", 80, false)],
        );
        let (p, c2) = apply(&c1, &state(vec![(other, op)]), &none());
        // id 1 and backend ids 1, 2 are still live while the plan runs.
        assert_eq!(c2.names.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(c2.backends.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert_ordered(&p.ops);
    }

    #[test]
    fn service_keeps_its_id_through_a_frontend_change() {
        let (w, mut wp) = web();
        let (_, c1) = apply(
            &MapContents::default(),
            &state(vec![(w.clone(), wp.clone())]),
            &none(),
        );
        // Add an external IP, drop the node port: the cluster IP keeps id 1.
        wp.frontends.retain(|f| f.kind != FrontendKind::NodePort);
        wp.frontends.insert(fe(
            FrontendKind::ExternalIp,
            Some("203.0.113.7"),
            80,
            Protocol::Tcp,
        ));
        let (p, c2) = apply(&c1, &state(vec![(w, wp)]), &none());
        assert!(c2.services.values().all(|v| v.service_id == 1));
        assert_eq!(p.service_changes, 1);
        assert_eq!(p.endpoint_changes, 0);
        assert_eq!(p.ops.iter().map(kind).collect::<Vec<_>>(), vec![4, 5]);
    }

    #[test]
    fn backend_flag_change_rewrites_the_backend_in_place() {
        let (w, mut wp) = web();
        let (_, c1) = apply(
            &MapContents::default(),
            &state(vec![(w.clone(), wp.clone())]),
            &none(),
        );
        wp.backends[1].terminating = true;
        let (p, c2) = apply(&c1, &state(vec![(w, wp)]), &none());
        assert_eq!(p.ops.len(), 1);
        let MapOp::PutBackend(id, v) = p.ops[0] else {
            panic!("{:?}", p.ops)
        };
        assert_eq!(v.flags, backend_flags::TERMINATING);
        assert_eq!(c1.backends[&id].addr, v.addr);
        assert_eq!(p.endpoint_changes, 1);
        assert_eq!(p.service_changes, 0);
        assert_eq!(c2.backends.len(), 2);
    }

    #[test]
    fn tcp_and_udp_never_share_ids() {
        let both = |proto: Protocol| {
            (
                spn("kube-system", "dns", "dns", proto),
                port(
                    &[fe(FrontendKind::ClusterIp, Some("10.96.0.10"), 53, proto)],
                    &[ep("10.1.0.9", 53, false)],
                ),
            )
        };
        let (_, c) = apply(
            &MapContents::default(),
            &state(vec![both(Protocol::Tcp), both(Protocol::Udp)]),
            &none(),
        );
        assert_eq!(c.services.len(), 2);
        let sids: BTreeSet<u32> = c.services.values().map(|v| v.service_id).collect();
        assert_eq!(sids.len(), 2);
        assert_eq!(c.backends.len(), 2);
        let protos: BTreeSet<u8> = c.backends.values().map(|b| b.proto).collect();
        assert_eq!(protos, [lb_common::PROTO_TCP, lb_common::PROTO_UDP].into());
    }

    #[test]
    fn shrinking_publishes_the_count_before_deleting_slots() {
        let (w, mut wp) = web();
        let (_, c1) = apply(
            &MapContents::default(),
            &state(vec![(w.clone(), wp.clone())]),
            &none(),
        );
        wp.backends.remove(0);
        wp.local_backends.clear();
        let p = plan(&c1, &state(vec![(w, wp)]), &none()).unwrap();
        assert_ordered(&p.ops);
        let mut c = c1.clone();
        assert_consistent(&c, "start");
        for (i, op) in p.ops.iter().enumerate() {
            op.apply_to(&mut c);
            assert_consistent(&c, &format!("after op {i} {op:?}"));
        }
        assert!(p.ops.iter().any(|op| matches!(op, MapOp::DeleteSlot(_))));
    }

    #[test]
    fn per_service_limit_skips_only_that_service() {
        let limits = Limits {
            max_backends_per_service: 1,
            ..Limits::default()
        };
        let (w, wp) = web(); // 2 backends
        let small = spn("default", "small", "", Protocol::Tcp);
        let sp = port(
            &[fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.20"),
                80,
                Protocol::Tcp,
            )],
            &[ep("10.1.3.1", 80, false)],
        );
        let d = state(vec![(w, wp), (small, sp)]);
        let p = plan_with_limits(&MapContents::default(), &d, &none(), &limits).unwrap();
        assert_eq!(p.errors.len(), 1);
        assert_eq!(
            p.errors[0].to_string(),
            "default/web:http/TCP: 2 backends in its cluster-wide set, more than the 1 one service port can hold; not programmed"
        );
        let mut c = MapContents::default();
        for op in &p.ops {
            op.apply_to(&mut c);
        }
        assert_eq!(c.services.len(), 1);
        assert_eq!(
            c.names.values().cloned().collect::<Vec<_>>(),
            vec!["default/small/TCP"]
        );
    }

    #[test]
    fn map_capacity_skips_the_service_that_does_not_fit() {
        let (w, wp) = web(); // 2 frontends, 2 backends, 3 slots
        let small = spn("default", "small", "", Protocol::Tcp);
        let sp = port(
            &[fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.20"),
                80,
                Protocol::Tcp,
            )],
            &[ep("10.1.3.1", 80, false)],
        );
        let d = state(vec![(w, wp), (small, sp)]);
        // "default/small" sorts before "default/web": web is the one left out.
        let cases: [(Limits, &str, u32); 3] = [
            (
                Limits {
                    max_services: 2,
                    ..Limits::default()
                },
                "LB_SERVICES",
                2,
            ),
            (
                Limits {
                    max_backends: 2,
                    ..Limits::default()
                },
                "LB_BACKENDS",
                2,
            ),
            (
                Limits {
                    max_backend_slots: 3,
                    ..Limits::default()
                },
                "LB_BACKEND_SLOTS",
                3,
            ),
        ];
        for (limits, map, max) in cases {
            let p = plan_with_limits(&MapContents::default(), &d, &none(), &limits).unwrap();
            assert_eq!(
                p.errors,
                vec![SyncError::MapFull {
                    service: "default/web:http/TCP".into(),
                    map,
                    max,
                }],
                "{map}"
            );
            let mut c = MapContents::default();
            for op in &p.ops {
                op.apply_to(&mut c);
            }
            assert_eq!(
                c.names.values().cloned().collect::<Vec<_>>(),
                vec!["default/small/TCP"]
            );
        }
    }

    #[test]
    fn duplicate_frontend_stays_with_the_first_service_port() {
        let (w, wp) = web();
        let thief = spn("default", "zz", "", Protocol::Tcp);
        let tp = port(
            &[
                fe(
                    FrontendKind::ExternalIp,
                    Some("10.96.0.10"),
                    80,
                    Protocol::Tcp,
                ),
                fe(
                    FrontendKind::ClusterIp,
                    Some("10.96.0.99"),
                    80,
                    Protocol::Tcp,
                ),
            ],
            &[],
        );
        let p = plan(
            &MapContents::default(),
            &state(vec![(w, wp), (thief, tp)]),
            &none(),
        )
        .unwrap();
        assert_eq!(p.errors.len(), 1);
        assert!(
            p.errors[0]
                .to_string()
                .starts_with("default/zz/TCP: frontend"),
            "{}",
            p.errors[0]
        );
        let mut c = MapContents::default();
        for op in &p.ops {
            op.apply_to(&mut c);
        }
        assert_eq!(c.services.len(), 3);
    }

    #[test]
    fn node_addresses_are_diffed_and_bounded() {
        let a: BTreeSet<_> = [ip("192.168.1.1"), ip("192.168.1.2")].into();
        let (_, c) = apply(&MapContents::default(), &DesiredState::default(), &a);
        let b: BTreeSet<_> = [ip("192.168.1.2"), ip("192.168.1.3")].into();
        let (p, _) = apply(&c, &DesiredState::default(), &b);
        assert_eq!(
            p.ops,
            vec![
                MapOp::PutNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 3])),
                MapOp::DeleteNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 1])),
            ]
        );
        let limits = Limits {
            max_node_addrs: 1,
            ..Limits::default()
        };
        let p = plan_with_limits(
            &MapContents::default(),
            &DesiredState::default(),
            &b,
            &limits,
        )
        .unwrap();
        assert_eq!(p.ops.len(), 1);
        assert_eq!(
            p.errors[0].to_string(),
            "node address 192.168.1.3: more than 1 node addresses; not programmed"
        );
    }

    #[test]
    fn long_names_are_stored_truncated_and_do_not_churn() {
        let long = "n".repeat(63);
        let name = spn(&long, &long, "a-long-port-nam", Protocol::Tcp);
        let p = port(
            &[fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.10"),
                80,
                Protocol::Tcp,
            )],
            &[],
        );
        let (_, c) = apply(&MapContents::default(), &state(vec![(name, p)]), &none());
        assert_eq!(c.names[&1].len(), lb_common::SERVICE_NAME_LEN);
    }

    #[test]
    fn values_carry_service_flags_and_affinity() {
        let (w, mut wp) = web();
        wp.flags = service_flags::AFFINITY | service_flags::EXTERNAL_LOCAL;
        wp.affinity_timeout_sec = 10_800;
        let (_, c) = apply(&MapContents::default(), &state(vec![(w, wp)]), &none());
        for (k, v) in &c.services {
            let kind = if k.scope == SCOPE_NODEPORT {
                service_flags::NODE_PORT
            } else {
                service_flags::CLUSTER_IP
            };
            assert_eq!(
                v.flags,
                kind | service_flags::AFFINITY | service_flags::EXTERNAL_LOCAL
            );
            assert_eq!(v.affinity_timeout_sec, 10_800);
        }
    }

    // ---- property-style tests -------------------------------------------

    /// splitmix64: small, deterministic, good enough for test generation.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }

        fn pick_str(&mut self, items: &[&'static str]) -> &'static str {
            items[self.below(items.len() as u64) as usize]
        }
    }

    const NAMESPACES: [&str; 2] = ["a", "b"];
    const NAMES: [&str; 4] = ["s0", "s1", "s2", "s3"];
    const PORT_NAMES: [&str; 3] = ["", "http", "dns"];

    fn random_state(rng: &mut Rng) -> (DesiredState, BTreeSet<Ipv4Addr>) {
        let mut d = DesiredState::default();
        for _ in 0..rng.below(7) {
            let protocol = *rng.pick(&[Protocol::Tcp, Protocol::Udp]);
            let (ns, svc, port_name) = (
                rng.pick_str(&NAMESPACES),
                rng.pick_str(&NAMES),
                rng.pick_str(&PORT_NAMES),
            );
            let name = spn(ns, svc, port_name, protocol);
            let mut p = DesiredServicePort::default();
            for _ in 0..=rng.below(4) {
                let kind = *rng.pick(&[
                    FrontendKind::ClusterIp,
                    FrontendKind::NodePort,
                    FrontendKind::ExternalIp,
                    FrontendKind::LoadBalancer,
                ]);
                let f = if kind == FrontendKind::NodePort {
                    fe(kind, None, *rng.pick(&[30000, 30001, 30002]), protocol)
                } else {
                    let a = format!("10.96.0.{}", 1 + rng.below(8));
                    fe(kind, Some(&a), *rng.pick(&[80, 53, 443]), protocol)
                };
                p.frontends.insert(f);
            }
            let mut eps = BTreeMap::new();
            for _ in 0..rng.below(6) {
                let e = Endpoint {
                    addr: ip(&format!("10.1.0.{}", 1 + rng.below(10))),
                    port: *rng.pick(&[8080, 53]),
                    local: rng.chance(40),
                    terminating: rng.chance(20),
                };
                eps.insert((e.addr, e.port), e);
            }
            p.backends = eps.values().copied().collect();
            p.local_backends = p.backends.iter().filter(|e| e.local).copied().collect();
            if rng.chance(30) {
                p.backends.retain(|e| !e.local); // local-only fallback shapes
            }
            p.flags = (rng.below(16) as u16) << 4;
            p.affinity_timeout_sec = if p.flags & service_flags::AFFINITY != 0 {
                10_800
            } else {
                0
            };
            d.services.insert(name, p);
        }
        let addrs = (1..=4)
            .filter(|_| rng.chance(50))
            .map(|i| ip(&format!("192.168.0.{i}")))
            .collect();
        (d, addrs)
    }

    /// Every programmed frontend leads to exactly the backends its desired
    /// service port lists, in order; every desired frontend is programmed
    /// unless the plan reported its service port.
    fn assert_matches(c: &MapContents, d: &DesiredState, errors: &[SyncError]) {
        let resolve = |sid: u32, base: u32, n: u16| -> Vec<(u32, u16)> {
            (0..u32::from(n))
                .map(|i| {
                    let s = c.slots[&BackendSlotKey {
                        service_id: sid,
                        slot: base + i,
                    }];
                    let b = c.backends[&s.backend_id];
                    (b.addr, b.port)
                })
                .collect()
        };
        let want = |set: &[Endpoint]| -> Vec<(u32, u16)> {
            set.iter()
                .map(|e| {
                    (
                        lb_common::ipv4_to_net(e.addr.octets()),
                        lb_common::port_to_net(e.port),
                    )
                })
                .collect()
        };
        for (name, p) in &d.services {
            let reported = errors
                .iter()
                .any(|e| e.to_string().starts_with(&format!("{name}:")));
            for f in &p.frontends {
                let Some(v) = c.services.get(&f.key()) else {
                    assert!(reported, "{name}: {f:?} missing and not reported");
                    continue;
                };
                if c.names.get(&v.service_id) != Some(&name.to_string()) {
                    assert!(
                        reported,
                        "{name}: {f:?} owned by another port, not reported"
                    );
                    continue;
                }
                assert_eq!(
                    resolve(v.service_id, 0, v.backend_count),
                    want(&p.backends),
                    "{name}"
                );
                assert_eq!(
                    resolve(v.service_id, LOCAL_SLOT_BASE, v.local_backend_count),
                    want(&p.local_backends),
                    "{name}"
                );
                assert_eq!(v.flags & !0xf, p.flags);
            }
        }
    }

    #[test]
    fn property_plans_converge_and_never_expose_half_written_sets() {
        let mut rng = Rng(0x5eed);
        for round in 0..60 {
            let mut c = MapContents::default();
            for step in 0..12 {
                let (d, addrs) = random_state(&mut rng);
                let p = plan(&c, &d, &addrs).unwrap();
                assert_ordered(&p.ops);
                let before = c.clone();
                for (i, op) in p.ops.iter().enumerate() {
                    op.apply_to(&mut c);
                    assert_consistent(&c, &format!("round {round} step {step} op {i} {op:?}"));
                }
                let again = plan(&c, &d, &addrs).unwrap();
                assert!(
                    again.ops.is_empty(),
                    "round {round} step {step}: {:?}",
                    again.ops
                );
                assert_matches(&c, &d, &p.errors);
                // Counts: zero exactly when nothing changed.
                if p.ops.is_empty() {
                    assert_eq!((p.service_changes, p.endpoint_changes), (0, 0));
                }
                if before == c {
                    assert!(p.ops.is_empty());
                }
                // Ids are stable: a service port whose frontend set stayed
                // the same keeps its id.
                for (k, v) in &c.services {
                    if let Some(old) = before.services.get(k) {
                        if before.names.get(&old.service_id) == c.names.get(&v.service_id) {
                            assert_eq!(old.service_id, v.service_id);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn property_converges_from_arbitrary_contents() {
        let mut rng = Rng(42);
        for _ in 0..100 {
            // Garbage: dangling slots, duplicate backends, stale names.
            let mut c = MapContents::default();
            for _ in 0..rng.below(8) {
                c.services.insert(
                    ServiceKey {
                        addr: lb_common::ipv4_to_net([10, 96, 0, 1 + rng.below(8) as u8]),
                        port: lb_common::port_to_net(*rng.pick(&[80, 53, 443])),
                        proto: *rng.pick(&[6, 17, 132]),
                        scope: 0,
                    },
                    ServiceValue {
                        service_id: rng.below(5) as u32,
                        backend_count: rng.below(4) as u16,
                        ..ServiceValue::default()
                    },
                );
            }
            for _ in 0..rng.below(8) {
                c.slots.insert(
                    BackendSlotKey {
                        service_id: rng.below(5) as u32,
                        slot: rng.below(3) as u32,
                    },
                    BackendSlot {
                        backend_id: rng.below(6) as u32,
                    },
                );
            }
            for _ in 0..rng.below(6) {
                c.backends.insert(
                    rng.below(6) as u32,
                    BackendValue {
                        addr: lb_common::ipv4_to_net([10, 1, 0, 1 + rng.below(10) as u8]),
                        port: lb_common::port_to_net(*rng.pick(&[8080, 53])),
                        proto: *rng.pick(&[6, 17]),
                        flags: 0,
                    },
                );
            }
            for _ in 0..rng.below(3) {
                c.names.insert(rng.below(5) as u32, "stale".into());
            }
            let (d, addrs) = random_state(&mut rng);
            let p = plan(&c, &d, &addrs).unwrap();
            for op in &p.ops {
                op.apply_to(&mut c);
            }
            assert_consistent(&c, "after converging");
            assert!(plan(&c, &d, &addrs).unwrap().ops.is_empty());
            assert_matches(&c, &d, &p.errors);
        }
    }
}
