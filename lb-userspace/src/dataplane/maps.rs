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

use super::conntrack_gc::{Candidate, ExpiredFlows};
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

/// Runs of puts at least this long are written by several threads at once.
const PARALLEL_RUN: usize = 16_384;
/// At most this many writer threads.
const MAX_WRITERS: usize = 4;

/// One batched write of a run of puts into one map. A long run (the first
/// plan of a big cluster) is split over the CPUs: the puts of one run are
/// independent (distinct keys, one phase of the plan), most of the cost is
/// the kernel's per-element work, and the kernel locks per hash bucket.
fn batch_puts<K: aya::Pod + Send + Sync, V: aya::Pod + Send + Sync>(
    run: &[MapOp],
    entry: impl FnMut(&MapOp) -> Option<(K, V)>,
    map: &MapData,
    name: &'static str,
) -> Result<(), MapsError> {
    let (keys, values): (Vec<K>, Vec<V>) = run.iter().filter_map(entry).unzip();
    let writers = if keys.len() >= PARALLEL_RUN {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_WRITERS)
    } else {
        1
    };
    let result = if writers > 1 {
        let per = keys.len().div_ceil(writers);
        std::thread::scope(|s| {
            let parts: Vec<_> = keys
                .chunks(per)
                .zip(values.chunks(per))
                .map(|(k, v)| s.spawn(move || sys::map_update_batch(map, k, v)))
                .collect();
            // The scope joins every writer before it returns, also after an
            // error here.
            parts
                .into_iter()
                .try_for_each(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        })
    } else {
        sys::map_update_batch(map, &keys, &values)
    };
    result.map_err(|io_error| MapsError::Map {
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
                                    too_long.get_or_insert_with(|| (**n).clone());
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
                    .ok_or_else(|| MapsError::NameTooLong((**n).clone()))?;
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

/// Elements per BPF_MAP_LOOKUP_BATCH call of the conntrack map.
const CONNTRACK_BATCH: usize = 4096;

/// Deleting what is already gone is success: the goal state is reached.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM (hash and LRU hash maps since 5.14): the
/// value the kernel removed, atomically with the removal; `None` when the
/// key was not there. (aya 0.14 has it only for queues and stacks.)
fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    key: &K,
) -> std::io::Result<Option<V>> {
    use std::os::fd::{AsFd, AsRawFd};
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    // map_elem: map_fd (u32), pad, key, value, flags (u64 each).
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = Elem {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the key
    // and value buffers have the map's key and value sizes (the lb-common
    // types of the map).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<Elem>(),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel wrote a whole value (V is Pod: any bytes are valid).
    Ok(Some(unsafe { value.assume_init() }))
}

impl<T: BorrowMut<MapData>> DatapathMaps<T> {
    /// Deletes the flows the GC found idle (C1), both directions together,
    /// without racing the datapath: each flow is read again right before it
    /// is deleted and skipped if it is live again, and each entry is
    /// removed with BPF_MAP_LOOKUP_AND_DELETE_ELEM, so the value judged is
    /// the one removed; an entry a packet refreshed in between is put back
    /// (with BPF_NOEXIST: a repair the datapath made meanwhile wins), and
    /// then the flow is kept. See `conntrack_gc` for the window that
    /// remains. Entries already gone (LRU eviction) are fine. Returns how
    /// many entries were deleted.
    pub fn delete_conntrack(&mut self, expired: &ExpiredFlows) -> Result<usize, MapsError> {
        let mut n = 0;
        for c in &expired.flows {
            n += self.delete_flow(expired, c)?;
        }
        Ok(n)
    }

    fn ct_get(&self, key: &ConntrackKey) -> Result<Option<ConntrackEntry>, MapsError> {
        match self.conntrack.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(err(map_names::CONNTRACK)(e)),
        }
    }

    /// Puts an entry back that a packet refreshed while it was deleted,
    /// unless the datapath re-created it meanwhile.
    fn ct_restore(&mut self, key: &ConntrackKey, entry: &ConntrackEntry) -> Result<(), MapsError> {
        const BPF_NOEXIST: u64 = 1;
        match self.conntrack.insert(key, entry, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(err(map_names::CONNTRACK)(e)),
        }
    }

    fn ct_take(&mut self, key: &ConntrackKey) -> Result<Option<ConntrackEntry>, MapsError> {
        lookup_and_delete(self.conntrack.map(), key).map_err(|io_error| MapsError::Map {
            name: map_names::CONNTRACK,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
                io_error,
            }),
        })
    }

    /// The flow of candidate `c` as the map holds it now: its FORWARD entry
    /// and the REPLY entry that pairs with it, or a REPLY entry alone.
    #[allow(clippy::type_complexity)]
    fn current(
        &self,
        c: &Candidate,
    ) -> Result<
        (
            Option<(ConntrackKey, ConntrackEntry)>,
            Option<(ConntrackKey, ConntrackEntry)>,
        ),
        MapsError,
    > {
        let mut fwd = match c.forward {
            Some(k) => self.ct_get(&k)?.map(|e| (k, e)),
            None => None,
        };
        let lone_reply = match (fwd, c.reply) {
            (None, Some(rk)) => self.ct_get(&rk)?.map(|e| (rk, e)),
            _ => None,
        };
        if let Some((rk, re)) = lone_reply {
            // Has its FORWARD entry come back (re-created by the datapath)?
            let fk = rk.peer(&re);
            if let Some(fe) = self.ct_get(&fk)? {
                if fk.peer(&fe) == rk {
                    fwd = Some((fk, fe));
                }
            }
        }
        let rev = match fwd {
            Some((fk, fe)) => {
                let rk = fk.peer(&fe);
                self.ct_get(&rk)?
                    .filter(|re| rk.peer(re) == fk)
                    .map(|re| (rk, re))
            }
            None => lone_reply,
        };
        Ok((fwd, rev))
    }

    /// Deletes one idle flow unless it is live again; the number of
    /// entries deleted.
    fn delete_flow(&mut self, x: &ExpiredFlows, c: &Candidate) -> Result<usize, MapsError> {
        let (fwd, rev) = self.current(c)?;
        let Some(proto) = fwd.or(rev).map(|(k, _)| k.proto) else {
            return Ok(0);
        };
        if !x.idle(
            proto,
            fwd.as_ref().map(|f| &f.1),
            rev.as_ref().map(|r| &r.1),
        ) {
            return Ok(0);
        }
        let mut deleted = 0;
        // FORWARD first: a reply in the window below is still translated
        // (and re-creates the FORWARD entry).
        let mut taken_fwd = None;
        if let Some((fk, _)) = fwd {
            if let Some(v) = self.ct_take(&fk)? {
                if !x.idle(proto, Some(&v), rev.as_ref().map(|r| &r.1)) {
                    // A forward packet refreshed it after our read.
                    self.ct_restore(&fk, &v)?;
                    return Ok(0);
                }
                deleted += 1;
                taken_fwd = Some((fk, v));
            }
        }
        if let Some((rk, _)) = rev {
            if let Some(w) = self.ct_take(&rk)? {
                if !x.idle(proto, Some(&w), None) {
                    // A reply came in between: the flow lives; put both back.
                    self.ct_restore(&rk, &w)?;
                    if let Some((fk, v)) = taken_fwd {
                        self.ct_restore(&fk, &v)?;
                    }
                    return Ok(0);
                }
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

impl<T: Borrow<MapData>> DatapathMaps<T> {
    /// All conntrack entries (a snapshot; entries can change while
    /// reading), read with BPF_MAP_LOOKUP_BATCH: about 250 syscalls for
    /// 1M entries. Kernels without batch lookups on this map type
    /// (before 5.6) get an element-by-element walk.
    pub fn conntrack_entries(&self) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, MapsError> {
        match super::sys::map_lookup_all(self.conntrack.map(), CONNTRACK_BATCH) {
            Ok(v) => return Ok(v),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => {}
            Err(io_error) => {
                return Err(MapsError::Map {
                    name: map_names::CONNTRACK,
                    source: MapError::SyscallError(aya::sys::SyscallError {
                        call: "BPF_MAP_LOOKUP_BATCH",
                        io_error,
                    }),
                })
            }
        }
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
