//! Every map of the datapath, declared with `#[btf_map]` so that the object
//! carries key/value BTF and `bpftool map dump` prints field names.
//!
//! Names are the constants of `lb_common::map_names` (the static's name is the
//! map name); capacities are `lb_common::MAX_*` (userspace may lower them with
//! `EbpfLoader::set_max_entries`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityValue, BackendSlot, BackendSlotKey, BackendValue, ConntrackEntry,
    ConntrackKey, DatapathConfig, FragKey, FragValue, NodeAddrValue, ServiceKey,
    ServicePortNameValue, ServiceValue, SockRevNatKey, SockRevNatValue, SourceRangeKey, UplinkAddr,
    MAX_AFFINITY, MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_CONNTRACK, MAX_FRAGMENTS, MAX_NODE_ADDRS,
    MAX_SERVICES, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES, MAX_UPLINKS, STAT_COUNT,
};

/// Maps written only by the agent are allocated on demand: preallocating
/// several hundred thousand entries that a node rarely uses would pin tens of
/// megabytes of kernel memory. Conntrack, fragments, affinity and socket
/// entries are LRU maps, which are always preallocated (the datapath inserts
/// into them).
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// Frontends: (address, port, protocol, scope) -> service.
#[btf_map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

/// (service id, slot) -> backend id.
#[btf_map]
pub static LB_BACKEND_SLOTS: HashMap<
    BackendSlotKey,
    BackendSlot,
    { MAX_BACKEND_SLOTS as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Backend id -> endpoint.
#[btf_map]
pub static LB_BACKENDS: HashMap<u32, BackendValue, { MAX_BACKENDS as usize }, NO_PREALLOC> =
    HashMap::new();

/// Both directions of every translated flow (and of direct flows whose
/// source port was remapped, C2).
#[btf_map]
pub static LB_CONNTRACK: LruHashMap<ConntrackKey, ConntrackEntry, { MAX_CONNTRACK as usize }> =
    LruHashMap::new();

/// C4: fragmented datagrams in flight: what their first fragment became
/// (per hook direction), for the later fragments, which carry no ports.
#[btf_map]
pub static LB_FRAGMENTS: LruHashMap<FragKey, FragValue, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// Session affinity: (client address, service id) -> backend.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// This node's addresses (network order) for NodePort matching.
#[btf_map]
pub static LB_NODE_ADDRS: HashMap<u32, NodeAddrValue, { MAX_NODE_ADDRS as usize }> = HashMap::new();

/// Uplink ifindex -> its primary address: the SNAT source of flows to remote
/// backends whose route leaves by that uplink (M2), and of flows that arrived
/// on it whose frontend is not a node address (externalIPs, LoadBalancer IPs).
#[btf_map]
pub static LB_UPLINK_ADDRS: HashMap<u32, UplinkAddr, { MAX_UPLINKS as usize }> = HashMap::new();

/// F7: (service id, source prefix) of every LoadBalancer with
/// loadBalancerSourceRanges. LPM tries must not be preallocated.
#[btf_map]
pub static LB_SOURCE_RANGES: LpmTrie<
    SourceRangeKey,
    u8,
    { MAX_SOURCE_RANGES as usize },
    NO_PREALLOC,
> = LpmTrie::new();

/// F2: (socket cookie, backend) -> the frontend the socket asked for.
#[btf_map]
pub static LB_SOCK_REVNAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { MAX_SOCK_REVNAT as usize },
> = LruHashMap::new();

/// Per-CPU scratch room for a `bpf_fib_lookup` struct (64 bytes) where the
/// stack has none left: `nat::egress_uplink_addr` runs a call deeper than
/// the verifier's 512-byte combined stack allows for it. Not pinned (not a
/// `map_names` entry): nothing lives in it between two helper calls of
/// one program run, and a program run is not preempted on its CPU.
#[btf_map]
pub static LB_FIB_SCRATCH: PerCpuArray<[u64; 8], 1> = PerCpuArray::new();

/// Per-CPU counters indexed by `lb_common::StatReason`.
#[btf_map]
pub static LB_STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Service id -> human-readable name, for lbctl. Never read here, but it is
/// part of the object so that the loader creates (and pins) it with the rest:
/// see [`keep_unread_maps`].
#[btf_map]
pub static LB_SERVICE_NAMES: HashMap<
    u32,
    ServicePortNameValue,
    { MAX_SERVICES as usize },
    NO_PREALLOC,
> = HashMap::new();

/// The layout version of the maps (`lb_common::LAYOUT_VERSION`), written by
/// the agent after it loads the object: an agent that finds pinned maps of
/// another layout (or of another shape or size) refuses them, naming the map
/// (or the pin directory) and the command that starts over, instead of
/// misreading them. There is no migration.
#[btf_map]
pub static LB_LAYOUT: Array<u32, 1> = Array::new();

/// The agent's [`DatapathConfig`] (the `LB_CONFIG` it loaded the object
/// with), written by the agent after it loads the object, for lbctl (the
/// lifetimes of `lbctl conntrack`) and bpftool. Never read here: the
/// programs read `LB_CONFIG`, which the verifier sees as a constant.
#[btf_map]
pub static LB_SETTINGS: Array<DatapathConfig, 1> = Array::new();

/// Load-time configuration, overridden by userspace with
/// `EbpfLoader::override_global(lb_common::DATAPATH_CONFIG_GLOBAL, ..)`.
#[unsafe(no_mangle)]
static LB_CONFIG: DatapathConfig = DatapathConfig::DEFAULT;

/// `LB_CONFIG`, read in place. The address goes through a volatile read,
/// which keeps the compiler from folding the compiled-in default into the
/// code (the loader patches the value in `.rodata` before the program is
/// verified); the fields are then read where they are used, so the struct
/// (96 bytes) is never copied onto the stack.
#[inline(always)]
pub fn config() -> &'static DatapathConfig {
    let p: *const DatapathConfig = &LB_CONFIG;
    // SAFETY: reading a local pointer; it points to the valid, aligned,
    // immutable static LB_CONFIG.
    unsafe { &*core::ptr::read_volatile(&p) }
}

/// What `conntrack::claim_snat_port` keeps per CPU: the key it probes
/// with (the new-flow path that calls it has no stack left for one) and
/// where the next probe of this CPU starts.
#[repr(C)]
pub struct SnatScratch {
    pub key: ConntrackKey,
    /// The FORWARD key of a closed flow whose port is being reclaimed.
    pub old_forward: ConntrackKey,
    /// Offset in the SNAT port range of the next candidate, plus 1 (0:
    /// pick a random one first).
    pub cursor: u32,
    pub _pad: u32,
}

/// Per-CPU [`SnatScratch`]. Not pinned (not a `map_names` entry): a new
/// datapath starts with fresh cursors, which is fine.
#[btf_map]
pub static LB_SNAT_SCRATCH: PerCpuArray<SnatScratch, 1> = PerCpuArray::new();

/// Makes the programs reference the maps no program reads (yet), so that
/// the loader creates and pins them with the rest: the linker drops
/// unreferenced statics, and `#[used]` would put a map into a `.maps`
/// section of its own, which the loader does not accept. Costs a
/// map-address load per map per packet.
#[inline(always)]
pub fn keep_unread_maps() {
    core::hint::black_box(core::ptr::addr_of!(LB_SERVICE_NAMES));
    core::hint::black_box(core::ptr::addr_of!(LB_SOCK_REVNAT));
    core::hint::black_box(core::ptr::addr_of!(LB_LAYOUT));
    core::hint::black_box(core::ptr::addr_of!(LB_SETTINGS));
}
