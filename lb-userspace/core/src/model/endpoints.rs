//! EndpointSlices -> validated inputs ([`ParsedSlice`]) and, per service
//! port, the usable endpoint sets (W3-W6, E3, E6).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::service::parse_protocol;
use super::{
    is_foreign, port_number, quoted, Interner, ObjectError, ObjectKind, ObjectRef, Reporter,
    LABEL_SERVICE_NAME,
};
use crate::desired::{Endpoint, Protocol, ServiceRef};

/// An EndpointSlice as the model reads it: made once when the object
/// arrives (in the watcher's task) and kept instead of the object.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedSlice {
    /// The object, for log lines and Events.
    pub reference: ObjectRef,
    /// W3: the Service it belongs to (`kubernetes.io/service-name`).
    pub owner: Option<ServiceRef>,
    /// `None`: not ours (W1, other address family) or unusable.
    pub info: Option<SliceInfo>,
    pub errors: Vec<ObjectError>,
}

impl ParsedSlice {
    /// `node_name` decides which endpoints are local (W6); `strings` shares
    /// node names, zones and port names between slices.
    pub fn parse(slice: &EndpointSlice, node_name: &str, strings: &mut Interner) -> Self {
        let reference = ObjectRef::of(&slice.metadata);
        if is_foreign(&slice.metadata) {
            // W1: not ours; not an error.
            return Self {
                reference,
                owner: None,
                info: None,
                errors: Vec::new(),
            };
        }
        let mut r = Reporter::new(ObjectKind::EndpointSlice, &slice.metadata);
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|s| !s.is_empty())
            .map(|s| ServiceRef::new(reference.namespace.clone(), s.clone()));
        let info = match owner {
            Some(_) => parse(slice, node_name, strings, &mut r),
            None => {
                r.error(
                    format!("metadata.labels[{LABEL_SERVICE_NAME:?}]"),
                    None,
                    "missing: the slice belongs to no Service; ignored",
                );
                None
            }
        };
        Self {
            reference,
            owner,
            info,
            errors: r.errors,
        }
    }

    /// namespace/name of the slice itself.
    pub fn key(&self) -> ServiceRef {
        ServiceRef::new(
            self.reference.namespace.clone(),
            self.reference.name.clone(),
        )
    }
}

/// A validated EndpointSlice: only what the model reads, compactly (a big
/// cluster keeps hundreds of thousands of endpoints).
#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    /// The slice's name: duplicates across slices resolve in name order.
    pub(crate) name: Box<str>,
    pub(crate) ports: Box<[SlicePort]>,
    pub(crate) endpoints: Box<[SliceEndpoint]>,
}

impl SliceInfo {
    /// The slice's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SlicePort {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// An endpoint as the slice describes it (W5 defaults applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceEndpoint {
    pub addr: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// W6.
    pub local: bool,
    /// E6: hints.forZones names.
    pub zones: Box<[Arc<str>]>,
    /// E6: hints.forNodes, as far as this node cares.
    pub node_hint: NodeHint,
}

/// E6: an endpoint's `hints.forNodes`, seen from this node (decided when the
/// slice is parsed: the node's name never changes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum NodeHint {
    #[default]
    None,
    /// Hinted, but not for this node.
    OtherNodes,
    /// Hinted for this node (possibly among others).
    ThisNode,
}

/// An endpoint of one service port: a [`SliceEndpoint`] with the port number
/// its slice gives for that service port (W4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortEndpoint<'a> {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
    pub zones: &'a [Arc<str>],
    pub node_hint: NodeHint,
}

fn parse(
    slice: &EndpointSlice,
    node_name: &str,
    strings: &mut Interner,
    r: &mut Reporter,
) -> Option<SliceInfo> {
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return None, // W3: other family, not ours
        other => {
            r.error(
                "addressType",
                quoted(other),
                "unknown address type (expected IPv4, IPv6 or FQDN)",
            );
            return None;
        }
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = match parse_protocol(p.protocol.as_deref()) {
            Ok(proto) => proto,
            // SCTP: the Service port is reported already; nothing to match.
            Err(_) if p.protocol.as_deref() == Some("SCTP") => continue,
            Err(msg) => {
                r.error(
                    format!("ports[{i}].protocol"),
                    quoted(p.protocol.as_deref().unwrap_or("")),
                    msg,
                );
                continue;
            }
        };
        let port = match p.port {
            None => {
                r.error(
                    format!("ports[{i}].port"),
                    None,
                    "missing (\"all ports\" is not supported); port ignored",
                );
                continue;
            }
            Some(n) => match port_number(n) {
                Some(port) => port,
                None => {
                    r.error(
                        format!("ports[{i}].port"),
                        Some(n.to_string()),
                        "out of range 1-65535; port ignored",
                    );
                    continue;
                }
            },
        };
        ports.push(SlicePort {
            name: strings.get(p.name.as_deref().unwrap_or_default()),
            protocol,
            port,
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        // W3: only the first address counts.
        let Some(first) = e.addresses.first() else {
            r.error(
                format!("endpoints[{i}].addresses"),
                None,
                "empty; endpoint ignored",
            );
            continue;
        };
        let addr = match first.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => a,
            Ok(IpAddr::V6(_)) => continue, // other family
            Err(_) => {
                r.error(
                    format!("endpoints[{i}].addresses[0]"),
                    quoted(first),
                    "not an IPv4 address; endpoint ignored",
                );
                continue;
            }
        };
        // W5: ready nil = true, serving nil = true, terminating nil = false.
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        // W6.
        let local = e.node_name.as_deref() == Some(node_name) && !node_name.is_empty();
        let node_hint = match e.hints.as_ref().and_then(|h| h.for_nodes.as_ref()) {
            Some(nodes)
                if nodes
                    .iter()
                    .any(|n| n.name == node_name && !node_name.is_empty()) =>
            {
                NodeHint::ThisNode
            }
            Some(nodes) if nodes.iter().any(|n| !n.name.is_empty()) => NodeHint::OtherNodes,
            _ => NodeHint::None,
        };
        let zones = e
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| {
                z.iter()
                    .filter(|z| !z.name.is_empty())
                    .map(|z| strings.get(&z.name))
                    .collect()
            })
            .unwrap_or_default();
        endpoints.push(SliceEndpoint {
            addr,
            ready,
            serving,
            terminating,
            local,
            zones,
            node_hint,
        });
    }
    Some(SliceInfo {
        name: r.name.clone().into_boxed_str(),
        ports: ports.into_boxed_slice(),
        endpoints: endpoints.into_boxed_slice(),
    })
}

/// W3, W4: the endpoints of one service port (name, protocol) over all the
/// Service's slices, deduplicated by address:port. As kube-proxy does, the
/// first occurrence wins (slices in name order) unless a later one is local.
pub(crate) fn collect<'a>(
    slices: &[&'a SliceInfo],
    port_name: &str,
    protocol: Protocol,
) -> Vec<PortEndpoint<'a>> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), PortEndpoint> = BTreeMap::new();
    for slice in slices {
        for sp in slice
            .ports
            .iter()
            .filter(|p| &*p.name == port_name && p.protocol == protocol)
        {
            for e in slice.endpoints.iter() {
                let key = (e.addr, sp.port);
                if by_addr.contains_key(&key) && !e.local {
                    continue;
                }
                by_addr.insert(
                    key,
                    PortEndpoint {
                        addr: e.addr,
                        port: sp.port,
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                        local: e.local,
                        zones: &e.zones,
                        node_hint: e.node_hint,
                    },
                );
            }
        }
    }
    by_addr.into_values().collect()
}

/// The two usable sets of a service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sets {
    pub cluster: Vec<Endpoint>,
    pub local: Vec<Endpoint>,
}

/// E6: how the cluster-wide set is narrowed by topology hints (kube-proxy's
/// `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    /// No hints apply: every endpoint.
    All,
    /// PreferSameNode: the endpoints hinted for this node.
    SameNode,
    /// PreferSameZone: the endpoints hinted for this zone.
    SameZone(&'a str),
}

/// E6, as kube-proxy decides it today: hints are used whenever they are
/// there (the topology-mode annotation and spec.trafficDistribution only
/// tell the EndpointSlice controller to write them). Node hints first: when
/// every ready endpoint has one and one names this node. Then zone hints:
/// when every ready endpoint has one and one names this node's zone.
/// Endpoints that are not ready need no hint.
fn topology<'a>(eps: &[PortEndpoint<'_>], zone: Option<&'a str>) -> Topology<'a> {
    let ready = || eps.iter().filter(|e| e.ready);
    let all_node_hinted = ready().all(|e| e.node_hint != NodeHint::None);
    if all_node_hinted && ready().any(|e| e.node_hint == NodeHint::ThisNode) {
        return Topology::SameNode;
    }
    if let Some(z) = zone {
        let all_zone_hinted = ready().all(|e| !e.zones.is_empty());
        if all_zone_hinted && ready().any(|e| e.zones.iter().any(|x| &**x == z)) {
            return Topology::SameZone(z);
        }
    }
    Topology::All
}

/// E3, E6: picks the cluster-wide and the node-local usable sets.
pub(crate) fn categorize(eps: &[PortEndpoint<'_>], zone: Option<&str>) -> Sets {
    let zone = zone.filter(|z| !z.is_empty());
    let topology = topology(eps, zone);
    let pick = |filter: &dyn Fn(&PortEndpoint) -> bool, terminating: bool| -> Vec<Endpoint> {
        // `eps` is sorted by (addr, port) and unique, so the result is too.
        eps.iter()
            .filter(|e| filter(e))
            .map(|e| Endpoint {
                addr: e.addr,
                port: e.port,
                local: e.local,
                terminating,
            })
            .collect()
    };
    let hinted_here = |e: &PortEndpoint| match topology {
        Topology::All => true,
        Topology::SameNode => e.node_hint == NodeHint::ThisNode,
        Topology::SameZone(z) => e.zones.iter().any(|x| &**x == z),
    };
    let mut cluster = pick(&|e| e.ready && hinted_here(e), false);
    if cluster.is_empty() {
        // No ready endpoint anywhere (topology can't be the cause: it is
        // only used when a ready endpoint is hinted for here).
        cluster = pick(&|e| e.serving && e.terminating, true);
    }
    // The local set (M3, E5) ignores hints.
    let mut local = pick(&|e| e.local && e.ready, false);
    if local.is_empty() {
        local = pick(&|e| e.local && e.serving && e.terminating, true);
    }
    Sets { cluster, local }
}
