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

/// E3, E6: picks the cluster-wide and the node-local usable sets.
pub(crate) fn categorize(
    eps: &[PortEndpoint<'_>],
    zone: Option<&str>,
    topology_aware: bool,
) -> Sets {
    let zone = zone.filter(|z| !z.is_empty());
    let use_topology = match zone {
        Some(z) if topology_aware => can_use_topology(eps, z),
        _ => false,
    };
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
    let in_zone = |e: &PortEndpoint| match zone {
        Some(z) if use_topology => e.zones.iter().any(|x| &**x == z),
        _ => true,
    };
    let mut cluster = pick(&|e| e.ready && in_zone(e), false);
    if cluster.is_empty() {
        // No ready endpoint anywhere (topology can't be the cause: it is
        // only used when a ready endpoint is hinted for this zone).
        cluster = pick(&|e| e.serving && e.terminating, true);
    }
    let mut local = pick(&|e| e.local && e.ready, false);
    if local.is_empty() {
        local = pick(&|e| e.local && e.serving && e.terminating, true);
    }
    Sets { cluster, local }
}

/// E6: hints are used only if every ready endpoint has a zone hint and at
/// least one is hinted for this node's zone.
fn can_use_topology(eps: &[PortEndpoint<'_>], zone: &str) -> bool {
    let mut any_for_zone = false;
    for e in eps.iter().filter(|e| e.ready) {
        if e.zones.is_empty() {
            return false;
        }
        any_for_zone |= e.zones.iter().any(|z| &**z == zone);
    }
    any_for_zone
}
