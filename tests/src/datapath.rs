//! The eBPF object loaded into the kernel for BPF_PROG_TEST_RUN, without
//! attaching anything, and typed access to its maps: what the datapath tests
//! and `lb-bench` write into the maps (as the agent would) and read back.
//!
//! Load it from a thread in a private network namespace
//! ([`crate::netns::in_private_netns`]): programs that redirect do FIB
//! lookups in the namespace of the thread that runs them, and a test must
//! never see the machine's real routes.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader, Pod};
use lb_common::{
    backend_flags, ipv4_to_net, map_names, port_to_net, program_names, service_flags, AffinityKey,
    AffinityValue, BackendSlot, BackendSlotKey, BackendValue, ConntrackEntry, ConntrackKey,
    DatapathConfig, NodeAddrValue, ServiceKey, ServiceValue, SourceRangeKey, StatReason,
    UplinkAddr, DATAPATH_CONFIG_GLOBAL, LOCAL_SLOT_BASE, SCOPE_EXACT, SCOPE_NODEPORT, STAT_COUNT,
};

use crate::artifacts;

/// The verdicts of the TC programs, as BPF_PROG_TEST_RUN reports them
/// (`u32`). Every packet that continues, translated or not, gets
/// TC_ACT_UNSPEC (-1, TCX_NEXT under TCX): later programs and tc filters on
/// the interface still see it (SEMANTICS C5). lb never returns TC_ACT_OK.
pub const TC_ACT_UNSPEC: u32 = -1i32 as u32;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// What one BPF_PROG_TEST_RUN gave back.
#[derive(Debug)]
pub struct Run {
    /// The program's verdict (TC_ACT_*).
    pub ret: u32,
    /// The packet as the program left it.
    pub out: Vec<u8>,
    /// The kernel-measured run time.
    pub duration: Duration,
}

/// A backend of a [`ServiceEntry`]: its id in the backends map.
#[derive(Clone, Debug)]
pub struct BackendEntry {
    pub id: u32,
    pub addr: SocketAddrV4,
    /// `backend_flags::*`.
    pub flags: u8,
}

impl BackendEntry {
    pub fn new(id: u32, addr: SocketAddrV4) -> Self {
        BackendEntry { id, addr, flags: 0 }
    }

    /// A backend on this node (`backend_flags::LOCAL`).
    pub fn local(id: u32, addr: SocketAddrV4) -> Self {
        BackendEntry {
            flags: backend_flags::LOCAL,
            ..Self::new(id, addr)
        }
    }
}

/// One service port as the agent writes it: its frontends, its cluster-wide
/// backends (slots 0..) and its node-local ones (slots LOCAL_SLOT_BASE..).
#[derive(Clone, Debug)]
pub struct ServiceEntry {
    pub id: u32,
    pub proto: u8,
    /// The exact frontend (ClusterIP, externalIP, ...), if any.
    pub vip: Option<SocketAddrV4>,
    /// The NodePort frontend, if any.
    pub node_port: Option<u16>,
    /// spec.externalIPs frontends (written with `EXTERNAL_IP`).
    pub external_ips: Vec<SocketAddrV4>,
    /// status.loadBalancer.ingress frontends (written with `LOAD_BALANCER`).
    pub lb_ips: Vec<SocketAddrV4>,
    /// `service_flags::*`.
    pub flags: u16,
    pub affinity_timeout_sec: u32,
    pub cluster: Vec<BackendEntry>,
    pub local: Vec<BackendEntry>,
}

impl ServiceEntry {
    /// A ClusterIP service port at `vip` with cluster-wide `backends`.
    pub fn cluster_ip(id: u32, vip: SocketAddrV4, proto: u8, backends: Vec<BackendEntry>) -> Self {
        ServiceEntry {
            id,
            proto,
            vip: Some(vip),
            node_port: None,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            flags: service_flags::CLUSTER_IP,
            affinity_timeout_sec: 0,
            cluster: backends,
            local: Vec::new(),
        }
    }

    /// The value of its frontends in the services map.
    pub fn value(&self) -> ServiceValue {
        ServiceValue {
            service_id: self.id,
            backend_count: self.cluster.len() as u16,
            local_backend_count: self.local.len() as u16,
            flags: self.flags,
            _pad: 0,
            affinity_timeout_sec: self.affinity_timeout_sec,
        }
    }
}

/// The services-map key of an exact frontend.
pub fn exact_key(vip: SocketAddrV4, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: ipv4_to_net(vip.ip().octets()),
        port: port_to_net(vip.port()),
        proto,
        scope: SCOPE_EXACT,
    }
}

/// The services-map key of a NodePort frontend (any node address).
pub fn node_port_key(port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: 0,
        port: port_to_net(port),
        proto,
        scope: SCOPE_NODEPORT,
    }
}

/// The built eBPF object with its TC programs loaded (not attached).
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Every program, with the default configuration. Panics on failure.
    pub fn load() -> Self {
        Self::load_with(DatapathConfig::DEFAULT)
    }

    /// Every program, with `config` as the load-time globals. Panics on failure.
    pub fn load_with(config: DatapathConfig) -> Self {
        Self::load_programs(config, &program_names::ALL).expect("loading the eBPF object")
    }

    /// Only the TC programs named (the others are not verified, which
    /// saves time where they are not run).
    pub fn load_programs(config: DatapathConfig, programs: &[&str]) -> Result<Self> {
        let bytes = artifacts::ebpf_object_bytes();
        let mut ebpf = EbpfLoader::new()
            .override_global(DATAPATH_CONFIG_GLOBAL, &config, true)
            .load(&bytes)
            .context("load the eBPF object")?;
        for name in programs {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("load {name}"))?;
        }
        Ok(Self { ebpf })
    }

    // ---- running programs

    pub fn run(&self, prog: &str, frame: &[u8]) -> Run {
        self.run_ctx(prog, frame, None)
    }

    /// Runs with `__sk_buff.ifindex` set (the interface the packet is on).
    pub fn run_on(&self, prog: &str, frame: &[u8], ifindex: u32) -> Run {
        self.run_ctx(prog, frame, Some(ifindex))
    }

    fn run_ctx(&self, prog: &str, frame: &[u8], ifindex: Option<u32>) -> Run {
        self.try_run_on(prog, frame, ifindex)
            .unwrap_or_else(|e| panic!("test_run {prog} ({} bytes): {e:?}", frame.len()))
    }

    /// Like [`Self::run_on`] (`ifindex` optional), but a frame the kernel
    /// refuses to run (BPF_PROG_TEST_RUN wants at least an Ethernet
    /// header, and a whole IPv4 header after an IPv4 EtherType) is an
    /// error instead of a panic: the fuzzer makes such frames.
    pub fn try_run_on(
        &self,
        prog: &str,
        frame: &[u8],
        ifindex: Option<u32>,
    ) -> Result<Run, aya::programs::ProgramError> {
        let p: &SchedClassifier = self
            .ebpf
            .program(prog)
            .unwrap_or_else(|| panic!("no program {prog}"))
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff up to and including ifindex (offset 40); the
        // kernel zero-fills the rest and accepts only a few fields.
        let mut ctx = [0u8; 44];
        if let Some(i) = ifindex {
            ctx[40..44].copy_from_slice(&i.to_ne_bytes());
        }
        // One run: a repeated run would see its own rewritten packet.
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ifindex.map(|_| &ctx[..]),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Run {
            ret: r.return_value,
            out,
            duration: r.duration,
        })
    }

    // ---- typed maps

    fn hash_map<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("no map {name}"));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    pub fn services(&mut self) -> HashMap<&mut MapData, ServiceKey, ServiceValue> {
        self.hash_map(map_names::SERVICES)
    }

    pub fn slots(&mut self) -> HashMap<&mut MapData, BackendSlotKey, BackendSlot> {
        self.hash_map(map_names::BACKEND_SLOTS)
    }

    pub fn backends(&mut self) -> HashMap<&mut MapData, u32, BackendValue> {
        self.hash_map(map_names::BACKENDS)
    }

    pub fn conntrack(&mut self) -> HashMap<&mut MapData, ConntrackKey, ConntrackEntry> {
        self.hash_map(map_names::CONNTRACK)
    }

    pub fn affinity(&mut self) -> HashMap<&mut MapData, AffinityKey, AffinityValue> {
        self.hash_map(map_names::AFFINITY)
    }

    // ---- writes, as the agent makes them

    /// Makes `a` one of this node's addresses (NodePorts match on them).
    pub fn add_node_addr(&mut self, a: Ipv4Addr) {
        self.hash_map::<u32, NodeAddrValue>(map_names::NODE_ADDRS)
            .insert(ipv4_to_net(a.octets()), NodeAddrValue { flags: 0 }, 0)
            .unwrap();
    }

    /// The SNAT source address of the uplink `ifindex`.
    pub fn set_uplink_addr(&mut self, ifindex: u32, a: Ipv4Addr) {
        self.hash_map::<u32, UplinkAddr>(map_names::UPLINK_ADDRS)
            .insert(
                ifindex,
                UplinkAddr {
                    addr: ipv4_to_net(a.octets()),
                },
                0,
            )
            .unwrap();
    }

    /// Forgets the address of the uplink `ifindex`.
    pub fn remove_uplink_addr(&mut self, ifindex: u32) {
        self.hash_map::<u32, UplinkAddr>(map_names::UPLINK_ADDRS)
            .remove(&ifindex)
            .unwrap();
    }

    /// A backend that belongs to no service port (the agent never writes
    /// one; tests use it for dangling ids).
    pub fn add_backend(&mut self, id: u32, addr: SocketAddrV4, proto: u8, flags: u8) {
        self.put_backend(id, addr, proto, flags, 0);
    }

    /// A backend of service port `service_id`; `flags` carries its set
    /// membership (`backend_flags::IN_CLUSTER_SET`, `IN_LOCAL_SET`).
    pub fn put_backend(
        &mut self,
        id: u32,
        addr: SocketAddrV4,
        proto: u8,
        flags: u8,
        service_id: u32,
    ) {
        let value = BackendValue {
            addr: ipv4_to_net(addr.ip().octets()),
            port: port_to_net(addr.port()),
            proto,
            flags,
            service_id,
        };
        self.backends().insert(id, value, 0).unwrap();
    }

    pub fn remove_backend(&mut self, id: u32) {
        self.backends().remove(&id).unwrap();
    }

    pub fn set_slot(&mut self, service_id: u32, slot: u32, backend_id: u32) {
        self.slots()
            .insert(
                BackendSlotKey { service_id, slot },
                BackendSlot { backend_id },
                0,
            )
            .unwrap();
    }

    pub fn add_frontend(&mut self, key: ServiceKey, value: ServiceValue) {
        self.services().insert(key, value, 0).unwrap();
    }

    /// Writes a service port as the agent does: backends and slots first,
    /// then the frontends that publish them.
    pub fn add_service(&mut self, svc: &ServiceEntry) {
        // Set membership as the planner writes it: a backend in both sets
        // carries both bits.
        let member = |id: u32| {
            let mut f = 0;
            if svc.cluster.iter().any(|b| b.id == id) {
                f |= lb_common::backend_flags::IN_CLUSTER_SET;
            }
            if svc.local.iter().any(|b| b.id == id) {
                f |= lb_common::backend_flags::IN_LOCAL_SET;
            }
            f
        };
        for (i, b) in svc.cluster.iter().enumerate() {
            self.put_backend(b.id, b.addr, svc.proto, b.flags | member(b.id), svc.id);
            self.set_slot(svc.id, i as u32, b.id);
        }
        for (i, b) in svc.local.iter().enumerate() {
            self.put_backend(b.id, b.addr, svc.proto, b.flags | member(b.id), svc.id);
            self.set_slot(svc.id, LOCAL_SLOT_BASE + i as u32, b.id);
        }
        let value = svc.value();
        if let Some(vip) = svc.vip {
            self.add_frontend(exact_key(vip, svc.proto), value);
        }
        // The other kinds carry the port's flags with their own kind bit.
        let kind = |k: u16| ServiceValue {
            flags: (svc.flags & !service_flags::CLUSTER_IP) | k,
            ..value
        };
        if let Some(port) = svc.node_port {
            self.add_frontend(
                node_port_key(port, svc.proto),
                kind(service_flags::NODE_PORT),
            );
        }
        for a in &svc.external_ips {
            self.add_frontend(exact_key(*a, svc.proto), kind(service_flags::EXTERNAL_IP));
        }
        for a in &svc.lb_ips {
            self.add_frontend(exact_key(*a, svc.proto), kind(service_flags::LOAD_BALANCER));
        }
    }

    fn source_ranges(&mut self) -> LpmTrie<&mut MapData, SourceRangeKey, u8> {
        let map = self
            .ebpf
            .map_mut(map_names::SOURCE_RANGES)
            .expect("no source ranges map");
        LpmTrie::try_from(map).unwrap()
    }

    fn range_key(service_id: u32, net: Ipv4Addr, len: u32) -> LpmKey<SourceRangeKey> {
        LpmKey::new(
            SourceRangeKey::prefix_len(len),
            SourceRangeKey::new(service_id, ipv4_to_net(net.octets())),
        )
    }

    /// F7: allows sources in `net`/`len` on the LoadBalancer frontends of
    /// service port `service_id`, as the planner writes a range.
    pub fn add_source_range(&mut self, service_id: u32, net: Ipv4Addr, len: u32) {
        self.source_ranges()
            .insert(&Self::range_key(service_id, net, len), 1, 0)
            .unwrap();
    }

    pub fn remove_source_range(&mut self, service_id: u32, net: Ipv4Addr, len: u32) {
        self.source_ranges()
            .remove(&Self::range_key(service_id, net, len))
            .unwrap();
    }

    // ---- reads

    pub fn ct(&mut self, key: &ConntrackKey) -> Option<ConntrackEntry> {
        self.conntrack().get(key, 0).ok()
    }

    /// Every conntrack entry, sorted by key.
    pub fn ct_all(&mut self) -> Vec<(ConntrackKey, ConntrackEntry)> {
        let mut v: Vec<_> = self.conntrack().iter().map(|r| r.unwrap()).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    pub fn ct_insert(&mut self, key: ConntrackKey, e: ConntrackEntry) {
        self.conntrack().insert(key, e, 0).unwrap();
    }

    /// Counters summed over CPUs, indexed by StatReason.
    pub fn stats(&self) -> [u64; STAT_COUNT as usize] {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).unwrap()).unwrap();
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = m.get(&(i as u32), 0).unwrap().iter().sum();
        }
        out
    }

    /// One counter summed over CPUs.
    pub fn stat(&self, reason: StatReason) -> u64 {
        self.stats()[reason as usize]
    }

    /// Asserts that every program run ended on exactly one outcome counter
    /// (`StatReason::is_outcome`): their sum equals `packets`.
    #[track_caller]
    pub fn assert_outcomes_sum(&self) {
        let actual = self.stats();
        let outcomes: u64 = StatReason::ALL
            .iter()
            .filter(|r| r.is_outcome())
            .map(|r| actual[*r as usize])
            .sum();
        assert_eq!(
            outcomes,
            actual[StatReason::Packets as usize],
            "outcome counters do not add up to packets: {}",
            StatReason::ALL
                .iter()
                .filter(|r| actual[**r as usize] != 0)
                .map(|r| format!("{}={}", r.name(), actual[*r as usize]))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    /// Asserts every counter: those listed have the given value, all others
    /// 0; and that the outcomes add up ([`Self::assert_outcomes_sum`]).
    #[track_caller]
    pub fn assert_stats(&self, expected: &[(StatReason, u64)]) {
        let actual = self.stats();
        let mut want = [0u64; STAT_COUNT as usize];
        for (r, n) in expected {
            want[*r as usize] += n;
        }
        if actual != want {
            let show = |v: &[u64]| {
                StatReason::ALL
                    .iter()
                    .filter(|r| v[**r as usize] != 0)
                    .map(|r| format!("{}={}", r.name(), v[*r as usize]))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            panic!(
                "counters differ\n  actual:   {}\n  expected: {}",
                show(&actual),
                show(&want)
            );
        }
        self.assert_outcomes_sum();
    }
}
