//! Map keys and values shared by the kernel programs (lb-ebpf) and userspace
//! (lb-userspace, tests).
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on
//! the byte layout, bytemuck can prove there is no hidden padding, and bpftool
//! prints the fields by name from BTF.
//!
//! Byte order: addresses and ports are stored in **network byte order**, exactly
//! as they appear in the packet, so the datapath compares and copies them without
//! swapping. Use [`ipv4_to_net`], [`net_to_ipv4`], [`port_to_net`] and
//! [`net_to_port`] on the userspace side.
#![no_std]

use bytemuck::{Pod, Zeroable};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the pinned maps (also the names of the statics in lb-ebpf).
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKEND_SLOTS: &str = "LB_BACKEND_SLOTS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const NODE_ADDRS: &str = "LB_NODE_ADDRS";
    pub const STATS: &str = "LB_STATS";
    /// Userspace-only: service id -> the service port it belongs to
    /// (`ServicePortNameValue`): how a restarted agent knows its ids.
    pub const SERVICE_NAMES: &str = "LB_SERVICE_NAMES";
    /// Uplink ifindex -> its primary IPv4 address (SNAT source).
    pub const UPLINK_ADDRS: &str = "LB_UPLINK_ADDRS";
    /// F7: (service id, source prefix) -> allowed (LPM trie).
    pub const SOURCE_RANGES: &str = "LB_SOURCE_RANGES";
    /// F2: (socket cookie, backend address, port) -> the frontend the socket
    /// asked for (recvmsg/getpeername show it; the agent finds connected UDP
    /// sockets of a backend that went away).
    pub const SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
    /// The layout version of all the maps (one u32, `LAYOUT_VERSION`).
    pub const LAYOUT: &str = "LB_LAYOUT";
    /// C4: (hook direction, source, destination, protocol, IP id) of a
    /// fragmented datagram -> what its first fragment became (LRU).
    pub const FRAGMENTS: &str = "LB_FRAGMENTS";
    /// Userspace-only: the agent's `DatapathConfig` (one entry), the
    /// `LB_CONFIG` it loaded the object with: what lbctl shows lifetimes with.
    pub const SETTINGS: &str = "LB_SETTINGS";
    pub const ALL: [&str; 14] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        CONNTRACK,
        AFFINITY,
        NODE_ADDRS,
        STATS,
        SERVICE_NAMES,
        UPLINK_ADDRS,
        SOURCE_RANGES,
        SOCK_REVNAT,
        LAYOUT,
        FRAGMENTS,
        SETTINGS,
    ];
}

/// The version of the map layouts (key and value types, and what their
/// fields mean). Bump it with any change an older agent or datapath would
/// misread; the agent refuses pinned maps of another version (naming the map
/// and the command that starts over) instead of misreading them.
pub const LAYOUT_VERSION: u32 = 4;

/// Names of the kernel programs (the entry point function names in lb-ebpf).
pub mod program_names {
    /// TC ingress on a pod's host-side interface: packets sent by the pod.
    pub const POD_INGRESS: &str = "lb_pod_ingress";
    /// TC egress on a pod's host-side interface: packets delivered to the pod.
    pub const POD_EGRESS: &str = "lb_pod_egress";
    /// TC ingress on an uplink: packets from outside the node.
    pub const UPLINK_INGRESS: &str = "lb_uplink_ingress";
    /// TC egress on an uplink: packets leaving the node.
    pub const UPLINK_EGRESS: &str = "lb_uplink_egress";
    /// The TC programs (what BPF_PROG_TEST_RUN and the interface attach
    /// load); the cgroup programs are in [`SOCKET_LB`].
    pub const ALL: [&str; 4] = [POD_INGRESS, POD_EGRESS, UPLINK_INGRESS, UPLINK_EGRESS];

    /// F2, cgroup/connect4: a host-network socket's connect() to a frontend
    /// goes to a backend.
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    /// F2, cgroup/sendmsg4: an unconnected UDP sendto() to a frontend.
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    /// F2, cgroup/recvmsg4: recvfrom() shows the frontend as the source.
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    /// F2, cgroup/getpeername4: getpeername() shows the frontend.
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
    /// The cgroup sock_addr programs of socket-level load balancing (F2).
    pub const SOCKET_LB: [&str; 4] = [
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
    ];
}

/// Capacities of the maps. Userspace may lower them with `set_max_entries`
/// before load; the datapath never depends on them.
pub const MAX_SERVICES: u32 = 131_072;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_BACKEND_SLOTS: u32 = 524_288;
pub const MAX_CONNTRACK: u32 = 262_144;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_NODE_ADDRS: u32 = 256;
pub const MAX_UPLINKS: u32 = 64;
pub const MAX_SOURCE_RANGES: u32 = 65_536;
pub const MAX_SOCK_REVNAT: u32 = 262_144;
/// C4: datagrams being fragmented at one time (an entry is needed only
/// while a datagram's fragments pass, microseconds).
pub const MAX_FRAGMENTS: u32 = 8_192;

/// Most backends one service port may have in its cluster-wide set (and,
/// separately, in its node-local set). Bounded so slot indices stay small.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 65_535;

/// Slots of a service's node-local backend set start here; slots
/// `0..backend_count` hold the cluster-wide set.
pub const LOCAL_SLOT_BASE: u32 = 0x8000_0000;

/// Scope of a frontend.
pub const SCOPE_EXACT: u8 = 0;
/// NodePort frontends: `addr` is 0 and the frontend matches any destination
/// address that is in `LB_NODE_ADDRS`.
pub const SCOPE_NODEPORT: u8 = 1;

/// Frontend flags (`ServiceValue::flags`).
pub mod service_flags {
    /// ClusterIP frontend.
    pub const CLUSTER_IP: u16 = 1 << 0;
    /// NodePort frontend (wildcard address).
    pub const NODE_PORT: u16 = 1 << 1;
    /// spec.externalIPs frontend.
    pub const EXTERNAL_IP: u16 = 1 << 2;
    /// status.loadBalancer.ingress frontend.
    pub const LOAD_BALANCER: u16 = 1 << 3;
    /// sessionAffinity: ClientIP.
    pub const AFFINITY: u16 = 1 << 4;
    /// externalTrafficPolicy: Local (external frontends use the local set).
    pub const EXTERNAL_LOCAL: u16 = 1 << 5;
    /// internalTrafficPolicy: Local (ClusterIP uses the local set).
    pub const INTERNAL_LOCAL: u16 = 1 << 6;
    /// loadBalancerSourceRanges apply (F7): on LOAD_BALANCER frontends only
    /// sources in LB_SOURCE_RANGES under this service id get through.
    pub const SOURCE_RANGES: u16 = 1 << 7;
    /// With SOURCE_RANGES: one of the ranges holds a node address, so
    /// connections the node itself opens are allowed too (kube-proxy's
    /// `allowFromNode`).
    pub const SOURCE_RANGES_ALLOW_NODE: u16 = 1 << 8;
}

/// A frontend: where clients send packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Destination IPv4 address, network byte order; 0 for `SCOPE_NODEPORT`.
    pub addr: u32,
    /// Destination port, network byte order.
    pub port: u16,
    /// IP protocol number (`PROTO_TCP`, `PROTO_UDP`).
    pub proto: u8,
    /// `SCOPE_EXACT` or `SCOPE_NODEPORT`.
    pub scope: u8,
}

/// What a frontend translates to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Identifies the service port; shared by all frontends of one service port.
    pub service_id: u32,
    /// Backends in the cluster-wide set: slots `0..backend_count`.
    pub backend_count: u16,
    /// Backends in the node-local set: slots `LOCAL_SLOT_BASE + 0..local_backend_count`.
    pub local_backend_count: u16,
    /// `service_flags::*`.
    pub flags: u16,
    pub _pad: u16,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_timeout_sec: u32,
}

/// (service, slot) -> backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendSlot {
    pub backend_id: u32,
}

/// Backend flags (`BackendValue::flags`).
pub mod backend_flags {
    /// The endpoint runs on this node (nodeName == this node).
    pub const LOCAL: u8 = 1 << 0;
    /// The endpoint is terminating (used only as a fallback).
    pub const TERMINATING: u8 = 1 << 1;
    /// In the service port's cluster-wide set right now.
    pub const IN_CLUSTER_SET: u8 = 1 << 2;
    /// In the service port's node-local set right now.
    pub const IN_LOCAL_SET: u8 = 1 << 3;
}

/// An endpoint of one service port, keyed by a backend id the agent
/// allocates per (service port, endpoint).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendValue {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `backend_flags::*`.
    pub flags: u8,
    /// The service port this backend belongs to: ids are reused, and a
    /// conntrack or affinity entry that names a backend id is only good
    /// while the id still belongs to the same service port (C6, E4).
    pub service_id: u32,
}

impl BackendValue {
    /// Whether this backend is, right now, a usable endpoint of service
    /// port `service_id` in the cluster-wide (`local == false`) or the
    /// node-local set.
    #[inline(always)]
    pub fn serves(&self, service_id: u32, local: bool) -> bool {
        let set = if local {
            backend_flags::IN_LOCAL_SET
        } else {
            backend_flags::IN_CLUSTER_SET
        };
        self.service_id == service_id && self.flags & set != 0
    }

    /// Whether this backend is still an endpoint of `service_id` (in either
    /// set).
    #[inline(always)]
    pub fn member_of(&self, service_id: u32) -> bool {
        self.service_id == service_id
            && self.flags & (backend_flags::IN_CLUSTER_SET | backend_flags::IN_LOCAL_SET) != 0
    }
}

/// Conntrack direction (`ConntrackKey::dir`).
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Conntrack flags (`ConntrackEntry::flags`).
pub mod ct_flags {
    /// The flow's source is rewritten too: forward packets get source
    /// `snat_addr:snat_port`; replies get destination `snat_addr:snat_port`
    /// (the original client). Without `PORT_REMAP`, the flow is SNAT'ed to a
    /// node address (M1, M2, a remote backend) or the hairpin address (M4),
    /// and the datapath forwards both directions itself (FIB redirect, or a
    /// hairpin reflection): its replies are caught at ingress. With
    /// `PORT_REMAP`, only the client's port changes (C2).
    pub const SNAT: u16 = 1 << 0;
    /// A packet was seen in the reply direction.
    pub const SEEN_REPLY: u16 = 1 << 1;
    pub const TCP_SYN: u16 = 1 << 2;
    pub const TCP_FIN: u16 = 1 << 3;
    pub const TCP_RST: u16 = 1 << 4;
    /// The TCP handshake completed (ACK after SYN seen both ways).
    pub const TCP_ESTABLISHED: u16 = 1 << 5;
    /// With `SNAT`: only the source **port** is remapped (C2: the flow's
    /// reply tuple clashed with another flow's). `snat_addr` is the
    /// client's own address, so the packet goes up the stack (no redirect)
    /// and the reply is restored where plain DNAT replies are, at the
    /// client's egress (source back to the frontend, destination port back
    /// to the client's). `ConntrackKey::peer` pairs it like any SNAT entry.
    pub const PORT_REMAP: u16 = 1 << 6;
    /// TCP: a FIN passed in the forward direction (client -> backend).
    /// `TCP_FIN` is set with it (and means: a FIN in either direction).
    pub const FIN_FORWARD: u16 = 1 << 7;
    /// TCP: a FIN passed in the reply direction (backend -> client).
    pub const FIN_REPLY: u16 = 1 << 8;
    /// UDP: a stream (netfilter's ASSURED UDP flow): a packet passed after
    /// a reply had been seen and at least `UDP_STREAM_AFTER_S` seconds
    /// after the flow was created. Its lifetime is `ct_udp_stream_ns`.
    pub const UDP_STREAM: u16 = 1 << 9;
}

/// UDP: a flow that has seen a reply becomes a stream (`ct_flags::UDP_STREAM`)
/// with the first packet at least this many seconds after its creation,
/// as netfilter extends a UDP flow to `nf_conntrack_udp_timeout_stream`
/// only after 2 s: a DNS query and its answer stay short-lived.
pub const UDP_STREAM_AFTER_S: u16 = 2;

/// The state of a flow, from its `ct_flags` (the union of both entries'),
/// named after netfilter's conntrack states; each has its own idle
/// lifetime in [`DatapathConfig`] (`DatapathConfig::ct_lifetime_ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtState {
    /// TCP: opened, no reply yet (netfilter SYN_SENT).
    TcpSynSent,
    /// TCP: the other side answered, the handshake's last ACK has not
    /// passed yet (SYN_RECV).
    TcpSynRecv,
    /// TCP: the handshake completed (ESTABLISHED).
    TcpEstablished,
    /// TCP: a FIN before the handshake completed (FIN_WAIT).
    TcpFinWait,
    /// TCP: an established flow closed in one direction, the other may
    /// still send (CLOSE_WAIT; netfilter passes FIN_WAIT only until the
    /// FIN is acknowledged, one round trip).
    TcpCloseWait,
    /// TCP: FIN seen in both directions (TIME_WAIT; netfilter's LAST_ACK,
    /// both FINs but the last ACK not yet seen, 30 s, is folded in here).
    TcpTimeWait,
    /// TCP: reset (CLOSE).
    TcpClose,
    /// UDP: no stream (yet): no reply, or not `UDP_STREAM_AFTER_S` old.
    Udp,
    /// UDP: a stream (netfilter's ASSURED UDP flow).
    UdpStream,
}

impl CtState {
    /// The state of a flow of protocol `proto` with state bits `flags`.
    ///
    /// TCP, first match: RST -> close; FIN both ways -> time_wait; FIN one
    /// way (or `TCP_FIN` without a direction) -> close_wait when the
    /// handshake completed, else fin_wait; established; a reply seen ->
    /// syn_recv; otherwise syn_sent (also a flow picked up mid-stream,
    /// which becomes established once both directions passed).
    #[inline(always)]
    pub const fn of(proto: u8, flags: u16) -> CtState {
        if proto == PROTO_UDP {
            return if flags & ct_flags::UDP_STREAM != 0 {
                CtState::UdpStream
            } else {
                CtState::Udp
            };
        }
        let fin_both = ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY;
        if flags & ct_flags::TCP_RST != 0 {
            CtState::TcpClose
        } else if flags & fin_both == fin_both {
            CtState::TcpTimeWait
        } else if flags & (ct_flags::TCP_FIN | fin_both) != 0 {
            if flags & ct_flags::TCP_ESTABLISHED != 0 {
                CtState::TcpCloseWait
            } else {
                CtState::TcpFinWait
            }
        } else if flags & ct_flags::TCP_ESTABLISHED != 0 {
            CtState::TcpEstablished
        } else if flags & ct_flags::SEEN_REPLY != 0 {
            CtState::TcpSynRecv
        } else {
            CtState::TcpSynSent
        }
    }

    /// netfilter's name of the state (lbctl's STATE column).
    pub const fn name(self) -> &'static str {
        match self {
            CtState::TcpSynSent => "SYN_SENT",
            CtState::TcpSynRecv => "SYN_RECV",
            CtState::TcpEstablished => "ESTABLISHED",
            CtState::TcpFinWait => "FIN_WAIT",
            CtState::TcpCloseWait => "CLOSE_WAIT",
            CtState::TcpTimeWait => "TIME_WAIT",
            CtState::TcpClose => "CLOSE",
            CtState::Udp => "UNREPLIED",
            CtState::UdpStream => "STREAM",
        }
    }
}

/// One direction of a translated flow, as the packet looks when the datapath
/// sees it (before translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ConntrackKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_FORWARD` or `CT_DIR_REPLY`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// The translation of one direction of a flow.
///
/// Forward (client -> frontend): destination becomes `nat_addr:nat_port`
/// (the backend); with `ct_flags::SNAT` the source becomes `snat_addr:snat_port`.
/// Reply (backend -> client): source becomes `nat_addr:nat_port` (the
/// frontend); with `ct_flags::SNAT` the destination becomes
/// `snat_addr:snat_port` (the original client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConntrackEntry {
    pub nat_addr: u32,
    pub snat_addr: u32,
    pub nat_port: u16,
    pub snat_port: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// `ct_flags::*`.
    pub flags: u16,
    /// When the flow was created: CLOCK_BOOTTIME seconds, modulo 2^16
    /// (wraps every 18 h; only compared with the present for
    /// `UDP_STREAM_AFTER_S`, see [`udp_stream_due`]).
    pub created_s: u16,
    /// bpf_ktime_get_boot_ns() of the last packet.
    pub last_seen_ns: u64,
}

/// `ConntrackEntry::created_s` for the CLOCK_BOOTTIME time `now_ns`.
#[inline(always)]
pub const fn created_s(now_ns: u64) -> u16 {
    (now_ns / 1_000_000_000) as u16
}

/// UDP: whether a flow created at `created_s` that has seen a reply
/// becomes a stream with a packet at `now_ns` (it is at least
/// `UDP_STREAM_AFTER_S` seconds old; modulo 2^16 s, so a packet in a 2 s
/// window every 18 h only promotes it one packet later).
#[inline(always)]
pub const fn udp_stream_due(created: u16, now_ns: u64) -> bool {
    created_s(now_ns).wrapping_sub(created) >= UDP_STREAM_AFTER_S
}

/// Session affinity: (client address, service port) -> backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    pub client_addr: u32,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// A node address for NodePort matching; keyed by the address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NodeAddrValue {
    pub flags: u32,
}

/// An uplink's primary IPv4 address, network byte order, keyed by the
/// uplink's ifindex: the SNAT source of a flow to a remote backend whose
/// route leaves by this uplink (M2); and of a flow that arrived on it when
/// the client did not address the node itself (externalIPs and LoadBalancer
/// IPs the node does not own), to a local backend or to a remote one whose
/// egress interface has no address here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct UplinkAddr {
    pub addr: u32,
}

/// F7: the data part of an LB_SOURCE_RANGES key (an LPM trie key is this
/// with a prefix length in front): the service id, matched whole, then the
/// source address, matched to the range's prefix. Prefix length = 32 +
/// the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// Big-endian, so that the trie's bit order matches the whole id first.
    pub service_id: u32,
    /// Network byte order (address bits in the trie's bit order).
    pub addr: u32,
}

impl SourceRangeKey {
    pub const SERVICE_ID_BITS: u32 = 32;

    /// The key data for service id `service_id` and source `addr` (network
    /// order).
    #[inline(always)]
    pub const fn new(service_id: u32, addr: u32) -> Self {
        Self {
            service_id: service_id.to_be(),
            addr,
        }
    }

    /// The service id (host order).
    pub const fn service_id(&self) -> u32 {
        u32::from_be(self.service_id)
    }

    /// The trie prefix length of a range of `cidr_len` bits; a lookup uses
    /// the full length, `prefix_len(32)`.
    #[inline(always)]
    pub const fn prefix_len(cidr_len: u32) -> u32 {
        Self::SERVICE_ID_BITS + cidr_len
    }
}

/// F2: a translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockRevNatKey {
    /// bpf_get_socket_cookie() of the socket.
    pub cookie: u64,
    /// The backend, network order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// F2: what the socket asked for (the frontend), shown back by recvmsg and
/// getpeername.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatValue {
    /// The frontend, network order.
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub service_id: u32,
    pub backend_id: u32,
}

/// C4: which hooks an `LB_FRAGMENTS` entry belongs to (`FragKey::dir`).
/// A datagram crosses at most one ingress and one egress hook of a node,
/// and each must only ever apply what it did to the first fragment itself.
pub const FRAG_DIR_INGRESS: u8 = 0;
pub const FRAG_DIR_EGRESS: u8 = 1;

/// C4: how long an `LB_FRAGMENTS` entry is good for: the kernel's default
/// reassembly timeout (net.ipv4.ipfrag_time, 30 s). An older entry is
/// ignored, so a datagram that reuses an IP id never inherits it.
pub const FRAG_LIFETIME_NS: u64 = 30 * 1_000_000_000;

/// C4: what later fragments of a datagram get (`FragValue::action`): the
/// same as its first fragment.
pub mod frag_action {
    /// Passed to the stack (translated or not).
    pub const PASS: u8 = 0;
    /// Forwarded by the datapath itself (FIB lookup + redirect: SNAT'ed).
    pub const FIB: u8 = 1;
    /// Sent back out of the interface it came in on (M4 hairpin).
    pub const REFLECT: u8 = 2;
    /// Dropped, or answered (a reject, an ICMP error): the datagram is gone.
    pub const DROP: u8 = 3;
}

/// C4: a fragmented datagram as a hook saw its first fragment, before any
/// translation. Addresses and the IP id in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    /// `FRAG_DIR_INGRESS` or `FRAG_DIR_EGRESS`.
    pub dir: u8,
}

/// C4: what the first fragment became; later fragments (which carry no L4
/// header, hence no ports) get the same addresses and the same fate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragValue {
    /// The first fragment's addresses after translation, network order.
    pub saddr: u32,
    pub daddr: u32,
    /// `frag_action::*`.
    pub action: u8,
    pub _pad: [u8; 7],
    /// bpf_ktime_get_boot_ns() when the first fragment passed.
    pub created_ns: u64,
}

/// Longest namespace and Service name Kubernetes allows (RFC 1035 labels).
pub const MAX_NAME_LEN: usize = 63;
/// Longest Service port name Kubernetes allows (an IANA service name).
pub const MAX_PORT_NAME_LEN: usize = 15;

/// The identity of a service port (kube-proxy's ServicePortName:
/// namespace, Service name, port name, protocol), stored field by field so
/// that it reads back exactly: the agent re-learns which service id belongs
/// to which service port from this map after a restart. Never read by the
/// datapath; lbctl prints it. Lengths are bytes of UTF-8; the unused tail of
/// each field is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServicePortNameValue {
    /// IP protocol number (`PROTO_TCP`, `PROTO_UDP`).
    pub protocol: u8,
    pub namespace_len: u8,
    pub name_len: u8,
    pub port_name_len: u8,
    pub namespace: [u8; MAX_NAME_LEN + 1],
    pub name: [u8; MAX_NAME_LEN + 1],
    pub port_name: [u8; MAX_PORT_NAME_LEN + 1],
}

impl Default for ServicePortNameValue {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

impl ServicePortNameValue {
    /// `None` when a part is longer than Kubernetes allows.
    pub fn new(namespace: &str, name: &str, port_name: &str, protocol: u8) -> Option<Self> {
        fn put<const N: usize>(s: &str, max: usize) -> Option<([u8; N], u8)> {
            if s.len() > max || max >= N {
                return None;
            }
            let mut out = [0u8; N];
            out[..s.len()].copy_from_slice(s.as_bytes());
            Some((out, s.len() as u8))
        }
        let (namespace, namespace_len) = put(namespace, MAX_NAME_LEN)?;
        let (name, name_len) = put(name, MAX_NAME_LEN)?;
        let (port_name, port_name_len) = put(port_name, MAX_PORT_NAME_LEN)?;
        Some(Self {
            protocol,
            namespace_len,
            name_len,
            port_name_len,
            namespace,
            name,
            port_name,
        })
    }

    /// (namespace, name, port name); `None` if a field does not decode.
    pub fn parts(&self) -> Option<(&str, &str, &str)> {
        fn get(bytes: &[u8], len: u8) -> Option<&str> {
            core::str::from_utf8(bytes.get(..usize::from(len))?).ok()
        }
        Some((
            get(&self.namespace, self.namespace_len)?,
            get(&self.name, self.name_len)?,
            get(&self.port_name, self.port_name_len)?,
        ))
    }
}

/// Globals fixed at load time (`EbpfLoader::override_global("LB_CONFIG", ..)`).
///
/// Idle lifetimes of conntrack flows, per protocol and state
/// ([`CtState`]), in nanoseconds. The defaults are what a node running
/// kube-proxy has: kube-proxy sets `nf_conntrack_tcp_timeout_established`
/// (24 h) and `..._close_wait` (1 h); the others are the kernel's defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// TCP opened, not answered yet (`--conntrack-tcp-timeout-syn-sent`).
    pub ct_tcp_syn_sent_ns: u64,
    /// TCP answered, handshake not complete (`...-syn-recv`).
    pub ct_tcp_syn_recv_ns: u64,
    /// TCP established (`--conntrack-tcp-timeout-established`).
    pub ct_tcp_established_ns: u64,
    /// TCP FIN before the handshake completed (`...-fin-wait`).
    pub ct_tcp_fin_wait_ns: u64,
    /// TCP established, closed one way (`--conntrack-tcp-timeout-close-wait`).
    pub ct_tcp_close_wait_ns: u64,
    /// TCP closed both ways (`...-time-wait`).
    pub ct_tcp_time_wait_ns: u64,
    /// TCP reset (`...-close`).
    pub ct_tcp_close_ns: u64,
    /// UDP without a stream (`--conntrack-udp-timeout`).
    pub ct_udp_ns: u64,
    /// UDP stream (`--conntrack-udp-timeout-stream`).
    pub ct_udp_stream_ns: u64,
    /// Source ports of SNAT'ed flows (M1, M2, remote backends, M4) and the
    /// remapped client ports of C2, host order (`--snat-port-range`). Below
    /// the NodePort range (30000-32767) and the kernel's default ephemeral
    /// range (32768-60999), so they collide with neither NodePorts nor the
    /// node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// M1: traffic to a ClusterIP from outside this IPv4 CIDR (network order
    /// address and mask) is SNAT'ed to the node. Mask 0: not configured
    /// (kube-proxy without --cluster-cidr does not masquerade it either).
    pub cluster_cidr_addr: u32,
    pub cluster_cidr_mask: u32,
    /// M4: the source address a pod sees when it reaches itself through its
    /// Service (network order). Routed by the pod to its gateway, so the
    /// answer comes back through the pod's own interface.
    pub hairpin_addr: u32,
    /// F2: the network namespace (bpf_get_netns_cookie) whose sockets the
    /// cgroup hooks translate: the node's own. 0: none.
    pub netns_cookie: u64,
}

pub const DATAPATH_CONFIG_GLOBAL: &str = "LB_CONFIG";

/// 169.254.42.1 (network order), Cilium's default service loopback
/// address: a link-local address no node or pod owns.
pub const DEFAULT_HAIRPIN_ADDR: u32 = ipv4_to_net([169, 254, 42, 1]);

const S: u64 = 1_000_000_000;

impl DatapathConfig {
    pub const DEFAULT: Self = Self {
        ct_tcp_syn_sent_ns: 120 * S,
        ct_tcp_syn_recv_ns: 60 * S,
        ct_tcp_established_ns: 86_400 * S,
        ct_tcp_fin_wait_ns: 120 * S,
        ct_tcp_close_wait_ns: 3_600 * S,
        ct_tcp_time_wait_ns: 120 * S,
        ct_tcp_close_ns: 10 * S,
        ct_udp_ns: 30 * S,
        ct_udp_stream_ns: 120 * S,
        snat_port_min: DEFAULT_SNAT_PORT_MIN,
        snat_port_max: DEFAULT_SNAT_PORT_MAX,
        cluster_cidr_addr: 0,
        cluster_cidr_mask: 0,
        hairpin_addr: DEFAULT_HAIRPIN_ADDR,
        netns_cookie: 0,
    };
}

/// The default SNAT port range (`--snat-port-range`): 20,000 ports below
/// the NodePort range (30000-32767) and the kernel's default ephemeral
/// range (32768-60999), above the ports of overlay tunnels (VXLAN 4789 and
/// 8472, Geneve 6081) and most well-known services, whose packets would
/// otherwise each pay the SNAT reply lookup.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 10_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 29_999;

impl DatapathConfig {
    /// This configuration with every opening and closing TCP state (all
    /// but established) idle for `ns` (lb-agent's
    /// `--conntrack-tcp-transient-timeout` shorthand).
    pub const fn with_tcp_transient_ns(self, ns: u64) -> Self {
        Self {
            ct_tcp_syn_sent_ns: ns,
            ct_tcp_syn_recv_ns: ns,
            ct_tcp_fin_wait_ns: ns,
            ct_tcp_close_wait_ns: ns,
            ct_tcp_time_wait_ns: ns,
            ct_tcp_close_ns: ns,
            ..self
        }
    }

    /// The idle lifetime of a flow in state `state`.
    #[inline(always)]
    pub const fn state_lifetime_ns(&self, state: CtState) -> u64 {
        match state {
            CtState::TcpSynSent => self.ct_tcp_syn_sent_ns,
            CtState::TcpSynRecv => self.ct_tcp_syn_recv_ns,
            CtState::TcpEstablished => self.ct_tcp_established_ns,
            CtState::TcpFinWait => self.ct_tcp_fin_wait_ns,
            CtState::TcpCloseWait => self.ct_tcp_close_wait_ns,
            CtState::TcpTimeWait => self.ct_tcp_time_wait_ns,
            CtState::TcpClose => self.ct_tcp_close_ns,
            CtState::Udp => self.ct_udp_ns,
            CtState::UdpStream => self.ct_udp_stream_ns,
        }
    }

    /// The shortest lifetime of any state: an entry idle for less than
    /// this belongs to a live flow whatever its state.
    pub const fn min_lifetime_ns(&self) -> u64 {
        let l = [
            self.ct_tcp_syn_sent_ns,
            self.ct_tcp_syn_recv_ns,
            self.ct_tcp_established_ns,
            self.ct_tcp_fin_wait_ns,
            self.ct_tcp_close_wait_ns,
            self.ct_tcp_time_wait_ns,
            self.ct_tcp_close_ns,
            self.ct_udp_ns,
            self.ct_udp_stream_ns,
        ];
        let mut min = u64::MAX;
        let mut i = 0;
        while i < l.len() {
            if l[i] < min {
                min = l[i];
            }
            i += 1;
        }
        min
    }
}

impl DatapathConfig {
    /// M1: `addr` (network order) lies outside the configured cluster CIDR.
    #[inline(always)]
    pub fn outside_cluster_cidr(&self, addr: u32) -> bool {
        self.cluster_cidr_mask != 0
            && addr & self.cluster_cidr_mask != self.cluster_cidr_addr & self.cluster_cidr_mask
    }

    /// Idle lifetime of a flow of protocol `proto` with state `flags`
    /// (`ct_flags`), as [`DatapathConfig::flow_expired`] applies it to both
    /// entries of a flow: the datapath then treats the flow as new, the
    /// agent's garbage collector deletes it. One definition for both sides.
    /// The state is [`CtState::of`]; each state has its own lifetime.
    #[inline(always)]
    pub fn ct_lifetime_ns(&self, proto: u8, flags: u16) -> u64 {
        self.state_lifetime_ns(CtState::of(proto, flags))
    }
}

impl ConntrackKey {
    /// The key of the other direction of the flow this entry translates.
    ///
    /// FORWARD (client, frontend) with entry {nat: backend, snat: node:port if
    /// SNAT} pairs with REPLY (backend, client) or, SNAT'ed, (backend,
    /// node:port). REPLY (backend, x) with entry {nat: frontend, snat: client
    /// if SNAT} pairs with FORWARD (client, frontend).
    #[inline(always)]
    pub fn peer(&self, entry: &ConntrackEntry) -> ConntrackKey {
        let snat = entry.flags & ct_flags::SNAT != 0;
        if self.dir == CT_DIR_FORWARD {
            let (daddr, dport) = if snat {
                (entry.snat_addr, entry.snat_port)
            } else {
                (self.saddr, self.sport)
            };
            ConntrackKey {
                saddr: entry.nat_addr,
                daddr,
                sport: entry.nat_port,
                dport,
                proto: self.proto,
                dir: CT_DIR_REPLY,
                _pad: [0; 2],
            }
        } else {
            let (saddr, sport) = if snat {
                (entry.snat_addr, entry.snat_port)
            } else {
                (self.daddr, self.dport)
            };
            ConntrackKey {
                saddr,
                daddr: entry.nat_addr,
                sport,
                dport: entry.nat_port,
                proto: self.proto,
                dir: CT_DIR_FORWARD,
                _pad: [0; 2],
            }
        }
    }
}

impl ConntrackKey {
    /// The entry of the other direction (under `self.peer(entry)`), rebuilt
    /// from this one: what the datapath writes when it finds one direction
    /// of a flow without the other (C1: LRU eviction, a GC race), and what
    /// the new-flow path writes for the REPLY direction.
    ///
    /// FORWARD (client -> frontend) {nat: backend, snat: s} gives REPLY
    /// {nat: frontend, snat: client if SNAT}; REPLY (backend -> x) {nat:
    /// frontend, snat: client} gives FORWARD {nat: backend, snat: x if SNAT}.
    /// Ids, flags and `last_seen_ns` are carried over.
    #[inline(always)]
    pub fn peer_entry(&self, entry: &ConntrackEntry) -> ConntrackEntry {
        let snat = entry.flags & ct_flags::SNAT != 0;
        let (nat_addr, nat_port, snat_addr, snat_port) = if self.dir == CT_DIR_FORWARD {
            (self.daddr, self.dport, self.saddr, self.sport)
        } else {
            (self.saddr, self.sport, self.daddr, self.dport)
        };
        ConntrackEntry {
            nat_addr,
            nat_port,
            snat_addr: if snat { snat_addr } else { 0 },
            snat_port: if snat { snat_port } else { 0 },
            ..*entry
        }
    }
}

impl DatapathConfig {
    /// C1: whether a flow is idle past its lifetime, judged on both of its
    /// entries: the later `last_seen_ns` of the two and the union of their
    /// state bits (`peer` is `None` when the other direction is missing).
    /// One definition for the datapath and the agent's GC.
    #[inline(always)]
    pub fn flow_expired(
        &self,
        proto: u8,
        entry: &ConntrackEntry,
        peer: Option<&ConntrackEntry>,
        now_ns: u64,
    ) -> bool {
        let (last, flags) = flow_last_and_flags(entry, peer);
        now_ns.saturating_sub(last) > self.ct_lifetime_ns(proto, flags)
    }

    /// The state of the flow of `entry` and `peer` (as
    /// [`Self::flow_expired`] judges it) and the nanoseconds it may still
    /// stay idle before it expires (0: expired).
    pub fn flow_state_remaining(
        &self,
        proto: u8,
        entry: &ConntrackEntry,
        peer: Option<&ConntrackEntry>,
        now_ns: u64,
    ) -> (CtState, u64) {
        let (last, flags) = flow_last_and_flags(entry, peer);
        let state = CtState::of(proto, flags);
        let idle = now_ns.saturating_sub(last);
        (state, self.state_lifetime_ns(state).saturating_sub(idle))
    }
}

/// The later `last_seen_ns` of a flow's entries and the union of their
/// state bits.
#[inline(always)]
fn flow_last_and_flags(entry: &ConntrackEntry, peer: Option<&ConntrackEntry>) -> (u64, u16) {
    match peer {
        Some(p) => (
            if p.last_seen_ns > entry.last_seen_ns {
                p.last_seen_ns
            } else {
                entry.last_seen_ns
            },
            entry.flags | p.flags,
        ),
        None => (entry.last_seen_ns, entry.flags),
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Per-CPU counters, indexed by reason (`LB_STATS`, a PerCpuArray of u64).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatReason {
    /// Every packet a program saw.
    Packets = 0,
    /// Not service traffic and not a reply: passed unchanged.
    PassNotService = 1,
    /// New flow translated to a backend.
    NewFlow = 2,
    /// Packet of a known flow translated in the forward direction.
    ForwardTranslated = 3,
    /// Reply translated back to the frontend address.
    ReplyTranslated = 4,
    /// Passed unchanged: not IPv4 (ARP, IPv6, ...).
    PassNotIpv4 = 5,
    /// Passed unchanged: neither TCP nor UDP (ICMP included, unless it is
    /// an error about a translated flow, C3).
    PassOtherProto = 6,
    /// Passed unchanged: a later fragment (no L4 header) of a datagram
    /// whose first fragment passed unchanged (C4).
    PassFragment = 7,
    /// Passed unchanged: IPv4 header with options.
    PassIpOptions = 8,
    /// Passed unchanged: header shorter than it claims.
    PassTruncated = 9,
    /// Dropped: the node-local set this flow must use is empty while the
    /// port has endpoints elsewhere (E2); or an E1 packet that must not be
    /// answered (a TCP reset, a sender that is not unicast).
    DropNoBackend = 10,
    /// Dropped: a slot pointed at a missing backend (agent mid-update).
    DropBackendMissing = 11,
    /// Dropped: a conntrack insert failed (other than on a taken key).
    /// LB_CONNTRACK is an LRU map: a full map evicts its least recently
    /// used entries instead, so this is rare (the LRU found nothing to
    /// evict, all free entries sitting in other CPUs' local lists).
    DropConntrackFull = 12,
    /// Dropped: rewriting the packet failed.
    DropRewriteFailed = 13,
    /// Dropped: no free port in the SNAT range (a SNAT port, or a
    /// remapped client port, C2) within the probes
    /// (`lb-ebpf` `conntrack::SNAT_PROBES`).
    DropSnatExhausted = 14,
    /// Dropped: a packet the datapath forwards itself found no usable route;
    /// or it cannot be forwarded (TTL <= 1, too big for the route) and must
    /// not be answered with an ICMP error: an ICMP error, a later fragment,
    /// a hairpin packet, a sender that cannot be answered (C3).
    DropFibFailed = 15,
    /// Sent out with bpf_redirect / bpf_redirect_neigh: packets of SNAT'ed
    /// flows in both directions (FIB redirect), hairpins (M4), and the ICMP
    /// errors (C3) and later fragments (C4) of such flows. E1 answers count
    /// `RejectNoEndpoint`, the ICMP answers of C3 their own counters.
    Redirected = 16,
    /// A known flow whose two entries were both idle past its lifetime
    /// (C1); the packet was treated as a new flow.
    ConntrackExpired = 17,
    /// Dropped: a flow to SNAT arrived on an uplink with no known address.
    DropNoSnatAddress = 18,
    /// No usable endpoint at all: the packet was turned into a TCP reset or
    /// an ICMP port unreachable back to its sender (E1).
    RejectNoEndpoint = 19,
    /// Dropped: the source is outside the LoadBalancer's
    /// loadBalancerSourceRanges (F7).
    DropSourceRange = 20,
    /// A session-affinity entry named a backend that is no longer a usable
    /// endpoint of the service port; a new one was picked (C6).
    AffinityStale = 21,
    /// A UDP flow whose backend left the service port moved to a new
    /// backend (E4).
    FlowMoved = 22,
    /// A host-network socket's connect or sendmsg was sent to a backend (F2).
    SockTranslated = 23,
    /// A host-network socket's recvmsg or getpeername showed the frontend (F2).
    SockRevTranslated = 24,
    /// A host-network socket's connect or sendmsg to a frontend without
    /// endpoints failed with ECONNREFUSED (E1 from the node).
    SockRejected = 25,
    /// C1: one direction of a flow was found without its peer (evicted by
    /// the LRU, or deleted by the agent's GC racing a packet).
    ConntrackPeerMissing = 26,
    /// C1: the missing direction of a flow was re-created from the other.
    ConntrackRepaired = 27,
    /// C2: a flow's reply tuple clashed with another flow's (or a direct
    /// flow's reverse tuple with a translated flow's reply); its source
    /// port was remapped to a free one, as netfilter does.
    PortRemapped = 28,
    /// C2: two CPUs created the same flow at once; this packet used the
    /// entry the other one wrote.
    ConntrackRaceLost = 29,
    /// A translated packet continued to the stack (TCX_NEXT).
    PassTranslated = 30,
    /// C3: an ICMP error about a translated flow was translated (outer and
    /// embedded headers).
    IcmpErrorTranslated = 31,
    /// C3: a packet too big for the route of a packet the datapath forwards
    /// itself was answered with ICMP fragmentation needed.
    IcmpFragNeededSent = 32,
    /// C3: a packet with TTL <= 1 that the datapath would forward itself was
    /// answered with ICMP time exceeded.
    IcmpTimeExceededSent = 33,
    /// C4: a later fragment was translated like its first fragment.
    FragmentTranslated = 34,
    /// Dropped (C4): a later fragment whose first fragment was not seen
    /// (it arrives later, was evicted) or was dropped or answered.
    DropFragmentNoFirst = 35,
    /// F3: a TCP SYN (without ACK) matched a flow that had closed (FIN or
    /// RST seen): a new connection reusing the client's port, handled as a
    /// new flow (a new backend pick), as netfilter reopens a closed entry.
    ConntrackReopened = 36,
    /// A TCP packet without SYN opened a new flow: the flow's state was
    /// lost (both entries evicted by the LRU under pressure, collected
    /// after its lifetime, or never seen: a client continuing a connection
    /// it opened through another node) or a stray packet. It gets a
    /// backend like any new flow; if that is not the connection's backend,
    /// the backend resets it. With `conntrack_peer_missing` the sign of a
    /// conntrack map too small for the flows (or a flood).
    NewFlowWithoutSyn = 37,
    /// A SNAT port candidate (or a C2 remap candidate) was taken by a live
    /// flow to the same backend, and the next one was tried: a measure of
    /// how full the SNAT port range is for the busiest backends, before
    /// `DropSnatExhausted`.
    SnatPortTaken = 38,
    /// A new TCP connection took over the SNAT port of a closed flow
    /// (FIN both ways or reset, idle 2 s) to the same backend; both of
    /// that flow's entries were deleted.
    SnatPortReclaimed = 39,
}

pub const STAT_COUNT: u32 = 40;

impl StatReason {
    pub const ALL: [StatReason; STAT_COUNT as usize] = [
        StatReason::Packets,
        StatReason::PassNotService,
        StatReason::NewFlow,
        StatReason::ForwardTranslated,
        StatReason::ReplyTranslated,
        StatReason::PassNotIpv4,
        StatReason::PassOtherProto,
        StatReason::PassFragment,
        StatReason::PassIpOptions,
        StatReason::PassTruncated,
        StatReason::DropNoBackend,
        StatReason::DropBackendMissing,
        StatReason::DropConntrackFull,
        StatReason::DropRewriteFailed,
        StatReason::DropSnatExhausted,
        StatReason::DropFibFailed,
        StatReason::Redirected,
        StatReason::ConntrackExpired,
        StatReason::DropNoSnatAddress,
        StatReason::RejectNoEndpoint,
        StatReason::DropSourceRange,
        StatReason::AffinityStale,
        StatReason::FlowMoved,
        StatReason::SockTranslated,
        StatReason::SockRevTranslated,
        StatReason::SockRejected,
        StatReason::ConntrackPeerMissing,
        StatReason::ConntrackRepaired,
        StatReason::PortRemapped,
        StatReason::ConntrackRaceLost,
        StatReason::PassTranslated,
        StatReason::IcmpErrorTranslated,
        StatReason::IcmpFragNeededSent,
        StatReason::IcmpTimeExceededSent,
        StatReason::FragmentTranslated,
        StatReason::DropFragmentNoFirst,
        StatReason::ConntrackReopened,
        StatReason::NewFlowWithoutSyn,
        StatReason::SnatPortTaken,
        StatReason::SnatPortReclaimed,
    ];

    /// Stable snake_case name (lbctl output, metrics labels).
    pub const fn name(self) -> &'static str {
        match self {
            StatReason::Packets => "packets",
            StatReason::PassNotService => "pass_not_service",
            StatReason::NewFlow => "new_flow",
            StatReason::ForwardTranslated => "forward_translated",
            StatReason::ReplyTranslated => "reply_translated",
            StatReason::PassNotIpv4 => "pass_not_ipv4",
            StatReason::PassOtherProto => "pass_other_proto",
            StatReason::PassFragment => "pass_fragment",
            StatReason::PassIpOptions => "pass_ip_options",
            StatReason::PassTruncated => "pass_truncated",
            StatReason::DropNoBackend => "drop_no_backend",
            StatReason::DropBackendMissing => "drop_backend_missing",
            StatReason::DropConntrackFull => "drop_conntrack_full",
            StatReason::DropRewriteFailed => "drop_rewrite_failed",
            StatReason::DropSnatExhausted => "drop_snat_exhausted",
            StatReason::DropFibFailed => "drop_fib_failed",
            StatReason::Redirected => "redirected",
            StatReason::ConntrackExpired => "conntrack_expired",
            StatReason::DropNoSnatAddress => "drop_no_snat_address",
            StatReason::RejectNoEndpoint => "reject_no_endpoint",
            StatReason::DropSourceRange => "drop_source_range",
            StatReason::AffinityStale => "affinity_stale",
            StatReason::FlowMoved => "flow_moved",
            StatReason::SockTranslated => "sock_translated",
            StatReason::SockRevTranslated => "sock_rev_translated",
            StatReason::SockRejected => "sock_rejected",
            StatReason::ConntrackPeerMissing => "conntrack_peer_missing",
            StatReason::ConntrackRepaired => "conntrack_repaired",
            StatReason::PortRemapped => "port_remapped",
            StatReason::ConntrackRaceLost => "conntrack_race_lost",
            StatReason::PassTranslated => "pass_translated",
            StatReason::IcmpErrorTranslated => "icmp_error_translated",
            StatReason::IcmpFragNeededSent => "icmp_frag_needed_sent",
            StatReason::IcmpTimeExceededSent => "icmp_time_exceeded_sent",
            StatReason::FragmentTranslated => "fragment_translated",
            StatReason::DropFragmentNoFirst => "drop_fragment_no_first",
            StatReason::ConntrackReopened => "conntrack_reopened",
            StatReason::NewFlowWithoutSyn => "new_flow_without_syn",
            StatReason::SnatPortTaken => "snat_port_taken",
            StatReason::SnatPortReclaimed => "snat_port_reclaimed",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            StatReason::DropNoBackend
                | StatReason::DropBackendMissing
                | StatReason::DropConntrackFull
                | StatReason::DropRewriteFailed
                | StatReason::DropSnatExhausted
                | StatReason::DropFibFailed
                | StatReason::DropNoSnatAddress
                | StatReason::DropSourceRange
                | StatReason::DropFragmentNoFirst
        )
    }

    /// Whether this counter is the **outcome** of a TC program run: every
    /// run (`packets`) ends on exactly one outcome (passed, with or without
    /// translation; redirected; answered; dropped), so the outcomes sum to
    /// `packets`. The others count events along the way (a new flow, a
    /// translation, a repair, ...) or belong to the socket hooks.
    pub const fn is_outcome(self) -> bool {
        self.is_drop()
            || matches!(
                self,
                StatReason::PassNotService
                    | StatReason::PassNotIpv4
                    | StatReason::PassOtherProto
                    | StatReason::PassFragment
                    | StatReason::PassIpOptions
                    | StatReason::PassTruncated
                    | StatReason::PassTranslated
                    | StatReason::Redirected
                    | StatReason::RejectNoEndpoint
                    | StatReason::IcmpFragNeededSent
                    | StatReason::IcmpTimeExceededSent
            )
    }
}

/// IPv4 octets -> u32 in network byte order (as stored in the maps).
pub const fn ipv4_to_net(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// u32 in network byte order -> IPv4 octets.
pub const fn net_to_ipv4(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// Host-order port -> network byte order.
pub const fn port_to_net(port: u16) -> u16 {
    port.to_be()
}

/// Network byte order port -> host order.
pub const fn net_to_port(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and bytemuck::Pod (no padding,
    // any bit pattern valid), which is exactly what aya::Pod requires.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for NodeAddrValue {}
    unsafe impl aya::Pod for UplinkAddr {}
    unsafe impl aya::Pod for ServicePortNameValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_are_fixed() {
        // The kernel side and bpftool see these exact sizes; a change here is
        // a map format change that an upgrade must handle.
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<BackendSlotKey>(), 8);
        assert_eq!(size_of::<BackendSlot>(), 4);
        assert_eq!(size_of::<BackendValue>(), 12);
        assert_eq!(size_of::<ConntrackKey>(), 16);
        assert_eq!(size_of::<ConntrackEntry>(), 32);
        assert_eq!(align_of::<ConntrackEntry>(), 8);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<NodeAddrValue>(), 4);
        assert_eq!(size_of::<UplinkAddr>(), 4);
        assert_eq!(size_of::<ServicePortNameValue>(), 148);
        assert_eq!(size_of::<DatapathConfig>(), 96);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(size_of::<SockRevNatKey>(), 16);
        assert_eq!(size_of::<SockRevNatValue>(), 16);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragValue>(), 24);
    }

    #[test]
    fn byte_order_helpers_match_the_wire() {
        let addr = ipv4_to_net([10, 96, 0, 10]);
        assert_eq!(addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(net_to_ipv4(addr), [10, 96, 0, 10]);
        let port = port_to_net(8080);
        assert_eq!(port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(net_to_port(port), 8080);
    }

    #[test]
    fn key_field_offsets() {
        let k = ServiceKey {
            addr: ipv4_to_net([1, 2, 3, 4]),
            port: port_to_net(0x0102),
            proto: PROTO_UDP,
            scope: SCOPE_NODEPORT,
        };
        assert_eq!(bytemuck::bytes_of(&k), &[1, 2, 3, 4, 1, 2, 17, 1]);
        let c = ConntrackKey {
            saddr: ipv4_to_net([1, 1, 1, 1]),
            daddr: ipv4_to_net([2, 2, 2, 2]),
            sport: port_to_net(1),
            dport: port_to_net(2),
            proto: PROTO_TCP,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        assert_eq!(
            bytemuck::bytes_of(&c),
            &[1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 0, 2, 6, 1, 0, 0]
        );
    }

    #[test]
    fn conntrack_peer_keys_pair_up() {
        let client = ipv4_to_net([10, 244, 1, 5]);
        let vip = ipv4_to_net([10, 96, 0, 10]);
        let backend = ipv4_to_net([10, 244, 2, 3]);
        let node = ipv4_to_net([198, 18, 0, 11]);
        let fwd = ConntrackKey {
            saddr: client,
            daddr: vip,
            sport: port_to_net(40000),
            dport: port_to_net(80),
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        // Plain DNAT.
        let fe = ConntrackEntry {
            nat_addr: backend,
            nat_port: port_to_net(8080),
            ..Default::default()
        };
        let rev = fwd.peer(&fe);
        assert_eq!(
            (rev.saddr, rev.daddr, rev.sport, rev.dport, rev.dir),
            (
                backend,
                client,
                port_to_net(8080),
                port_to_net(40000),
                CT_DIR_REPLY
            )
        );
        let re = ConntrackEntry {
            nat_addr: vip,
            nat_port: port_to_net(80),
            ..Default::default()
        };
        assert_eq!(rev.peer(&re), fwd);
        // DNAT + SNAT to the node.
        let fe = ConntrackEntry {
            snat_addr: node,
            snat_port: port_to_net(61000),
            flags: ct_flags::SNAT,
            ..fe
        };
        let rev = fwd.peer(&fe);
        assert_eq!((rev.daddr, rev.dport), (node, port_to_net(61000)));
        let re = ConntrackEntry {
            snat_addr: client,
            snat_port: port_to_net(40000),
            flags: ct_flags::SNAT,
            ..re
        };
        assert_eq!(rev.peer(&re), fwd);
    }

    #[test]
    fn peer_entries_rebuild_the_other_direction() {
        let client = ipv4_to_net([10, 244, 1, 5]);
        let vip = ipv4_to_net([10, 96, 0, 10]);
        let backend = ipv4_to_net([10, 244, 2, 3]);
        let node = ipv4_to_net([198, 18, 0, 11]);
        let fwd = ConntrackKey {
            saddr: client,
            daddr: vip,
            sport: port_to_net(40000),
            dport: port_to_net(80),
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        for (snat, flags) in [
            ((0, 0), ct_flags::TCP_SYN),
            ((node, port_to_net(61000)), ct_flags::SNAT),
        ] {
            let fe = ConntrackEntry {
                nat_addr: backend,
                nat_port: port_to_net(8080),
                snat_addr: snat.0,
                snat_port: snat.1,
                backend_id: 3,
                service_id: 9,
                flags,
                created_s: 5,
                last_seen_ns: 77,
            };
            let rk = fwd.peer(&fe);
            let re = fwd.peer_entry(&fe);
            assert_eq!((re.nat_addr, re.nat_port), (vip, port_to_net(80)));
            assert_eq!(rk.peer(&re), fwd, "the rebuilt reply pairs back");
            assert_eq!(rk.peer_entry(&re), fe, "and rebuilds the forward entry");
        }
    }

    #[test]
    fn flows_expire_on_both_entries() {
        let c = DatapathConfig::DEFAULT;
        let s = 1_000_000_000;
        let old = ConntrackEntry {
            last_seen_ns: 100 * s,
            ..Default::default()
        };
        let fresh = ConntrackEntry {
            last_seen_ns: 290 * s,
            ..Default::default()
        };
        // Idle 200 s: past UDP's 30 s and TCP SYN_SENT's 120 s.
        let now = 300 * s;
        assert!(c.flow_expired(PROTO_UDP, &old, None, now));
        assert!(!c.flow_expired(PROTO_UDP, &old, Some(&fresh), now));
        assert!(!c.flow_expired(PROTO_UDP, &fresh, Some(&old), now));
        // The state of either side counts: established on one side.
        let est = ConntrackEntry {
            flags: ct_flags::TCP_ESTABLISHED,
            ..old
        };
        assert!(c.flow_expired(PROTO_TCP, &old, None, now));
        assert!(!c.flow_expired(PROTO_TCP, &old, Some(&est), now));
    }

    #[test]
    fn conntrack_lifetimes_follow_protocol_and_state() {
        use ct_flags::*;
        let c = DatapathConfig::DEFAULT;
        let est = TCP_SYN | SEEN_REPLY | TCP_ESTABLISHED;
        // (proto, flags, state, default lifetime in s): kube-proxy's
        // established (24 h) and close_wait (1 h), the kernel's others.
        let cases = [
            (PROTO_TCP, TCP_SYN, CtState::TcpSynSent, 120),
            (PROTO_TCP, 0, CtState::TcpSynSent, 120),
            (PROTO_TCP, TCP_SYN | SEEN_REPLY, CtState::TcpSynRecv, 60),
            // Picked up mid-stream, both directions passed.
            (PROTO_TCP, SEEN_REPLY, CtState::TcpSynRecv, 60),
            (PROTO_TCP, est, CtState::TcpEstablished, 86_400),
            (
                PROTO_TCP,
                est | SNAT | PORT_REMAP,
                CtState::TcpEstablished,
                86_400,
            ),
            (
                PROTO_TCP,
                est | TCP_FIN | FIN_FORWARD,
                CtState::TcpCloseWait,
                3_600,
            ),
            (
                PROTO_TCP,
                est | TCP_FIN | FIN_REPLY,
                CtState::TcpCloseWait,
                3_600,
            ),
            // A FIN without its direction (an entry of an older datapath).
            (PROTO_TCP, est | TCP_FIN, CtState::TcpCloseWait, 3_600),
            (
                PROTO_TCP,
                TCP_SYN | TCP_FIN | FIN_FORWARD,
                CtState::TcpFinWait,
                120,
            ),
            (
                PROTO_TCP,
                TCP_SYN | SEEN_REPLY | TCP_FIN | FIN_REPLY,
                CtState::TcpFinWait,
                120,
            ),
            (
                PROTO_TCP,
                est | TCP_FIN | FIN_FORWARD | FIN_REPLY,
                CtState::TcpTimeWait,
                120,
            ),
            (
                PROTO_TCP,
                TCP_SYN | TCP_FIN | FIN_FORWARD | FIN_REPLY,
                CtState::TcpTimeWait,
                120,
            ),
            (PROTO_TCP, TCP_SYN | TCP_RST, CtState::TcpClose, 10),
            (PROTO_TCP, est | TCP_RST, CtState::TcpClose, 10),
            (
                PROTO_TCP,
                est | TCP_FIN | FIN_FORWARD | FIN_REPLY | TCP_RST,
                CtState::TcpClose,
                10,
            ),
            (PROTO_UDP, 0, CtState::Udp, 30),
            (PROTO_UDP, SEEN_REPLY, CtState::Udp, 30),
            (PROTO_UDP, SEEN_REPLY | UDP_STREAM, CtState::UdpStream, 120),
        ];
        for (proto, flags, state, secs) in cases {
            assert_eq!(CtState::of(proto, flags), state, "{proto} {flags:#x}");
            assert_eq!(
                c.ct_lifetime_ns(proto, flags),
                secs * 1_000_000_000,
                "{proto} {flags:#x} {state:?}"
            );
        }
        // Every state reads its own field.
        let mut custom = DatapathConfig::DEFAULT;
        for (i, f) in [
            &mut custom.ct_tcp_syn_sent_ns,
            &mut custom.ct_tcp_syn_recv_ns,
            &mut custom.ct_tcp_established_ns,
            &mut custom.ct_tcp_fin_wait_ns,
            &mut custom.ct_tcp_close_wait_ns,
            &mut custom.ct_tcp_time_wait_ns,
            &mut custom.ct_tcp_close_ns,
            &mut custom.ct_udp_ns,
            &mut custom.ct_udp_stream_ns,
        ]
        .into_iter()
        .enumerate()
        {
            *f = i as u64 + 1;
        }
        let states = [
            CtState::TcpSynSent,
            CtState::TcpSynRecv,
            CtState::TcpEstablished,
            CtState::TcpFinWait,
            CtState::TcpCloseWait,
            CtState::TcpTimeWait,
            CtState::TcpClose,
            CtState::Udp,
            CtState::UdpStream,
        ];
        for (i, st) in states.iter().enumerate() {
            assert_eq!(custom.state_lifetime_ns(*st), i as u64 + 1, "{st:?}");
        }
        assert_eq!(custom.min_lifetime_ns(), 1);
        assert_eq!(c.min_lifetime_ns(), 10 * 1_000_000_000);
        // The shorthand sets every state but established.
        let t = DatapathConfig::DEFAULT.with_tcp_transient_ns(7);
        for st in &states[..7] {
            let want = if *st == CtState::TcpEstablished {
                c.ct_tcp_established_ns
            } else {
                7
            };
            assert_eq!(t.state_lifetime_ns(*st), want, "{st:?}");
        }
        assert_eq!(
            (t.ct_udp_ns, t.ct_udp_stream_ns),
            (c.ct_udp_ns, c.ct_udp_stream_ns)
        );
    }

    #[test]
    fn udp_streams_start_two_seconds_after_creation() {
        let s = 1_000_000_000u64;
        let t0 = 1_000 * s + 300_000_000;
        let c = created_s(t0);
        assert!(!udp_stream_due(c, t0));
        assert!(!udp_stream_due(c, t0 + s));
        assert!(udp_stream_due(c, t0 + 2 * s));
        assert!(udp_stream_due(c, t0 + 3_600 * s));
        // Across the 2^16 s wrap.
        let t1 = 65_535 * s;
        let c = created_s(t1);
        assert!(!udp_stream_due(c, t1 + s));
        assert!(udp_stream_due(c, t1 + 2 * s));
        // Entries that never had a creation time (0) are old enough.
        assert!(udp_stream_due(0, 100 * s));
    }

    #[test]
    fn stat_names_are_unique_and_indexed() {
        for (i, r) in StatReason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{} out of order", r.name());
            for o in &StatReason::ALL[i + 1..] {
                assert_ne!(r.name(), o.name());
            }
        }
    }

    #[test]
    fn service_port_names_read_back_exactly() {
        let n = ServicePortNameValue::new("kube-system", "kube-dns", "dns-tcp", PROTO_TCP).unwrap();
        assert_eq!(n.parts(), Some(("kube-system", "kube-dns", "dns-tcp")));
        assert_eq!(n.protocol, PROTO_TCP);
        // Longest allowed, and one byte more (no allocation in no_std).
        let a = [b'a'; MAX_NAME_LEN + 1];
        let p = [b'p'; MAX_PORT_NAME_LEN + 1];
        let too_long = core::str::from_utf8(&a).unwrap();
        let port_too_long = core::str::from_utf8(&p).unwrap();
        let long = &too_long[..MAX_NAME_LEN];
        let port = &port_too_long[..MAX_PORT_NAME_LEN];
        let n = ServicePortNameValue::new(long, long, port, PROTO_UDP).unwrap();
        assert_eq!(n.parts(), Some((long, long, port)));
        assert!(ServicePortNameValue::new(too_long, "x", "", PROTO_TCP).is_none());
        assert!(ServicePortNameValue::new("x", "y", port_too_long, PROTO_TCP).is_none());
        let mut bad = ServicePortNameValue::new("x", "y", "", PROTO_TCP).unwrap();
        bad.name_len = 200;
        assert_eq!(bad.parts(), None);
    }
}

/// `lbctl monitor`: datapath events and their load-time switch.
pub mod monitor;
