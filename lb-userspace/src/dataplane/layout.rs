//! Map layouts across agent versions.
//!
//! Pinned maps outlive the agent that created them, so a new agent can find
//! maps an older (or newer) one made. It must never misread them: before
//! adopting pinned maps it checks the layout version in `LB_LAYOUT` and each
//! map's kind, key size, value size and capacity against what this agent's
//! datapath declares. Anything else is refused with a message that names the
//! map and the command to run.

use std::mem::size_of;
use std::path::Path;

use aya::maps::{Array, Map, MapData, MapType};
use lb_common::{
    map_names as m, AffinityKey, AffinityValue, BackendSlot, BackendSlotKey, BackendValue,
    ConntrackEntry, ConntrackKey, DatapathConfig, FragKey, FragValue, NodeAddrValue, ServiceKey,
    ServicePortNameValue, ServiceValue, SockRevNatKey, SockRevNatValue, SourceRangeKey, UplinkAddr,
    LAYOUT_VERSION,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("pinned map {path}: {found}, but this agent's datapath (map layout {LAYOUT_VERSION}) declares {want}; it cannot adopt it without misreading it. Roll back to the agent that made it, or start over with `lb-agent --cleanup --bpffs {dir}` (open connections through this node are reset) and start this agent again")]
    Map {
        path: String,
        dir: String,
        found: String,
        want: String,
    },
    #[error("pinned maps in {dir} are of map layout {found}, this agent's is {LAYOUT_VERSION}; it cannot adopt them without misreading them. Roll back to the agent that made them, or start over with `lb-agent --cleanup --bpffs {dir}` (open connections through this node are reset) and start this agent again")]
    Version { dir: String, found: String },
}

/// The capacities of the maps an operator sizes (`--max-*` flags, chart
/// `agent.mapSizes`); the defaults are lb-common's `MAX_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// LB_SERVICES (one entry per frontend) and LB_SERVICE_NAMES.
    pub frontends: u32,
    pub backends: u32,
    pub backend_slots: u32,
    /// LB_CONNTRACK: two entries per flow.
    pub conntrack: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    /// LB_SOCK_REVNAT: host-network sockets translated by socket LB.
    pub host_sockets: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: lb_common::MAX_SERVICES,
            backends: lb_common::MAX_BACKENDS,
            backend_slots: lb_common::MAX_BACKEND_SLOTS,
            conntrack: lb_common::MAX_CONNTRACK,
            affinity: lb_common::MAX_AFFINITY,
            source_ranges: lb_common::MAX_SOURCE_RANGES,
            host_sockets: lb_common::MAX_SOCK_REVNAT,
        }
    }
}

impl MapSizes {
    /// The sized maps and their capacities (for the loader).
    pub fn by_map(&self) -> [(&'static str, u32); 8] {
        [
            (m::SERVICES, self.frontends),
            (m::SERVICE_NAMES, self.frontends),
            (m::BACKENDS, self.backends),
            (m::BACKEND_SLOTS, self.backend_slots),
            (m::CONNTRACK, self.conntrack),
            (m::AFFINITY, self.affinity),
            (m::SOURCE_RANGES, self.source_ranges),
            (m::SOCK_REVNAT, self.host_sockets),
        ]
    }

    /// Each size must be usable: at least 64 entries.
    pub fn validate(&self) -> Result<(), String> {
        for (map, n) in self.by_map() {
            if n < 64 {
                return Err(format!("{map}: {n} entries is too small (at least 64)"));
            }
        }
        Ok(())
    }

    /// What the planner may fill: each agent-written map less an eighth, so
    /// that a plan's puts, which come before its deletes (a frontend never
    /// sees a half-written set), still fit while old and new entries are
    /// both in the map. A map the planner finds full refuses the service
    /// port that does not fit (named in an Event) and changes nothing else,
    /// instead of failing writes and retrying forever.
    pub fn planner_limits(&self) -> lb_core::plan::Limits {
        let room = |n: u32| n - n / 8;
        lb_core::plan::Limits {
            max_services: room(self.frontends),
            max_backends: room(self.backends),
            max_backend_slots: room(self.backend_slots),
            max_source_ranges: room(self.source_ranges),
            ..lb_core::plan::Limits::default()
        }
    }
}

/// One map as this agent's datapath declares it.
struct Declared {
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    max_entries: u32,
}

/// What this agent's datapath declares, from the lb-common types (the same
/// ones lb-ebpf/src/maps.rs declares its maps with), at `sizes`.
fn declared(sizes: &MapSizes) -> [Declared; 14] {
    let d = |name, kind, key, value, max_entries| Declared {
        name,
        kind,
        key,
        value,
        max_entries,
    };
    // An LPM trie key is a u32 prefix length followed by the data.
    let lpm_key = 4 + size_of::<SourceRangeKey>();
    [
        d(
            m::SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            sizes.frontends,
        ),
        d(
            m::BACKEND_SLOTS,
            MapType::Hash,
            size_of::<BackendSlotKey>(),
            size_of::<BackendSlot>(),
            sizes.backend_slots,
        ),
        d(
            m::BACKENDS,
            MapType::Hash,
            4,
            size_of::<BackendValue>(),
            sizes.backends,
        ),
        d(
            m::CONNTRACK,
            MapType::LruHash,
            size_of::<ConntrackKey>(),
            size_of::<ConntrackEntry>(),
            sizes.conntrack,
        ),
        d(
            m::AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            sizes.affinity,
        ),
        d(
            m::NODE_ADDRS,
            MapType::Hash,
            4,
            size_of::<NodeAddrValue>(),
            lb_common::MAX_NODE_ADDRS,
        ),
        d(m::STATS, MapType::PerCpuArray, 4, 8, lb_common::STAT_COUNT),
        d(
            m::SERVICE_NAMES,
            MapType::Hash,
            4,
            size_of::<ServicePortNameValue>(),
            sizes.frontends,
        ),
        d(
            m::UPLINK_ADDRS,
            MapType::Hash,
            4,
            size_of::<UplinkAddr>(),
            lb_common::MAX_UPLINKS,
        ),
        d(
            m::SOURCE_RANGES,
            MapType::LpmTrie,
            lpm_key,
            1,
            sizes.source_ranges,
        ),
        d(
            m::SOCK_REVNAT,
            MapType::LruHash,
            size_of::<SockRevNatKey>(),
            size_of::<SockRevNatValue>(),
            sizes.host_sockets,
        ),
        d(m::LAYOUT, MapType::Array, 4, 4, 1),
        d(
            m::FRAGMENTS,
            MapType::LruHash,
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            lb_common::MAX_FRAGMENTS,
        ),
        d(
            m::SETTINGS,
            MapType::Array,
            4,
            size_of::<DatapathConfig>(),
            1,
        ),
    ]
}

fn describe(kind: MapType, key: usize, value: usize, max_entries: u32) -> String {
    format!("{kind:?} map, key {key} bytes, value {value} bytes, {max_entries} entries")
}

/// Checks the maps pinned in `dir` before they are adopted. Nothing pinned:
/// a fresh start, nothing to check.
pub fn check_pinned(dir: &Path, sizes: &MapSizes) -> Result<(), LayoutError> {
    let all = declared(sizes);
    let pinned: Vec<&Declared> = all.iter().filter(|d| dir.join(d.name).exists()).collect();
    if pinned.is_empty() {
        return Ok(());
    }
    let dir_s = dir.display().to_string();
    // The version first: the same sizes can mean different things.
    let layout = dir.join(m::LAYOUT);
    let found = match read_version(&layout) {
        Some(v) if v == LAYOUT_VERSION => None,
        Some(v) => Some(v.to_string()),
        None => Some("unknown (made before map layouts were versioned)".to_string()),
    };
    if let Some(found) = found {
        return Err(LayoutError::Version { dir: dir_s, found });
    }
    for d in pinned {
        let path = dir.join(d.name);
        let info = MapData::from_pin(&path).and_then(|m| m.info());
        let want = describe(d.kind, d.key, d.value, d.max_entries);
        let mismatch = match &info {
            Ok(i) => {
                let kind = i.map_type().ok();
                (kind != Some(d.kind)
                    || i.key_size() as usize != d.key
                    || i.value_size() as usize != d.value
                    || i.max_entries() != d.max_entries)
                    .then(|| {
                        describe(
                            kind.unwrap_or(MapType::Unspecified),
                            i.key_size() as usize,
                            i.value_size() as usize,
                            i.max_entries(),
                        )
                    })
            }
            Err(e) => Some(format!("unreadable ({e})")),
        };
        if let Some(found) = mismatch {
            return Err(LayoutError::Map {
                path: path.display().to_string(),
                dir: dir_s,
                found,
                want,
            });
        }
    }
    Ok(())
}

/// The version in a pinned `LB_LAYOUT`, if it is there and readable (0 is
/// never written: it means a map made but never stamped).
fn read_version(path: &Path) -> Option<u32> {
    let data = MapData::from_pin(path).ok()?;
    let map = Map::from_map_data(data).ok()?;
    let array: Array<MapData, u32> = Array::try_from(map).ok()?;
    array.get(&0, 0).ok().filter(|v| *v != 0)
}

/// Stamps this agent's layout version into the pinned `LB_LAYOUT`.
pub fn stamp(dir: &Path) -> Result<(), String> {
    let path = dir.join(m::LAYOUT);
    let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let map = Map::from_map_data(data).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut array: Array<MapData, u32> =
        Array::try_from(map).map_err(|e| format!("{}: {e}", path.display()))?;
    array
        .set(0, LAYOUT_VERSION, 0)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes the agent's configuration (the `LB_CONFIG` the object was loaded
/// with) into the pinned `LB_SETTINGS`, for lbctl and bpftool.
pub fn write_settings(dir: &Path, config: &DatapathConfig) -> Result<(), String> {
    let path = dir.join(m::SETTINGS);
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let data = MapData::from_pin(&path).map_err(|e| err(&e))?;
    let map = Map::from_map_data(data).map_err(|e| err(&e))?;
    let mut array: Array<MapData, DatapathConfig> = Array::try_from(map).map_err(|e| err(&e))?;
    array.set(0, *config, 0).map_err(|e| err(&e))
}

/// The configuration the agent that pinned the maps in `dir` runs with,
/// from `LB_SETTINGS`. `Ok(None)`: no such pin (an agent from before
/// `LB_SETTINGS`), or one never written (all zeros: an agent that has not
/// finished loading).
pub fn read_settings(dir: &Path) -> Result<Option<DatapathConfig>, String> {
    let path = dir.join(m::SETTINGS);
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let data = MapData::from_pin(&path).map_err(|e| err(&e))?;
    let map = Map::from_map_data(data).map_err(|e| err(&e))?;
    let array: Array<MapData, DatapathConfig> = Array::try_from(map).map_err(|e| err(&e))?;
    let config = array.get(&0, 0).map_err(|e| err(&e))?;
    let never_written = <DatapathConfig as bytemuck::Zeroable>::zeroed();
    Ok((config != never_written).then_some(config))
}
