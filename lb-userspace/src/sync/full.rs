//! The whole-state planner: computes the complete target [`MapContents`]
//! and diffs it against what is applied. O(everything) per call; used for
//! the initial list, relists and the manifest mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, BackendSlot, BackendSlotKey, BackendValue, ServiceKey, ServiceValue,
    LOCAL_SLOT_BASE,
};

use super::{
    backend_tuple, node_addr_target, port_uses, too_many_backends, BackendTuple, Limits, Plan,
    SyncError, UseBits,
};
use crate::state::{service_name_value, DesiredServicePort, MapContents, MapOp, ServicePortName};

/// A service port the plan programs: its id and the backend uses it
/// contributes (the desired-side memory of [`super::SyncState`]).
pub(super) struct Programmed {
    pub sid: u32,
    pub name: ServicePortName,
    pub uses: BTreeMap<BackendTuple, UseBits>,
}

/// Plans the writes that make `applied` equal to `desired` (plus the node
/// addresses), and reports what each programmed service port became.
pub(super) fn plan<'a>(
    applied: &MapContents,
    desired: impl IntoIterator<Item = (&'a ServicePortName, &'a DesiredServicePort)>,
    node_addrs: &BTreeSet<Ipv4Addr>,
    limits: &Limits,
) -> Result<(Plan, Vec<Programmed>), SyncError> {
    let mut errors = Vec::new();
    let admitted = admit(desired, limits, &mut errors);
    let (target, service_ids) =
        target_contents(applied, &admitted, node_addrs, limits, &mut errors)?;
    let ops = diff(applied, &target);
    let (service_changes, endpoint_changes) = count_changes(applied, &target);
    let programmed = admitted
        .iter()
        .zip(service_ids)
        .map(|(a, sid)| Programmed {
            sid,
            name: a.name.clone(),
            uses: port_uses(a.port, a.name.protocol),
        })
        .collect();
    Ok((
        Plan {
            ops,
            service_changes,
            endpoint_changes,
            errors,
        },
        programmed,
    ))
}

/// A service port that will be programmed, with the frontend keys it owns.
struct Admitted<'a> {
    name: &'a ServicePortName,
    port: &'a DesiredServicePort,
    /// Key -> frontend kind flag.
    keys: BTreeMap<ServiceKey, u16>,
}

/// Decides which service ports fit, in DesiredState order (`desired` must
/// be sorted by name, without duplicates).
fn admit<'a>(
    desired: impl IntoIterator<Item = (&'a ServicePortName, &'a DesiredServicePort)>,
    limits: &Limits,
    errors: &mut Vec<SyncError>,
) -> Vec<Admitted<'a>> {
    let mut out = Vec::new();
    let mut owners: BTreeMap<ServiceKey, &ServicePortName> = BTreeMap::new();
    let mut backends: BTreeSet<BackendTuple> = BTreeSet::new();
    let mut slots: u64 = 0;
    for (name, port) in desired {
        if let Some(e) = too_many_backends(name, port, limits) {
            errors.push(e);
            continue;
        }
        let service = name.to_string();
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
) -> Result<(MapContents, Vec<u32>), SyncError> {
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

    target.node_addrs = node_addr_target(node_addrs, limits, errors);
    Ok((target, service_id))
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
