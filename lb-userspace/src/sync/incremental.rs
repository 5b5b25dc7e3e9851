//! The incremental planner: [`SyncState`], an indexed mirror of the
//! agent-owned maps that plans one watch event in time proportional to the
//! service ports it touches.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, BackendSlot, BackendSlotKey, BackendValue, ServiceKey, ServiceValue,
    LOCAL_SLOT_BASE,
};

use super::full::{self, Programmed};
use super::ids::FreeIds;
use super::{
    backend_tuple, node_addr_target, port_uses, too_many_backends, BackendTuple, Limits, Plan,
    SyncError, UseBits,
};
use crate::state::{
    service_name_value, DesiredServicePort, DesiredState, MapContents, MapOp, ServicePortName,
};

fn tuple_of(v: &BackendValue) -> BackendTuple {
    (v.addr, v.port, v.proto)
}

/// The slots of one service id (both sets), in slot order.
fn slots_of(
    slots: &BTreeMap<BackendSlotKey, BackendSlot>,
    service_id: u32,
) -> impl Iterator<Item = (&BackendSlotKey, &BackendSlot)> {
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

/// The uses of one backend tuple, summed over the service ports using it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct UseCount {
    ports: u32,
    local: u32,
    /// Uses that are not terminating fallbacks.
    serving: u32,
}

impl UseCount {
    fn add(&mut self, u: UseBits) {
        self.ports += 1;
        self.local += u32::from(u.local);
        self.serving += u32::from(!u.terminating);
    }

    fn sub(&mut self, u: UseBits) {
        self.ports = self.ports.saturating_sub(1);
        self.local = self.local.saturating_sub(u32::from(u.local));
        self.serving = self.serving.saturating_sub(u32::from(!u.terminating));
    }

    /// LOCAL if any use is local, TERMINATING only if every use is a
    /// fallback (the rule of the whole-state planner).
    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.local > 0 {
            flags |= backend_flags::LOCAL;
        }
        if self.ports > 0 && self.serving == 0 {
            flags |= backend_flags::TERMINATING;
        }
        flags
    }
}

/// The desired side of the mirror: how each programmed service port uses
/// its backends. The maps hold only the combined backend flags, so this is
/// what lets a change of one port recompute the flags of a shared backend
/// without looking at the other ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Uses {
    /// Service id -> the service port it was planned for. Absent for ids
    /// adopted from the maps and not planned since.
    port: BTreeMap<u32, ServicePortName>,
    by_sid: BTreeMap<u32, BTreeMap<BackendTuple, UseBits>>,
    by_tuple: BTreeMap<BackendTuple, UseCount>,
}

impl Uses {
    /// Adopted maps: the uses are unknown; each use is taken to be what the
    /// backend's flags say (exact when a backend has one user, and for
    /// several users whenever they agree, which is the steady state).
    fn adopt(c: &MapContents) -> Self {
        let mut by_sid: BTreeMap<u32, BTreeMap<BackendTuple, UseBits>> = BTreeMap::new();
        for (k, s) in &c.slots {
            if let Some(v) = c.backends.get(&s.backend_id) {
                by_sid.entry(k.service_id).or_default().insert(
                    tuple_of(v),
                    UseBits {
                        local: v.flags & backend_flags::LOCAL != 0,
                        terminating: v.flags & backend_flags::TERMINATING != 0,
                    },
                );
            }
        }
        let mut uses = Self::default();
        for (sid, u) in by_sid {
            uses.set_sid(sid, None, u);
        }
        uses
    }

    fn from_programmed(programmed: Vec<Programmed>) -> Self {
        let mut uses = Self::default();
        for p in programmed {
            uses.set_sid(p.sid, Some(p.name), p.uses);
        }
        uses
    }

    fn remove_sid(&mut self, sid: u32) {
        self.port.remove(&sid);
        for (t, bits) in self.by_sid.remove(&sid).unwrap_or_default() {
            if let Entry::Occupied(mut e) = self.by_tuple.entry(t) {
                e.get_mut().sub(bits);
                if e.get().ports == 0 {
                    e.remove();
                }
            }
        }
    }

    fn set_sid(
        &mut self,
        sid: u32,
        port: Option<ServicePortName>,
        uses: BTreeMap<BackendTuple, UseBits>,
    ) {
        self.remove_sid(sid);
        for (t, bits) in &uses {
            self.by_tuple.entry(*t).or_default().add(*bits);
        }
        if !uses.is_empty() {
            self.by_sid.insert(sid, uses);
        }
        if let Some(port) = port {
            self.port.insert(sid, port);
        }
    }

    fn count(&self, t: &BackendTuple) -> UseCount {
        self.by_tuple.get(t).copied().unwrap_or_default()
    }
}

/// What happens to one service port of a [`SyncState::plan_ports`] change set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Not decided yet.
    Candidate,
    /// Bad update (a frontend owned by a service port outside the change
    /// set): reported, its entries stay as they are.
    Keep,
    /// Gone, nothing reaches it, or it cannot be programmed: its entries
    /// are removed.
    Remove,
    /// Programmed with these frontend keys.
    Admit,
}

struct Change<'a> {
    name: &'a ServicePortName,
    /// `name` as displayed.
    label: String,
    /// `name` as stored in LB_SERVICE_NAMES (truncated).
    stored: String,
    port: Option<&'a DesiredServicePort>,
    /// The service ids it is programmed under now (normally at most one).
    old: BTreeSet<u32>,
    fate: Fate,
    /// Key -> frontend kind flag (when admitted).
    keys: BTreeMap<ServiceKey, u16>,
    errors: Vec<SyncError>,
}

/// Per service id: its frontends (key, flags, timeout) and its backend sets
/// as (slot, backend value) pairs, as `count_changes` of the whole-state
/// planner sees them.
type FrontendView = BTreeSet<(ServiceKey, u16, u32)>;
type BackendView = Vec<(u32, Option<BackendValue>)>;

/// The incremental planner: an indexed mirror of the agent-owned maps.
///
/// Map side (kept exact by [`SyncState::apply`], one op at a time): the
/// [`MapContents`] plus service id -> frontend keys, name -> service ids,
/// backend tuple -> backend ids, backend id -> slots referencing it (its
/// refcount and its users), and the free service and backend ids. The slots
/// of a service id are a range of the ordered slot map; the owner of a
/// frontend key is its value. Totals for the limits are the maps' lengths.
///
/// Desired side (recorded by the planners, see [`SyncState::plan_ports`]):
/// per service id, the port it was planned for and how it uses each backend
/// (local, terminating), summed per backend.
///
/// Usage: `plan_*` then execute `plan.ops` in order, calling
/// [`SyncState::apply`] after each successful write. If a write fails, the
/// maps and the planners' record diverge: re-read the maps into a new
/// `SyncState` and call [`SyncState::plan_full`] (the agent's resync).
#[derive(Clone, Debug)]
pub struct SyncState {
    contents: MapContents,
    limits: Limits,
    sid_keys: BTreeMap<u32, BTreeSet<ServiceKey>>,
    /// Entries carrying a service id: frontends, slots, its name.
    sid_refs: BTreeMap<u32, u32>,
    name_sids: BTreeMap<String, BTreeSet<u32>>,
    tuple_ids: BTreeMap<BackendTuple, BTreeSet<u32>>,
    backend_slots: BTreeMap<u32, BTreeSet<BackendSlotKey>>,
    free_sids: FreeIds,
    /// A backend id is in use while it is in LB_BACKENDS or a slot names it.
    free_bids: FreeIds,
    uses: Uses,
}

impl SyncState {
    /// Adopts what is in the maps (agent restart, resync): nothing is
    /// flushed; the next plan diffs against it. How each service port uses
    /// a shared backend is not in the maps: until the first
    /// [`SyncState::plan_full`], each use is taken to be what the backend's
    /// flags say.
    pub fn new(contents: MapContents, limits: Limits) -> Self {
        let mut state = Self {
            contents: MapContents::default(),
            limits,
            sid_keys: BTreeMap::new(),
            sid_refs: BTreeMap::new(),
            name_sids: BTreeMap::new(),
            tuple_ids: BTreeMap::new(),
            backend_slots: BTreeMap::new(),
            free_sids: FreeIds::default(),
            free_bids: FreeIds::default(),
            uses: Uses::default(),
        };
        let MapContents {
            services,
            slots,
            backends,
            names,
            node_addrs,
        } = contents;
        // One code path for the indexes: replay the contents as writes.
        for (id, v) in backends {
            state.apply(&MapOp::PutBackend(id, v));
        }
        for (k, v) in slots {
            state.apply(&MapOp::PutSlot(k, v));
        }
        for (id, n) in names {
            state.apply(&MapOp::PutName(id, n));
        }
        for (k, v) in services {
            state.apply(&MapOp::PutService(k, v));
        }
        state.contents.node_addrs = node_addrs;
        state.uses = Uses::adopt(&state.contents);
        state
    }

    /// The mirrored map contents.
    pub fn contents(&self) -> &MapContents {
        &self.contents
    }

    /// The capacities plans stay within.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The whole desired state (initial list, relist, manifest): ops for
    /// everything that differs; service ports not in `desired` are removed,
    /// and so is anything else in the maps that `desired` does not explain.
    /// Same result as [`super::plan_with_limits`]. O(everything).
    ///
    /// Records how every programmed port uses its backends (`&mut self`
    /// for that only; the mirror itself changes only through `apply`). On
    /// an error nothing is recorded.
    pub fn plan_full(
        &mut self,
        desired: &DesiredState,
        node_addrs: &BTreeSet<Ipv4Addr>,
    ) -> Result<Plan, SyncError> {
        self.plan_full_ports(&desired.services, node_addrs)
    }

    /// [`SyncState::plan_full`] over borrowed service ports, so a caller
    /// that keeps them elsewhere need not build a [`DesiredState`]. They
    /// must come sorted by name, each name once (a `DesiredState`'s order).
    pub fn plan_full_ports<'a>(
        &mut self,
        desired: impl IntoIterator<Item = (&'a ServicePortName, &'a DesiredServicePort)>,
        node_addrs: &BTreeSet<Ipv4Addr>,
    ) -> Result<Plan, SyncError> {
        let (plan, programmed) = full::plan(&self.contents, desired, node_addrs, &self.limits)?;
        self.uses = Uses::from_programmed(programmed);
        Ok(plan)
    }

    /// Node addresses only (LB_NODE_ADDRS): adds and removes, the rest
    /// reported as `TooManyNodeAddrs`.
    pub fn plan_node_addrs(&self, node_addrs: &BTreeSet<Ipv4Addr>) -> Plan {
        let mut errors = Vec::new();
        let target = node_addr_target(node_addrs, &self.limits, &mut errors);
        let current = &self.contents.node_addrs;
        let ops = target
            .difference(current)
            .map(|a| MapOp::PutNodeAddr(*a))
            .chain(
                current
                    .difference(&target)
                    .map(|a| MapOp::DeleteNodeAddr(*a)),
            )
            .collect();
        Plan {
            ops,
            errors,
            ..Plan::default()
        }
    }

    /// Only these service ports (`None`: the port is gone); every other
    /// entry is left as it is. Costs O((size of the ports before and after,
    /// plus the other users of backends whose flags change) x log N),
    /// never O(N).
    ///
    /// Same ids, flags, order and counts as [`SyncState::plan_full`] would
    /// give with the other ports unchanged, except:
    /// - a port whose new frontend key is programmed for a service port
    ///   outside the change set is not touched at all: its entries stay
    ///   (a bad update does not take down a working service) and the
    ///   conflict is reported as `DuplicateFrontend`. `plan_full` instead
    ///   gives the key to the port first in `DesiredState` order. Ports that
    ///   then want a key of such a kept port are kept too.
    /// - capacity is checked with the ports outside the change set counted
    ///   as they are: what the change set's ports hold now is credited
    ///   first, then they are admitted in order; a port that does not fit
    ///   is removed and reported, as with `plan_full`.
    /// - entries that belong to no port of the change set (garbage found at
    ///   adoption) are not cleaned up; `plan_full` does that.
    ///
    /// A port's current entries are found by its stored name. Names longer
    /// than `SERVICE_NAME_LEN` are truncated and may collide; ids planned
    /// by this state are told apart by the record, ids adopted by
    /// [`SyncState::new`] only after the first `plan_full`.
    ///
    /// Records how the planned ports use their backends (the maps cannot
    /// say: they hold only each backend's combined flags), at planning
    /// time: a plan that is not executed completely calls for the resync
    /// described on [`SyncState`].
    pub fn plan_ports(
        &mut self,
        changes: &BTreeMap<ServicePortName, Option<DesiredServicePort>>,
    ) -> Result<Plan, SyncError> {
        let limits = self.limits;
        let c = &self.contents;

        // 1. The change set: each port's current ids, and what is wrong
        //    with it on its own.
        let mut cs: Vec<Change<'_>> = Vec::with_capacity(changes.len());
        for (name, port) in changes {
            let label = name.to_string();
            let stored = service_name_value(&label).as_str().to_string();
            // Names are truncated: an id planned for another port with the
            // same stored name is not this port's.
            let old = self
                .name_sids
                .get(&stored)
                .into_iter()
                .flatten()
                .copied()
                .filter(|sid| self.uses.port.get(sid).is_none_or(|p| p == name))
                .collect();
            let mut errors = Vec::new();
            let fate = match port {
                None => Fate::Remove,
                Some(p) => match too_many_backends(name, p, &limits) {
                    Some(e) => {
                        errors.push(e);
                        Fate::Remove
                    }
                    None => Fate::Candidate,
                },
            };
            cs.push(Change {
                name,
                label,
                stored,
                port: port.as_ref(),
                old,
                fate,
                keys: BTreeMap::new(),
                errors,
            });
        }

        // 2. Keys owned outside the change set: such a port is kept as it
        //    is, which keeps its ids too; repeat until nothing changes.
        let mut released: BTreeSet<u32> = cs.iter().flat_map(|ch| ch.old.clone()).collect();
        loop {
            let mut kept_one = false;
            for ch in cs.iter_mut().filter(|ch| ch.fate == Fate::Candidate) {
                let Some(port) = ch.port else { continue };
                let outside = port.frontends.iter().any(|fe| {
                    c.services
                        .get(&fe.key())
                        .is_some_and(|v| !released.contains(&v.service_id))
                });
                if outside {
                    ch.fate = Fate::Keep;
                    for sid in &ch.old {
                        released.remove(sid);
                    }
                    kept_one = true;
                }
            }
            if !kept_one {
                break;
            }
        }
        for ch in cs.iter_mut().filter(|ch| ch.fate == Fate::Keep) {
            let Some(port) = ch.port else { continue };
            let mut seen = BTreeSet::new();
            for fe in &port.frontends {
                let key = fe.key();
                if !seen.insert(key) {
                    continue;
                }
                if let Some(v) = c.services.get(&key) {
                    if !released.contains(&v.service_id) && !ch.old.contains(&v.service_id) {
                        ch.errors.push(SyncError::DuplicateFrontend {
                            service: ch.label.clone(),
                            frontend: format!("{fe:?}"),
                            owner: c
                                .names
                                .get(&v.service_id)
                                .cloned()
                                .unwrap_or_else(|| format!("service id {}", v.service_id)),
                        });
                    }
                }
            }
        }

        // 3. Admission in order, with the limits counting everything but
        //    the released ids' entries (credited first).
        let released_slots: Vec<(BackendSlotKey, u32)> = released
            .iter()
            .flat_map(|&sid| slots_of(&c.slots, sid).map(|(k, s)| (*k, s.backend_id)))
            .collect();
        let released_keys: usize = released
            .iter()
            .map(|sid| self.sid_keys.get(sid).map_or(0, BTreeSet::len))
            .sum();
        let mut released_refs: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, b) in &released_slots {
            *released_refs.entry(*b).or_default() += 1;
        }
        // Backends only the released ids reference: deleted unless reused.
        let dropped: BTreeSet<u32> = released_refs
            .iter()
            .filter(|(b, n)| {
                self.backend_slots.get(b).map_or(0, BTreeSet::len) == **n
                    && c.backends.contains_key(b)
            })
            .map(|(b, _)| *b)
            .collect();
        let mut n_services = c.services.len() - released_keys;
        let mut n_slots = c.slots.len() - released_slots.len();
        let mut n_backends = c.backends.len() - dropped.len();
        let mut counted: BTreeSet<BackendTuple> = BTreeSet::new();
        let mut owners: BTreeMap<ServiceKey, usize> = BTreeMap::new();
        for i in 0..cs.len() {
            if cs[i].fate != Fate::Candidate {
                continue;
            }
            let Some(port) = cs[i].port else { continue };
            let proto = cs[i].name.protocol;
            let mut keys = BTreeMap::new();
            for fe in &port.frontends {
                let key = fe.key();
                if keys.contains_key(&key) {
                    continue; // same key twice in one port: the first kind wins
                }
                if let Some(&o) = owners.get(&key) {
                    let e = SyncError::DuplicateFrontend {
                        service: cs[i].label.clone(),
                        frontend: format!("{fe:?}"),
                        owner: cs[o].label.clone(),
                    };
                    cs[i].errors.push(e);
                    continue;
                }
                keys.insert(key, fe.kind.flag());
            }
            if keys.is_empty() {
                cs[i].fate = Fate::Remove; // nothing reaches it
                continue;
            }
            let new_tuples: BTreeSet<BackendTuple> = port
                .backends
                .iter()
                .chain(&port.local_backends)
                .map(|e| backend_tuple(e, proto))
                .filter(|t| {
                    !counted.contains(t)
                        && self
                            .tuple_ids
                            .get(t)
                            .and_then(|ids| ids.first())
                            .is_none_or(|b| dropped.contains(b))
                })
                .collect();
            let port_slots = port.backends.len() + port.local_backends.len();
            let full = if n_services + keys.len() > limits.max_services as usize {
                Some((lb_common::map_names::SERVICES, limits.max_services))
            } else if n_backends + new_tuples.len() > limits.max_backends as usize {
                Some((lb_common::map_names::BACKENDS, limits.max_backends))
            } else if n_slots + port_slots > limits.max_backend_slots as usize {
                Some((
                    lb_common::map_names::BACKEND_SLOTS,
                    limits.max_backend_slots,
                ))
            } else {
                None
            };
            if let Some((map, max)) = full {
                let e = SyncError::MapFull {
                    service: cs[i].label.clone(),
                    map,
                    max,
                };
                cs[i].errors.push(e);
                cs[i].fate = Fate::Remove;
                continue;
            }
            n_services += keys.len();
            n_backends += new_tuples.len();
            n_slots += port_slots;
            counted.extend(new_tuples);
            for k in keys.keys() {
                owners.insert(*k, i);
            }
            cs[i].keys = keys;
            cs[i].fate = Fate::Admit;
        }
        let admitted: Vec<&Change<'_>> = cs.iter().filter(|ch| ch.fate == Fate::Admit).collect();

        // 4. Service ids, by the whole-state planner's rules. Every key of
        //    an admitted port is free or owned by a released id.
        let candidates: Vec<BTreeSet<u32>> = admitted
            .iter()
            .map(|ch| {
                ch.keys
                    .keys()
                    .filter_map(|k| c.services.get(k))
                    .map(|v| v.service_id)
                    .filter(|id| *id != 0)
                    .collect()
            })
            .collect();
        let mut ids: Vec<Option<u32>> = vec![None; admitted.len()];
        let mut taken = BTreeSet::new();
        for (i, cand) in candidates.iter().enumerate() {
            if let Some(id) = cand
                .iter()
                .find(|id| !taken.contains(*id) && c.names.get(id) == Some(&admitted[i].stored))
            {
                taken.insert(*id);
                ids[i] = Some(*id);
            }
        }
        for (i, cand) in candidates.iter().enumerate() {
            if ids[i].is_none() {
                if let Some(id) = cand.iter().find(|id| !taken.contains(*id)) {
                    taken.insert(*id);
                    ids[i] = Some(*id);
                }
            }
        }
        let mut fresh_sids = self.free_sids.iter();
        let mut service_ids = Vec::with_capacity(admitted.len());
        for id in ids {
            service_ids.push(match id {
                Some(id) => id,
                None => fresh_sids
                    .next()
                    .ok_or(SyncError::IdsExhausted { what: "service" })?,
            });
        }

        // 5. Backend ids: a tuple keeps its id; new tuples get the smallest
        //    free ids, in tuple order.
        let mut bid_of: BTreeMap<BackendTuple, u32> = BTreeMap::new();
        let mut new_tuples: BTreeSet<BackendTuple> = BTreeSet::new();
        for ch in &admitted {
            let Some(port) = ch.port else { continue };
            for e in port.backends.iter().chain(&port.local_backends) {
                let t = backend_tuple(e, ch.name.protocol);
                match self.tuple_ids.get(&t).and_then(|ids| ids.first()) {
                    Some(b) => {
                        bid_of.insert(t, *b);
                    }
                    None => {
                        new_tuples.insert(t);
                    }
                }
            }
        }
        let mut fresh_bids = self.free_bids.iter();
        let mut fresh_tuple: BTreeMap<u32, BackendTuple> = BTreeMap::new();
        for t in new_tuples {
            let b = fresh_bids
                .next()
                .ok_or(SyncError::IdsExhausted { what: "backend" })?;
            bid_of.insert(t, b);
            fresh_tuple.insert(b, t);
        }

        // 6. What the affected ids hold after the plan.
        let mut t_services: BTreeMap<ServiceKey, ServiceValue> = BTreeMap::new();
        let mut t_slots: BTreeMap<BackendSlotKey, BackendSlot> = BTreeMap::new();
        let mut t_names: BTreeMap<u32, String> = BTreeMap::new();
        let mut t_uses: Vec<(u32, ServicePortName, BTreeMap<BackendTuple, UseBits>)> =
            Vec::with_capacity(admitted.len());
        for (ch, &sid) in admitted.iter().zip(&service_ids) {
            let Some(port) = ch.port else { continue };
            let proto = ch.name.protocol;
            for (base, set) in [
                (0u32, &port.backends),
                (LOCAL_SLOT_BASE, &port.local_backends),
            ] {
                for (slot, e) in set.iter().enumerate() {
                    t_slots.insert(
                        BackendSlotKey {
                            service_id: sid,
                            slot: base + slot as u32,
                        },
                        BackendSlot {
                            backend_id: bid_of[&backend_tuple(e, proto)],
                        },
                    );
                }
            }
            t_names.insert(sid, ch.stored.clone());
            for (key, kind_flag) in &ch.keys {
                t_services.insert(
                    *key,
                    ServiceValue {
                        service_id: sid,
                        // too_many_backends bounded both lengths by u16::MAX.
                        backend_count: port.backends.len() as u16,
                        local_backend_count: port.local_backends.len() as u16,
                        flags: kind_flag | port.flags,
                        _pad: 0,
                        affinity_timeout_sec: port.affinity_timeout_sec,
                    },
                );
            }
            t_uses.push((sid, ch.name.clone(), port_uses(port, proto)));
        }
        let mut affected = released;
        affected.extend(service_ids.iter().copied());
        let old_keys: BTreeSet<ServiceKey> = affected
            .iter()
            .flat_map(|sid| self.sid_keys.get(sid).into_iter().flatten().copied())
            .collect();
        let old_slots: Vec<(BackendSlotKey, u32)> = affected
            .iter()
            .flat_map(|&sid| slots_of(&c.slots, sid).map(|(k, s)| (*k, s.backend_id)))
            .collect();

        // 7. Backends: references after the plan, and flags from the uses
        //    of every port (the others' from the record).
        let mut delta: BTreeMap<u32, i64> = BTreeMap::new();
        for (_, b) in &old_slots {
            *delta.entry(*b).or_default() -= 1;
        }
        for s in t_slots.values() {
            *delta.entry(s.backend_id).or_default() += 1;
        }
        let mut counts: BTreeMap<BackendTuple, UseCount> = BTreeMap::new();
        for sid in &affected {
            for (t, bits) in self.uses.by_sid.get(sid).into_iter().flatten() {
                counts
                    .entry(*t)
                    .or_insert_with(|| self.uses.count(t))
                    .sub(*bits);
            }
        }
        for (_, _, u) in &t_uses {
            for (t, bits) in u {
                counts
                    .entry(*t)
                    .or_insert_with(|| self.uses.count(t))
                    .add(*bits);
            }
        }
        let mut put_backends: BTreeMap<u32, BackendValue> = BTreeMap::new();
        let mut del_backends: BTreeSet<u32> = BTreeSet::new();
        for (&b, &d) in &delta {
            let refs = self.backend_slots.get(&b).map_or(0, BTreeSet::len) as i64 + d;
            debug_assert!(refs >= 0, "backend {b}: negative refcount");
            let current = c.backends.get(&b).copied();
            if refs <= 0 {
                if current.is_some() {
                    del_backends.insert(b);
                }
                continue;
            }
            let Some(t) = current
                .map(|v| tuple_of(&v))
                .or_else(|| fresh_tuple.get(&b).copied())
            else {
                continue; // a dangling slot elsewhere; nothing to write
            };
            let count = counts
                .get(&t)
                .copied()
                .unwrap_or_else(|| self.uses.count(&t));
            let flags = if count.ports > 0 {
                count.flags()
            } else {
                current.map_or(0, |v| v.flags)
            };
            let value = BackendValue {
                addr: t.0,
                port: t.1,
                proto: t.2,
                flags,
            };
            if current != Some(value) {
                put_backends.insert(b, value);
            }
        }

        // 8. Ops, in the one order.
        let mut ops = Vec::new();
        for (b, v) in &put_backends {
            ops.push(MapOp::PutBackend(*b, *v));
        }
        for (k, v) in &t_slots {
            if c.slots.get(k) != Some(v) {
                ops.push(MapOp::PutSlot(*k, *v));
            }
        }
        for (id, n) in &t_names {
            if c.names.get(id) != Some(n) {
                ops.push(MapOp::PutName(*id, n.clone()));
            }
        }
        for (k, v) in &t_services {
            if c.services.get(k) != Some(v) {
                ops.push(MapOp::PutService(*k, *v));
            }
        }
        for k in &old_keys {
            if !t_services.contains_key(k) {
                ops.push(MapOp::DeleteService(*k));
            }
        }
        for (k, _) in &old_slots {
            if !t_slots.contains_key(k) {
                ops.push(MapOp::DeleteSlot(*k));
            }
        }
        for b in &del_backends {
            ops.push(MapOp::DeleteBackend(*b));
        }
        for sid in &affected {
            if c.names.contains_key(sid) && !t_names.contains_key(sid) {
                ops.push(MapOp::DeleteName(*sid));
            }
        }

        // 9. Counts, as the whole-state planner counts them.
        let value_after = |b: u32| -> Option<BackendValue> {
            if let Some(v) = put_backends.get(&b) {
                Some(*v)
            } else if del_backends.contains(&b) {
                None
            } else {
                c.backends.get(&b).copied()
            }
        };
        let mut t_frontends: BTreeMap<u32, FrontendView> = BTreeMap::new();
        for (k, v) in &t_services {
            t_frontends.entry(v.service_id).or_default().insert((
                *k,
                v.flags,
                v.affinity_timeout_sec,
            ));
        }
        let mut service_changes = 0;
        let mut endpoint_changes = 0;
        for &sid in &affected {
            let before: FrontendView = self
                .sid_keys
                .get(&sid)
                .into_iter()
                .flatten()
                .filter_map(|k| {
                    c.services
                        .get(k)
                        .map(|v| (*k, v.flags, v.affinity_timeout_sec))
                })
                .collect();
            if t_frontends.get(&sid).unwrap_or(&FrontendView::new()) != &before {
                service_changes += 1;
            }
            let before: BackendView = slots_of(&c.slots, sid)
                .map(|(k, s)| (k.slot, c.backends.get(&s.backend_id).copied()))
                .collect();
            let after: BackendView = slots_of(&t_slots, sid)
                .map(|(k, s)| (k.slot, value_after(s.backend_id)))
                .collect();
            if before != after {
                endpoint_changes += 1;
            }
        }
        // Other ports see a shared backend's new flags.
        let mut others = BTreeSet::new();
        for b in put_backends.keys() {
            if c.backends.contains_key(b) {
                for k in self.backend_slots.get(b).into_iter().flatten() {
                    if !affected.contains(&k.service_id) {
                        others.insert(k.service_id);
                    }
                }
            }
        }
        endpoint_changes += others.len();

        let errors = cs.iter_mut().flat_map(|ch| ch.errors.drain(..)).collect();

        // 10. Record the planned ports' uses.
        for sid in &affected {
            self.uses.remove_sid(*sid);
        }
        for (sid, name, u) in t_uses {
            self.uses.set_sid(sid, Some(name), u);
        }

        Ok(Plan {
            ops,
            service_changes,
            endpoint_changes,
            errors,
        })
    }

    /// Mirrors one op after the dataplane executed it, keeping every index
    /// right. Ops need not come from a plan of this state.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend(id, v) => {
                if let Some(old) = self.contents.backends.insert(*id, *v) {
                    remove_from(&mut self.tuple_ids, &tuple_of(&old), id);
                }
                self.tuple_ids.entry(tuple_of(v)).or_default().insert(*id);
                self.free_bids.take(*id);
            }
            MapOp::DeleteBackend(id) => {
                if let Some(old) = self.contents.backends.remove(id) {
                    remove_from(&mut self.tuple_ids, &tuple_of(&old), id);
                    self.backend_id_changed(*id);
                }
            }
            MapOp::PutSlot(k, s) => {
                match self.contents.slots.insert(*k, *s) {
                    Some(old) => {
                        remove_from(&mut self.backend_slots, &old.backend_id, k);
                        self.backend_id_changed(old.backend_id);
                    }
                    None => self.sid_ref(k.service_id, true),
                }
                self.backend_slots
                    .entry(s.backend_id)
                    .or_default()
                    .insert(*k);
                self.free_bids.take(s.backend_id);
            }
            MapOp::DeleteSlot(k) => {
                if let Some(old) = self.contents.slots.remove(k) {
                    remove_from(&mut self.backend_slots, &old.backend_id, k);
                    self.backend_id_changed(old.backend_id);
                    self.sid_ref(k.service_id, false);
                }
            }
            MapOp::PutName(id, n) => {
                match self.contents.names.insert(*id, n.clone()) {
                    Some(old) => remove_from(&mut self.name_sids, &old, id),
                    None => self.sid_ref(*id, true),
                }
                self.name_sids.entry(n.clone()).or_default().insert(*id);
            }
            MapOp::DeleteName(id) => {
                if let Some(old) = self.contents.names.remove(id) {
                    remove_from(&mut self.name_sids, &old, id);
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

    fn backend_id_changed(&mut self, id: u32) {
        if self.contents.backends.contains_key(&id) || self.backend_slots.contains_key(&id) {
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
                // Nothing left under this id: what was recorded for it is
                // moot (normally the planner dropped it already).
                self.uses.remove_sid(sid);
            }
        }
    }
}

#[cfg(test)]
impl SyncState {
    /// Panics unless every index equals one rebuilt from the contents, and
    /// the recorded uses are self-consistent and match the slots.
    pub(super) fn assert_indexes(&self) {
        let fresh = SyncState::new(self.contents.clone(), self.limits);
        assert_eq!(self.sid_keys, fresh.sid_keys, "sid_keys");
        assert_eq!(self.sid_refs, fresh.sid_refs, "sid_refs");
        assert_eq!(self.name_sids, fresh.name_sids, "name_sids");
        assert_eq!(self.tuple_ids, fresh.tuple_ids, "tuple_ids");
        assert_eq!(self.backend_slots, fresh.backend_slots, "backend_slots");
        assert_eq!(self.free_sids, fresh.free_sids, "free_sids");
        assert_eq!(self.free_bids, fresh.free_bids, "free_bids");
        let mut sums: BTreeMap<BackendTuple, UseCount> = BTreeMap::new();
        for u in self.uses.by_sid.values() {
            for (t, bits) in u {
                sums.entry(*t).or_default().add(*bits);
            }
        }
        assert_eq!(self.uses.by_tuple, sums, "uses by tuple");
        // Each id's recorded uses are the tuples its slots reference.
        for (sid, u) in &self.uses.by_sid {
            let tuples: BTreeSet<BackendTuple> = slots_of(&self.contents.slots, *sid)
                .filter_map(|(_, s)| self.contents.backends.get(&s.backend_id))
                .map(tuple_of)
                .collect();
            assert_eq!(
                u.keys().copied().collect::<BTreeSet<_>>(),
                tuples,
                "uses of service id {sid}"
            );
        }
        // And every backend's flags are what the uses say.
        for v in self.contents.backends.values() {
            let count = self.uses.count(&tuple_of(v));
            if count.ports > 0 {
                assert_eq!(v.flags, count.flags(), "flags of {v:?}");
            }
        }
    }
}
