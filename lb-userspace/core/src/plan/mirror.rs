//! The planner's exact copy of the agent-owned maps, indexed for the
//! questions the planner asks: which entries carry a service id, which ids
//! are free, which service id a service port has.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use lb_common::{BackendSlot, BackendSlotKey, ServiceKey};

use super::ids::FreeIds;
use crate::contents::{MapContents, MapOp};
use crate::desired::ServicePortName;

/// [`MapContents`] plus indexes, kept exact by [`Mirror::apply`] one op at
/// a time (an op need not come from a plan).
#[derive(Clone, Debug, Default)]
pub(crate) struct Mirror {
    contents: MapContents,
    /// Service id -> its frontend keys.
    sid_keys: BTreeMap<u32, BTreeSet<ServiceKey>>,
    /// Service id -> its source ranges (F7).
    sid_ranges: BTreeMap<u32, BTreeSet<Ipv4Net>>,
    /// Service id -> entries carrying it (frontends, slots, source ranges,
    /// its name).
    sid_refs: BTreeMap<u32, u32>,
    /// Backend id -> slots referencing it.
    backend_refs: BTreeMap<u32, u32>,
    /// Service port -> the service ids named after it (one, unless the maps
    /// hold leftovers).
    port_sids: BTreeMap<ServicePortName, BTreeSet<u32>>,
    free_sids: FreeIds,
    /// A backend id is in use while it is in LB_BACKENDS or a slot names it.
    free_bids: FreeIds,
}

impl Mirror {
    /// Indexes `contents` (what an earlier agent left in the maps).
    pub fn new(contents: MapContents) -> Self {
        let mut m = Self::default();
        let MapContents {
            services,
            slots,
            backends,
            names,
            node_addrs,
            source_ranges,
        } = contents;
        // One code path for the indexes: replay the contents as writes.
        for (id, v) in backends {
            m.apply(&MapOp::PutBackend(id, v));
        }
        for (k, v) in slots {
            m.apply(&MapOp::PutSlot(k, v));
        }
        for (id, n) in names {
            m.apply(&MapOp::PutName(id, Box::new(n)));
        }
        for (id, net) in source_ranges {
            m.apply(&MapOp::PutSourceRange(id, net));
        }
        for (k, v) in services {
            m.apply(&MapOp::PutService(k, v));
        }
        m.contents.node_addrs = node_addrs;
        m
    }

    pub fn contents(&self) -> &MapContents {
        &self.contents
    }

    /// The service id `port` is programmed under, if any (the smallest when
    /// leftovers name it twice).
    pub fn sid_of(&self, port: &ServicePortName) -> Option<u32> {
        self.port_sids.get(port)?.first().copied()
    }

    pub fn keys_of(&self, sid: u32) -> impl Iterator<Item = &ServiceKey> + '_ {
        self.sid_keys.get(&sid).into_iter().flatten()
    }

    /// The slots of one service id (both sets), in slot order.
    pub fn slots_of(&self, sid: u32) -> impl Iterator<Item = (&BackendSlotKey, &BackendSlot)> + '_ {
        slots_of(&self.contents.slots, sid)
    }

    pub fn ranges_of(&self, sid: u32) -> impl Iterator<Item = &Ipv4Net> + '_ {
        self.sid_ranges.get(&sid).into_iter().flatten()
    }

    /// Slots referencing backend `bid`.
    pub fn backend_refs(&self, bid: u32) -> u32 {
        self.backend_refs.get(&bid).copied().unwrap_or(0)
    }

    /// Every service id some entry carries.
    pub fn sids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sid_refs.keys().copied()
    }

    pub fn free_sids(&self) -> impl Iterator<Item = u32> + '_ {
        self.free_sids.iter()
    }

    pub fn free_bids(&self) -> impl Iterator<Item = u32> + '_ {
        self.free_bids.iter()
    }

    /// Mirrors one op the dataplane executed.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend(id, v) => {
                self.contents.backends.insert(*id, *v);
                self.free_bids.take(*id);
            }
            MapOp::DeleteBackend(id) => {
                if self.contents.backends.remove(id).is_some() {
                    self.backend_id_changed(*id);
                }
            }
            MapOp::PutSlot(k, s) => {
                match self.contents.slots.insert(*k, *s) {
                    Some(old) => {
                        self.backend_ref(old.backend_id, false);
                    }
                    None => self.sid_ref(k.service_id, true),
                }
                self.backend_ref(s.backend_id, true);
            }
            MapOp::DeleteSlot(k) => {
                if let Some(old) = self.contents.slots.remove(k) {
                    self.backend_ref(old.backend_id, false);
                    self.sid_ref(k.service_id, false);
                }
            }
            MapOp::PutSourceRange(id, net) => {
                if self.contents.source_ranges.insert((*id, *net)) {
                    self.sid_ranges.entry(*id).or_default().insert(*net);
                    self.sid_ref(*id, true);
                }
            }
            MapOp::DeleteSourceRange(id, net) => {
                if self.contents.source_ranges.remove(&(*id, *net)) {
                    remove_from(&mut self.sid_ranges, id, net);
                    self.sid_ref(*id, false);
                }
            }
            MapOp::PutName(id, n) => {
                match self.contents.names.insert(*id, (**n).clone()) {
                    Some(old) => remove_from(&mut self.port_sids, &old, id),
                    None => self.sid_ref(*id, true),
                }
                self.port_sids.entry((**n).clone()).or_default().insert(*id);
            }
            MapOp::DeleteName(id) => {
                if let Some(old) = self.contents.names.remove(id) {
                    remove_from(&mut self.port_sids, &old, id);
                    self.sid_ref(*id, false);
                }
            }
            MapOp::PutService(k, v) => {
                match self.contents.services.insert(*k, *v) {
                    Some(old) if old.service_id == v.service_id => return,
                    Some(old) => {
                        remove_from(&mut self.sid_keys, &old.service_id, k);
                        self.sid_ref(old.service_id, false);
                    }
                    None => {}
                }
                self.sid_keys.entry(v.service_id).or_default().insert(*k);
                self.sid_ref(v.service_id, true);
            }
            MapOp::DeleteService(k) => {
                if let Some(old) = self.contents.services.remove(k) {
                    remove_from(&mut self.sid_keys, &old.service_id, k);
                    self.sid_ref(old.service_id, false);
                }
            }
            MapOp::PutNodeAddr(a) => {
                self.contents.node_addrs.insert(*a);
            }
            MapOp::DeleteNodeAddr(a) => {
                self.contents.node_addrs.remove(a);
            }
        }
    }

    fn backend_ref(&mut self, bid: u32, up: bool) {
        let n = self.backend_refs.entry(bid).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.backend_refs.remove(&bid);
            }
        }
        self.backend_id_changed(bid);
    }

    fn backend_id_changed(&mut self, id: u32) {
        if self.contents.backends.contains_key(&id) || self.backend_refs.contains_key(&id) {
            self.free_bids.take(id);
        } else {
            self.free_bids.release(id);
        }
    }

    /// One more (`up`) or one fewer entry carries `sid`.
    fn sid_ref(&mut self, sid: u32, up: bool) {
        let n = self.sid_refs.entry(sid).or_default();
        if up {
            *n += 1;
            self.free_sids.take(sid);
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.sid_refs.remove(&sid);
                self.free_sids.release(sid);
            }
        }
    }

    /// Panics unless every index equals one rebuilt from the contents.
    #[cfg(test)]
    pub fn assert_indexes(&self) {
        let fresh = Mirror::new(self.contents.clone());
        assert_eq!(self.sid_keys, fresh.sid_keys, "sid_keys");
        assert_eq!(self.sid_ranges, fresh.sid_ranges, "sid_ranges");
        assert_eq!(self.sid_refs, fresh.sid_refs, "sid_refs");
        assert_eq!(self.backend_refs, fresh.backend_refs, "backend_refs");
        assert_eq!(self.port_sids, fresh.port_sids, "port_sids");
        assert_eq!(self.free_sids, fresh.free_sids, "free_sids");
        assert_eq!(self.free_bids, fresh.free_bids, "free_bids");
    }
}

/// The slots of one service id (both sets), in slot order.
pub(crate) fn slots_of(
    slots: &BTreeMap<BackendSlotKey, BackendSlot>,
    service_id: u32,
) -> impl Iterator<Item = (&BackendSlotKey, &BackendSlot)> + '_ {
    slots.range(
        BackendSlotKey {
            service_id,
            slot: 0,
        }..=BackendSlotKey {
            service_id,
            slot: u32::MAX,
        },
    )
}

fn remove_from<K: Ord, V: Ord>(index: &mut BTreeMap<K, BTreeSet<V>>, key: &K, value: &V) {
    if let Some(set) = index.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            index.remove(key);
        }
    }
}
