//! The two states the agent moves between.
//!
//! [`DesiredState`] is what the model computes for this node from Kubernetes
//! objects (pure, no ids). [`MapContents`] is exactly what sits in the BPF maps
//! (ids, slots, network byte order). `sync::plan` turns the pair into an ordered
//! list of [`MapOp`]s; the dataplane executes them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use lb_common::{BackendSlot, BackendSlotKey, BackendValue, ServiceKey, ServiceName, ServiceValue};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port of one Service: kube-proxy's `ServicePortName`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name` (may be empty for single-port services).
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `namespace/name:port_name/PROTO` (`namespace/name/PROTO` with no port name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}/{}", self.namespace, self.name, self.protocol)
        } else {
            write!(
                f,
                "{}/{}:{}/{}",
                self.namespace, self.name, self.port_name, self.protocol
            )
        }
    }
}

/// What kind of address a frontend listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    /// Wildcard: matches any of this node's NodePort addresses.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub fn flag(self) -> u16 {
        use lb_common::service_flags as f;
        match self {
            FrontendKind::ClusterIp => f::CLUSTER_IP,
            FrontendKind::NodePort => f::NODE_PORT,
            FrontendKind::ExternalIp => f::EXTERNAL_IP,
            FrontendKind::LoadBalancer => f::LOAD_BALANCER,
        }
    }
}

/// An address:port clients send to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub kind: FrontendKind,
    /// `None` for NodePort (wildcard over node addresses).
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: self
                .addr
                .map(|a| lb_common::ipv4_to_net(a.octets()))
                .unwrap_or(0),
            port: lb_common::port_to_net(self.port),
            proto: self.protocol.number(),
            scope: if self.addr.is_some() {
                lb_common::SCOPE_EXACT
            } else {
                lb_common::SCOPE_NODEPORT
            },
        }
    }
}

/// A usable endpoint of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// nodeName is this node (W6).
    pub local: bool,
    /// Used only because nothing ready was left (E3 fallback).
    pub terminating: bool,
}

/// Everything the datapath needs for one service port on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredServicePort {
    pub frontends: BTreeSet<Frontend>,
    /// Cluster-wide usable set (E3 applied), sorted, no duplicates.
    pub backends: Vec<Endpoint>,
    /// Node-local usable set (E3 applied separately), sorted, no duplicates.
    pub local_backends: Vec<Endpoint>,
    /// `lb_common::service_flags` that are not per-frontend-kind
    /// (AFFINITY, EXTERNAL_LOCAL, INTERNAL_LOCAL, SOURCE_RANGES).
    pub flags: u16,
    /// sessionAffinity ClientIP timeout (F8), seconds; 0 when affinity is off.
    pub affinity_timeout_sec: u32,
}

/// What this node should be programmed with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortName, DesiredServicePort>,
}

/// Exact contents of the agent-owned BPF maps (conntrack, affinity and stats
/// are the datapath's and are not part of it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<BackendSlotKey, BackendSlot>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// service id -> name (LB_SERVICE_NAMES, for lbctl).
    pub names: BTreeMap<u32, String>,
    /// NodePort addresses (LB_NODE_ADDRS), network byte order.
    pub node_addrs: BTreeSet<u32>,
}

/// One map write. `sync::plan` orders them so that the datapath never sees a
/// half-written backend set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, BackendValue),
    PutSlot(BackendSlotKey, BackendSlot),
    PutName(u32, String),
    PutNodeAddr(u32),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    DeleteSlot(BackendSlotKey),
    DeleteBackend(u32),
    DeleteName(u32),
    DeleteNodeAddr(u32),
}

impl MapOp {
    /// Mirrors the op into `contents` (after the dataplane applied it).
    pub fn apply_to(&self, contents: &mut MapContents) {
        match self {
            MapOp::PutBackend(id, v) => {
                contents.backends.insert(*id, *v);
            }
            MapOp::PutSlot(k, v) => {
                contents.slots.insert(*k, *v);
            }
            MapOp::PutName(id, n) => {
                contents.names.insert(*id, n.clone());
            }
            MapOp::PutNodeAddr(a) => {
                contents.node_addrs.insert(*a);
            }
            MapOp::PutService(k, v) => {
                contents.services.insert(*k, *v);
            }
            MapOp::DeleteService(k) => {
                contents.services.remove(k);
            }
            MapOp::DeleteSlot(k) => {
                contents.slots.remove(k);
            }
            MapOp::DeleteBackend(id) => {
                contents.backends.remove(id);
            }
            MapOp::DeleteName(id) => {
                contents.names.remove(id);
            }
            MapOp::DeleteNodeAddr(a) => {
                contents.node_addrs.remove(a);
            }
        }
    }
}

/// Converts a name for the LB_SERVICE_NAMES map.
pub fn service_name_value(name: &str) -> ServiceName {
    ServiceName::new(name)
}
