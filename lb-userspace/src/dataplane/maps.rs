//! Typed handles on the pinned maps: read their whole contents into a
//! [`MapContents`], apply [`MapOp`]s, and read conntrack and counters for lbctl.

use std::borrow::{Borrow, BorrowMut};
use std::path::Path;

use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray};
use ipnet::Ipv4Net;
use lb_common::{
    map_names, BackendSlot, BackendSlotKey, BackendValue, ConntrackEntry, ConntrackKey,
    NodeAddrValue, ServiceKey, ServicePortNameValue, ServiceValue, SourceRangeKey, StatReason,
};
use lb_core::{MapContents, MapOp, ServicePortName};
use thiserror::Error;
use tracing::warn;

use super::sys;

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("service port {0}: a name part is longer than Kubernetes allows; cannot be stored")]
    NameTooLong(ServicePortName),
    #[error(
        "cannot open pinned map {path}: {source} (is the agent running, and is --bpffs right?)"
    )]
    Open {
        path: String,
        #[source]
        source: MapError,
    },
}

fn err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// The maps the agent writes. Generic over owned (`MapData`) and borrowed handles.
pub struct AgentMaps<T> {
    pub services: HashMap<T, ServiceKey, ServiceValue>,
    pub slots: HashMap<T, BackendSlotKey, BackendSlot>,
    pub backends: HashMap<T, u32, BackendValue>,
    pub names: HashMap<T, u32, ServicePortNameValue>,
    pub node_addrs: HashMap<T, u32, NodeAddrValue>,
    pub source_ranges: LpmTrie<T, SourceRangeKey, u8>,
}

/// The LB_SOURCE_RANGES key of (service id, range).
fn range_key(service_id: u32, net: &Ipv4Net) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        SourceRangeKey::prefix_len(u32::from(net.prefix_len())),
        SourceRangeKey::new(service_id, lb_common::ipv4_to_net(net.network().octets())),
    )
}

/// (service id, range) of an LB_SOURCE_RANGES key; `None` if it cannot be one
/// the agent wrote.
fn range_of(key: &LpmKey<SourceRangeKey>) -> Option<(u32, Ipv4Net)> {
    let data = key.data();
    let len = key
        .prefix_len()
        .checked_sub(SourceRangeKey::SERVICE_ID_BITS)?;
    let addr = Ipv4Addr::from(lb_common::net_to_ipv4(data.addr));
    let net = Ipv4Net::new(addr, u8::try_from(len).ok()?).ok()?;
    Some((data.service_id(), net))
}

/// The maps the datapath writes and lbctl reads.
pub struct DatapathMaps<T> {
    pub conntrack: HashMap<T, ConntrackKey, ConntrackEntry>,
    pub stats: PerCpuArray<T, u64>,
}

fn open_pinned(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.display().to_string(),
        source,
    })?;
    Map::from_map_data(data).map_err(err(name))
}

impl AgentMaps<MapData> {
    /// Opens the pinned maps under `dir` (lbctl, and the agent itself).
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            services: HashMap::try_from(open_pinned(dir, map_names::SERVICES)?)
                .map_err(err(map_names::SERVICES))?,
            slots: HashMap::try_from(open_pinned(dir, map_names::BACKEND_SLOTS)?)
                .map_err(err(map_names::BACKEND_SLOTS))?,
            backends: HashMap::try_from(open_pinned(dir, map_names::BACKENDS)?)
                .map_err(err(map_names::BACKENDS))?,
            names: HashMap::try_from(open_pinned(dir, map_names::SERVICE_NAMES)?)
                .map_err(err(map_names::SERVICE_NAMES))?,
            node_addrs: HashMap::try_from(open_pinned(dir, map_names::NODE_ADDRS)?)
                .map_err(err(map_names::NODE_ADDRS))?,
            source_ranges: LpmTrie::try_from(open_pinned(dir, map_names::SOURCE_RANGES)?)
                .map_err(err(map_names::SOURCE_RANGES))?,
        })
    }
}

impl DatapathMaps<MapData> {
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            conntrack: HashMap::try_from(open_pinned(dir, map_names::CONNTRACK)?)
                .map_err(err(map_names::CONNTRACK))?,
            stats: PerCpuArray::try_from(open_pinned(dir, map_names::STATS)?)
                .map_err(err(map_names::STATS))?,
        })
    }
}

impl<T: Borrow<MapData>> AgentMaps<T> {
    /// Everything in the agent-owned maps right now. Used at start-up to adopt
    /// what an earlier agent programmed (the diff starts from here, never
    /// from empty), and by lbctl.
    pub fn read_contents(&self) -> Result<MapContents, MapsError> {
        let mut c = MapContents::default();
        for kv in self.services.iter() {
            let (k, v) = kv.map_err(err(map_names::SERVICES))?;
            c.services.insert(k, v);
        }
        for kv in self.slots.iter() {
            let (k, v) = kv.map_err(err(map_names::BACKEND_SLOTS))?;
            c.slots.insert(k, v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(err(map_names::BACKENDS))?;
            c.backends.insert(k, v);
        }
        for kv in self.names.iter() {
            let (k, v) = kv.map_err(err(map_names::SERVICE_NAMES))?;
            match ServicePortName::from_map_value(&v) {
                Some(n) => {
                    c.names.insert(k, n);
                }
                // Left out: the planner then sees the id's other entries as
                // belonging to no port, and a full plan removes them.
                None => warn!(
                    service_id = k,
                    "LB_SERVICE_NAMES entry does not decode; ignored"
                ),
            }
        }
        for k in self.node_addrs.keys() {
            c.node_addrs.insert(k.map_err(err(map_names::NODE_ADDRS))?);
        }
        for k in self.source_ranges.keys() {
            let k = k.map_err(err(map_names::SOURCE_RANGES))?;
            match range_of(&k) {
                Some(r) => {
                    c.source_ranges.insert(r);
                }
                None => warn!(
                    prefix_len = k.prefix_len(),
                    "LB_SOURCE_RANGES entry the agent cannot have written; ignored"
                ),
            }
        }
        Ok(c)
    }
}

/// One batched write of a run of puts into one map.
fn batch_puts<K: aya::Pod, V: aya::Pod>(
    run: &[MapOp],
    entry: impl FnMut(&MapOp) -> Option<(K, V)>,
    map: &MapData,
    name: &'static str,
) -> Result<(), MapsError> {
    let (keys, values): (Vec<K>, Vec<V>) = run.iter().filter_map(entry).unzip();
    sys::map_update_batch(map, &keys, &values).map_err(|io_error| MapsError::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "BPF_MAP_UPDATE_BATCH",
            io_error,
        }),
    })
}

impl<T: BorrowMut<MapData>> AgentMaps<T> {
    /// Executes `ops` in order. Runs of puts into one map go to the kernel
    /// in batches (one syscall per 4096 elements: the initial program of a
    /// big cluster is hundreds of thousands of writes); the order between
    /// runs, which keeps every backend set whole, is kept.
    pub fn apply_all(&mut self, ops: &[MapOp]) -> Result<(), MapsError> {
        let mut i = 0;
        while i < ops.len() {
            let run = ops[i..]
                .iter()
                .take_while(|o| std::mem::discriminant(*o) == std::mem::discriminant(&ops[i]))
                .count();
            let chunk = &ops[i..i + run];
            match &ops[i] {
                MapOp::PutBackend(..) if run > 1 => batch_puts(
                    chunk,
                    |o| match o {
                        MapOp::PutBackend(k, v) => Some((*k, *v)),
                        _ => None,
                    },
                    self.backends.map(),
                    map_names::BACKENDS,
                )?,
                MapOp::PutSlot(..) if run > 1 => batch_puts(
                    chunk,
                    |o| match o {
                        MapOp::PutSlot(k, v) => Some((*k, *v)),
                        _ => None,
                    },
                    self.slots.map(),
                    map_names::BACKEND_SLOTS,
                )?,
                MapOp::PutService(..) if run > 1 => batch_puts(
                    chunk,
                    |o| match o {
                        MapOp::PutService(k, v) => Some((*k, *v)),
                        _ => None,
                    },
                    self.services.map(),
                    map_names::SERVICES,
                )?,
                MapOp::PutName(..) if run > 1 => {
                    let mut too_long = None;
                    batch_puts(
                        chunk,
                        |o| match o {
                            MapOp::PutName(k, n) => match n.to_map_value() {
                                Some(v) => Some((*k, v)),
                                None => {
                                    too_long.get_or_insert_with(|| n.clone());
                                    None
                                }
                            },
                            _ => None,
                        },
                        self.names.map(),
                        map_names::SERVICE_NAMES,
                    )?;
                    if let Some(n) = too_long {
                        return Err(MapsError::NameTooLong(n));
                    }
                }
                _ => {
                    for op in chunk {
                        self.apply(op)?;
                    }
                }
            }
            i += run;
        }
        Ok(())
    }

    /// Executes one map write.
    pub fn apply(&mut self, op: &MapOp) -> Result<(), MapsError> {
        match op {
            MapOp::PutBackend(id, v) => self
                .backends
                .insert(id, v, 0)
                .map_err(err(map_names::BACKENDS)),
            MapOp::PutSlot(k, v) => self
                .slots
                .insert(k, v, 0)
                .map_err(err(map_names::BACKEND_SLOTS)),
            MapOp::PutName(id, n) => {
                let v = n
                    .to_map_value()
                    .ok_or_else(|| MapsError::NameTooLong(n.clone()))?;
                self.names
                    .insert(id, v, 0)
                    .map_err(err(map_names::SERVICE_NAMES))
            }
            MapOp::PutSourceRange(id, net) => self
                .source_ranges
                .insert(&range_key(*id, net), 1, 0)
                .map_err(err(map_names::SOURCE_RANGES)),
            MapOp::DeleteSourceRange(id, net) => {
                ignore_missing(self.source_ranges.remove(&range_key(*id, net)))
                    .map_err(err(map_names::SOURCE_RANGES))
            }
            MapOp::PutNodeAddr(a) => self
                .node_addrs
                .insert(a, NodeAddrValue { flags: 0 }, 0)
                .map_err(err(map_names::NODE_ADDRS)),
            MapOp::PutService(k, v) => self
                .services
                .insert(k, v, 0)
                .map_err(err(map_names::SERVICES)),
            MapOp::DeleteService(k) => {
                ignore_missing(self.services.remove(k)).map_err(err(map_names::SERVICES))
            }
            MapOp::DeleteSlot(k) => {
                ignore_missing(self.slots.remove(k)).map_err(err(map_names::BACKEND_SLOTS))
            }
            MapOp::DeleteBackend(id) => {
                ignore_missing(self.backends.remove(id)).map_err(err(map_names::BACKENDS))
            }
            MapOp::DeleteName(id) => {
                ignore_missing(self.names.remove(id)).map_err(err(map_names::SERVICE_NAMES))
            }
            MapOp::DeleteNodeAddr(a) => {
                ignore_missing(self.node_addrs.remove(a)).map_err(err(map_names::NODE_ADDRS))
            }
        }
    }
}

/// Deleting what is already gone is success: the goal state is reached.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl<T: BorrowMut<MapData>> DatapathMaps<T> {
    /// Deletes conntrack entries; ones already gone (LRU eviction, or the
    /// datapath replaced them) are fine. Returns how many were deleted.
    pub fn delete_conntrack(&mut self, keys: &[ConntrackKey]) -> Result<usize, MapsError> {
        let mut n = 0;
        for k in keys {
            match ignore_missing(self.conntrack.remove(k)) {
                Ok(()) => n += 1,
                Err(e) => return Err(err(map_names::CONNTRACK)(e)),
            }
        }
        Ok(n)
    }
}

impl<T: Borrow<MapData>> DatapathMaps<T> {
    /// All conntrack entries (a snapshot; entries can change while reading).
    pub fn conntrack_entries(&self) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, MapsError> {
        let mut out = Vec::new();
        for kv in self.conntrack.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                // An LRU entry evicted between get_next_key and lookup.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(err(map_names::CONNTRACK)(e)),
            }
        }
        Ok(out)
    }

    /// Counters summed over CPUs, in `StatReason::ALL` order.
    pub fn stats(&self) -> Result<Vec<(StatReason, u64)>, MapsError> {
        let mut out = Vec::new();
        for r in StatReason::ALL {
            let per_cpu = self
                .stats
                .get(&(r as u32), 0)
                .map_err(err(map_names::STATS))?;
            out.push((r, per_cpu.iter().copied().sum()));
        }
        Ok(out)
    }
}
