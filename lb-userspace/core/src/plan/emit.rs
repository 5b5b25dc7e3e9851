//! Emit: the target against the part of the maps the plan's scope owns
//! (everything for a full plan; the entries of the scoped ports' service
//! ids otherwise), as ops in the one safe order, and the change counts.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use lb_common::{BackendSlotKey, BackendValue, ServiceKey};

use super::mirror::{slots_of, Mirror};
use super::Scoped;
use crate::contents::{MapContents, MapOp};

pub(crate) struct Emitted {
    pub ops: Vec<MapOp>,
    pub service_changes: usize,
    pub endpoint_changes: usize,
}

/// The entries a plan may delete: everything (`full`) or what the scoped
/// ports' current service ids carry.
struct Domain {
    sids: BTreeSet<u32>,
    keys: BTreeSet<ServiceKey>,
    slots: BTreeSet<BackendSlotKey>,
    ranges: BTreeSet<(u32, Ipv4Net)>,
    /// Backends referenced by `slots` (all backends when full).
    backends: BTreeSet<u32>,
}

fn domain(scoped: &[Scoped<'_>], mirror: &Mirror, full: bool) -> Domain {
    let c = mirror.contents();
    if full {
        return Domain {
            sids: mirror.sids().collect(),
            keys: c.services.keys().copied().collect(),
            slots: c.slots.keys().copied().collect(),
            ranges: c.source_ranges.clone(),
            backends: c.backends.keys().copied().collect(),
        };
    }
    let sids: BTreeSet<u32> = scoped.iter().filter_map(|s| s.old_sid).collect();
    let mut d = Domain {
        keys: BTreeSet::new(),
        slots: BTreeSet::new(),
        ranges: BTreeSet::new(),
        backends: BTreeSet::new(),
        sids,
    };
    for &sid in &d.sids {
        d.keys.extend(mirror.keys_of(sid).copied());
        d.ranges
            .extend(mirror.ranges_of(sid).map(|net| (sid, *net)));
        for (k, s) in mirror.slots_of(sid) {
            d.slots.insert(*k);
            d.backends.insert(s.backend_id);
        }
    }
    d
}

pub(crate) fn emit(
    scoped: &[Scoped<'_>],
    target: &MapContents,
    node_addrs: &BTreeSet<u32>,
    mirror: &Mirror,
    full: bool,
) -> Emitted {
    let c = mirror.contents();
    let d = domain(scoped, mirror, full);
    // Room for every put the target can need (a first plan is nearly all
    // puts, hundreds of thousands of them); deletes, rarer, grow it.
    let mut ops = Vec::with_capacity(
        target.backends.len()
            + target.slots.len()
            + target.source_ranges.len()
            + target.names.len()
            + node_addrs.len()
            + target.services.len(),
    );

    for (id, v) in &target.backends {
        if c.backends.get(id) != Some(v) {
            ops.push(MapOp::PutBackend(*id, *v));
        }
    }
    for (k, v) in &target.slots {
        if c.slots.get(k) != Some(v) {
            ops.push(MapOp::PutSlot(*k, *v));
        }
    }
    for (id, net) in target.source_ranges.difference(&c.source_ranges) {
        ops.push(MapOp::PutSourceRange(*id, *net));
    }
    for (id, n) in &target.names {
        if c.names.get(id) != Some(n) {
            ops.push(MapOp::PutName(*id, Box::new(n.clone())));
        }
    }
    for a in node_addrs.difference(&c.node_addrs) {
        ops.push(MapOp::PutNodeAddr(*a));
    }
    for (k, v) in &target.services {
        if c.services.get(k) != Some(v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    for k in &d.keys {
        if !target.services.contains_key(k) {
            ops.push(MapOp::DeleteService(*k));
        }
    }
    // Backend references after the plan, for the backends the domain holds
    // (the only ones a plan may delete).
    let mut refs: BTreeMap<u32, i64> = d
        .backends
        .iter()
        .map(|b| (*b, i64::from(mirror.backend_refs(*b))))
        .collect();
    for k in &d.slots {
        if let Some(n) = c.slots.get(k).and_then(|s| refs.get_mut(&s.backend_id)) {
            *n -= 1;
        }
    }
    for s in target.slots.values() {
        if let Some(n) = refs.get_mut(&s.backend_id) {
            *n += 1;
        }
    }
    for k in &d.slots {
        if !target.slots.contains_key(k) {
            ops.push(MapOp::DeleteSlot(*k));
        }
    }
    for (id, net) in d.ranges.difference(&target.source_ranges) {
        ops.push(MapOp::DeleteSourceRange(*id, *net));
    }
    for b in &d.backends {
        let still_referenced = refs.get(b).copied().unwrap_or(0) > 0;
        if !target.backends.contains_key(b) && !still_referenced && c.backends.contains_key(b) {
            ops.push(MapOp::DeleteBackend(*b));
        }
    }
    for sid in &d.sids {
        if c.names.contains_key(sid) && !target.names.contains_key(sid) {
            ops.push(MapOp::DeleteName(*sid));
        }
    }
    for a in c.node_addrs.difference(node_addrs) {
        ops.push(MapOp::DeleteNodeAddr(*a));
    }
    debug_assert!(ops.windows(2).all(|w| w[0].phase() <= w[1].phase()));
    if ops.capacity() > 2 * ops.len() + 64 {
        ops.shrink_to_fit(); // a plan that changes little: give the room back
    }

    let (service_changes, endpoint_changes) = count_changes(&d, target, mirror);
    Emitted {
        ops,
        service_changes,
        endpoint_changes,
    }
}

/// Per service id: its frontends (key, flags, affinity timeout) and source
/// ranges.
type FrontendView = (BTreeSet<(ServiceKey, u16, u32)>, BTreeSet<Ipv4Net>);
/// Per service id: its backend sets as (slot, backend value) pairs.
type BackendView = Vec<(u32, Option<BackendValue>)>;

/// Service ids whose frontends changed, and whose backend sets changed,
/// over the domain and the target.
fn count_changes(d: &Domain, target: &MapContents, mirror: &Mirror) -> (usize, usize) {
    let c = mirror.contents();
    let mut after_fe: BTreeMap<u32, FrontendView> = BTreeMap::new();
    for (k, v) in &target.services {
        after_fe
            .entry(v.service_id)
            .or_default()
            .0
            .insert((*k, v.flags, v.affinity_timeout_sec));
    }
    for (sid, net) in &target.source_ranges {
        after_fe.entry(*sid).or_default().1.insert(*net);
    }
    let sids: BTreeSet<u32> = d
        .sids
        .iter()
        .copied()
        .chain(target.names.keys().copied())
        .chain(after_fe.keys().copied())
        .collect();
    let mut service_changes = 0;
    let mut endpoint_changes = 0;
    for sid in sids {
        let before: FrontendView = (
            mirror
                .keys_of(sid)
                .filter_map(|k| {
                    c.services
                        .get(k)
                        .map(|v| (*k, v.flags, v.affinity_timeout_sec))
                })
                .collect(),
            mirror.ranges_of(sid).copied().collect(),
        );
        if after_fe.get(&sid).unwrap_or(&FrontendView::default()) != &before {
            service_changes += 1;
        }
        let before: BackendView = mirror
            .slots_of(sid)
            .map(|(k, s)| (k.slot, c.backends.get(&s.backend_id).copied()))
            .collect();
        let changed = if before.is_empty() {
            // A new set (every port of a first plan): changed if it has any.
            slots_of(&target.slots, sid).next().is_some()
        } else {
            let after: BackendView = slots_of(&target.slots, sid)
                .map(|(k, s)| (k.slot, target.backends.get(&s.backend_id).copied()))
                .collect();
            before != after
        };
        if changed {
            endpoint_changes += 1;
        }
    }
    (service_changes, endpoint_changes)
}
