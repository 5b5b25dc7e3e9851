//! What the model computes for this node: per service port, its frontends
//! and its two usable backend sets. No ids, no byte order: the planner
//! ([`crate::plan`]) turns this into map contents.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::jiff::Timestamp;
use lb_common::{ServiceKey, ServicePortNameValue};

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

/// A Service: namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service: kube-proxy's `ServicePortName`. The identity of
/// everything the planner programs for that port; stored field by field in
/// LB_SERVICE_NAMES so that a restarted agent finds its ids again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name` (may be empty for single-port services).
    pub port_name: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn service(&self) -> ServiceRef {
        ServiceRef::new(self.namespace.clone(), self.name.clone())
    }

    /// Whether this port belongs to `service`.
    pub fn is_of(&self, service: &ServiceRef) -> bool {
        self.namespace == service.namespace && self.name == service.name
    }

    /// The LB_SERVICE_NAMES value; `None` when a part is longer than
    /// Kubernetes allows (the model rejects such objects first).
    pub fn to_map_value(&self) -> Option<ServicePortNameValue> {
        ServicePortNameValue::new(
            &self.namespace,
            &self.name,
            &self.port_name,
            self.protocol.number(),
        )
    }

    /// Reads an LB_SERVICE_NAMES value; `None` when it does not decode.
    pub fn from_map_value(v: &ServicePortNameValue) -> Option<Self> {
        let (namespace, name, port_name) = v.parts()?;
        Some(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port_name: port_name.to_string(),
            protocol: Protocol::from_number(v.protocol)?,
        })
    }
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

/// What kind of address a frontend listens on. The order is the order of
/// preference when one service port lists one address twice (an externalIP
/// equal to its LoadBalancer IP): the first kind keeps it.
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

    /// The Service field this kind of frontend comes from.
    pub fn field(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "spec.clusterIP",
            FrontendKind::NodePort => "spec.ports[].nodePort",
            FrontendKind::ExternalIp => "spec.externalIPs",
            FrontendKind::LoadBalancer => "status.loadBalancer.ingress",
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
    /// The LB_SERVICES key.
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

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            None => write!(f, "node port {}/{}", self.port, self.protocol),
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
    /// Every frontend the Service asks for, one per map key (the model drops
    /// a second kind of the same address). Two service ports may ask for
    /// the same key: the planner decides who owns it (C7).
    pub frontends: BTreeSet<Frontend>,
    /// Cluster-wide usable set (E3, E6 applied), sorted, no duplicates.
    pub backends: Vec<Endpoint>,
    /// Node-local usable set (E3 applied separately), sorted, no duplicates.
    pub local_backends: Vec<Endpoint>,
    /// `lb_common::service_flags` that are not per-frontend-kind
    /// (AFFINITY, EXTERNAL_LOCAL, INTERNAL_LOCAL, SOURCE_RANGES).
    pub flags: u16,
    /// sessionAffinity ClientIP timeout (F8), seconds; 0 when affinity is off.
    pub affinity_timeout_sec: u32,
    /// F7: loadBalancerSourceRanges (IPv4), sorted, when SOURCE_RANGES is set.
    pub source_ranges: Vec<Ipv4Net>,
    /// The Service's creationTimestamp: the older Service keeps a frontend
    /// two Services claim (C7). `None` sorts after every time.
    pub created: Option<Timestamp>,
}

/// What this node should be programmed with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortName, DesiredServicePort>,
}

/// Read access to a desired state, wherever it is kept (a [`DesiredState`],
/// or the cluster source's per-Service outputs): the planner looks up the
/// ports it plans and, for a full diff, walks all of them.
pub trait DesiredPorts {
    fn port(&self, name: &ServicePortName) -> Option<&DesiredServicePort>;
    /// Every port, in [`ServicePortName`] order.
    fn ports(&self) -> Box<dyn Iterator<Item = (&ServicePortName, &DesiredServicePort)> + '_>;
}

impl DesiredPorts for DesiredState {
    fn port(&self, name: &ServicePortName) -> Option<&DesiredServicePort> {
        self.services.get(name)
    }

    fn ports(&self) -> Box<dyn Iterator<Item = (&ServicePortName, &DesiredServicePort)> + '_> {
        Box::new(self.services.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_port_names_round_trip_through_the_map_value() {
        let n = ServicePortName {
            namespace: "kube-system".into(),
            name: "kube-dns".into(),
            port_name: "dns".into(),
            protocol: Protocol::Udp,
        };
        let v = n.to_map_value().unwrap();
        assert_eq!(ServicePortName::from_map_value(&v), Some(n.clone()));
        assert_eq!(n.to_string(), "kube-system/kube-dns:dns/UDP");
        let unnamed = ServicePortName {
            port_name: String::new(),
            ..n
        };
        assert_eq!(unnamed.to_string(), "kube-system/kube-dns/UDP");
        let too_long = ServicePortName {
            name: "x".repeat(64),
            ..unnamed
        };
        assert_eq!(too_long.to_map_value(), None);
    }
}
