//! The model: Kubernetes Services and EndpointSlices -> what THIS node's
//! datapath must be programmed with ([`DesiredState`]).
//!
//! Pure and deterministic: no I/O, no clock, no randomness; the same objects
//! in any order give the same output. Every kube-proxy rule of SEMANTICS.md
//! that is decided from objects lives here (W1-W6, F1, F4-F6, F8, F9, E3,
//! E5, E6); the datapath only reads the flags and the two backend sets.
//!
//! Bad input is rejected per object, and as narrowly as makes sense, with an
//! [`ObjectError`] naming the object and the field; everything else is still
//! computed:
//! - a Service-wide field that is wrong (type, clusterIP, sessionAffinity,
//!   traffic policies, loadBalancerSourceRanges) skips the whole Service;
//! - a wrong port (protocol, port, nodePort, targetPort, duplicate name)
//!   skips that port only;
//! - a wrong externalIPs / ingress entry skips that frontend only;
//! - a wrong EndpointSlice port or endpoint skips that port or endpoint;
//! - a frontend (address, port, protocol) claimed by two service ports goes
//!   to the older Service (creationTimestamp, then namespace/name); the
//!   other gets an error for that frontend.
//!
//! Objects that are not ours (W1 labels, headless, ExternalName, IPv6-only
//! Services, IPv6/FQDN slices) are skipped silently: they are not errors.

mod endpoints;
mod service;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::state::{DesiredServicePort, DesiredState, ServicePortName};

/// W1: Services/EndpointSlices with this label belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// W1: set by the EndpointSlice controller on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// W3: the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// E6: the zone label of a Node.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// E6: topology aware routing (`Auto` enables it).
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// E6: the pre-1.27 name of [`ANNOTATION_TOPOLOGY_MODE`].
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// W1: the label selector watchers use for Services and EndpointSlices
/// (the model applies the same filter itself for manifest input).
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// F8: sessionAffinityConfig.clientIP.timeoutSeconds default and bounds.
pub const DEFAULT_AFFINITY_TIMEOUT_SEC: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_SEC: u32 = 86_400;

/// What the model needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// W6: endpoints whose nodeName equals this are local.
    pub node_name: String,
    /// E6: this node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl NodeContext {
    pub fn new(node_name: impl Into<String>, zone: Option<String>) -> Self {
        Self {
            node_name: node_name.into(),
            zone,
        }
    }

    /// For the node called `node_name`, with the zone taken from its Node
    /// object when there is one (manifest mode: the manifest may not list
    /// the node).
    pub fn with_node(node_name: impl Into<String>, node: Option<&Node>) -> Self {
        let zone = node.and_then(zone_of);
        Self::new(node_name, zone)
    }

    /// From this node's Node object (name and zone label; an empty zone
    /// label counts as none).
    // Cold path, once per start: the size of the error does not matter.
    #[allow(clippy::result_large_err)]
    pub fn from_node(node: &Node) -> Result<Self, ObjectError> {
        let name = match node.metadata.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => {
                return Err(ObjectError {
                    kind: ObjectKind::Node,
                    namespace: None,
                    name: String::new(),
                    field: "metadata.name".into(),
                    value: None,
                    message: "missing".into(),
                })
            }
        };
        Ok(Self {
            node_name: name,
            zone: zone_of(node),
        })
    }
}

/// E6: a Node's zone label (empty counts as none).
fn zone_of(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned()
}

/// The kind of object an [`ObjectError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem with one object (or one part of it) that the model skipped.
/// Displays as one line, e.g.
/// `Service default/web: spec.clusterIP "10.0.0.300": not an IPv4 address`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ObjectError {
    pub kind: ObjectKind,
    /// `None` for cluster-scoped objects (Node).
    pub namespace: Option<String>,
    pub name: String,
    /// Field path, e.g. `spec.ports[1].protocol`.
    pub field: String,
    /// The offending value as it is printed (strings quoted), if any.
    pub value: Option<String>,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}: ", self.name)?;
        if !self.field.is_empty() {
            f.write_str(&self.field)?;
            if let Some(v) = &self.value {
                write!(f, " {v}")?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

/// H1: a health-check node port this node must serve
/// (type LoadBalancer with externalTrafficPolicy Local).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// spec.healthCheckNodePort.
    pub node_port: u16,
    /// Ready (not terminating) endpoints on this node, summed over the
    /// Service's ports as kube-proxy counts them.
    pub local_endpoints: usize,
}

/// Everything [`desired_state`] computes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelOutput {
    pub state: DesiredState,
    /// What was skipped and why; sorted by (kind, namespace, name) of the
    /// object, in field order within an object.
    pub errors: Vec<ObjectError>,
    /// H1: health-check node ports, sorted by namespace/name.
    pub health_checks: Vec<HealthCheck>,
    /// F7: the IPv4 loadBalancerSourceRanges of service ports that carry
    /// `service_flags::SOURCE_RANGES` (the datapath enforcement is later
    /// work; kept here so it does not have to re-read the Service).
    pub source_ranges: BTreeMap<ServicePortName, Vec<Ipv4Net>>,
}

/// Computes this node's desired datapath state. Pure; see the module docs.
pub fn desired_state(
    ctx: &NodeContext,
    services: &[Service],
    slices: &[EndpointSlice],
) -> ModelOutput {
    let mut errors = Vec::new();

    // Services, oldest first (frontend conflicts go to the older one), then
    // by namespace/name so that the result does not depend on input order.
    let mut svcs: Vec<&Service> = services.iter().collect();
    svcs.sort_by(|a, b| {
        let ka = (
            creation_key(&a.metadata),
            namespace_of(&a.metadata),
            name_of(&a.metadata),
        );
        let kb = (
            creation_key(&b.metadata),
            namespace_of(&b.metadata),
            name_of(&b.metadata),
        );
        ka.cmp(&kb)
    });
    let mut seen = BTreeSet::new();
    let mut infos = Vec::new();
    for svc in svcs {
        let key = (namespace_of(&svc.metadata), name_of(&svc.metadata));
        if !seen.insert(key) {
            errors.push(ObjectError {
                kind: ObjectKind::Service,
                namespace: Some(key.0.to_string()),
                name: key.1.to_string(),
                field: "metadata.name".into(),
                value: None,
                message: "the same Service appears twice; the second one is ignored".into(),
            });
            continue;
        }
        if let Some(info) = service::parse(svc, &mut errors) {
            infos.push(info);
        }
    }

    let index = endpoints::index(ctx, slices, &mut errors);

    let mut out = ModelOutput::default();
    // Frontend key -> the service port that owns it.
    let mut claims: BTreeMap<lb_common::ServiceKey, ServicePortName> = BTreeMap::new();
    for info in &infos {
        let svc_slices = index
            .get(&(info.namespace.clone(), info.name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut local_ready_total = 0usize;
        for port in &info.ports {
            let spn = ServicePortName {
                namespace: info.namespace.clone(),
                name: info.name.clone(),
                port_name: port.name.clone(),
                protocol: port.protocol,
            };
            let eps = endpoints::collect(svc_slices, &port.name, port.protocol);
            local_ready_total += eps.iter().filter(|e| e.local && e.ready).count();
            let sets = endpoints::categorize(&eps, ctx.zone.as_deref(), info.topology_aware);

            let mut frontends = BTreeSet::new();
            for (fe, field, value) in service::frontends(info, port) {
                let key = fe.key();
                match claims.get(&key) {
                    Some(owner) if *owner == spn => {} // same address twice (e.g. externalIP == LB IP)
                    Some(owner) => errors.push(ObjectError {
                        kind: ObjectKind::Service,
                        namespace: Some(info.namespace.clone()),
                        name: info.name.clone(),
                        field,
                        value: Some(value),
                        message: format!(
                            "frontend {} is already served by {owner}; skipped",
                            describe_frontend(&fe)
                        ),
                    }),
                    None => {
                        claims.insert(key, spn.clone());
                        frontends.insert(fe);
                    }
                }
            }
            if frontends.is_empty() {
                continue;
            }
            if info.flags & lb_common::service_flags::SOURCE_RANGES != 0 {
                out.source_ranges
                    .insert(spn.clone(), info.source_ranges.clone());
            }
            out.state.services.insert(
                spn,
                DesiredServicePort {
                    frontends,
                    backends: sets.cluster,
                    local_backends: sets.local,
                    flags: info.flags,
                    affinity_timeout_sec: info.affinity_timeout_sec,
                },
            );
        }
        if let Some(node_port) = info.health_check_node_port {
            out.health_checks.push(HealthCheck {
                namespace: info.namespace.clone(),
                name: info.name.clone(),
                node_port,
                local_endpoints: local_ready_total,
            });
        }
    }
    out.health_checks.sort();
    // Stable sort: field order within one object is kept.
    errors.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    out.errors = errors;
    out
}

fn describe_frontend(fe: &crate::state::Frontend) -> String {
    match fe.addr {
        Some(a) => format!("{a}:{}/{}", fe.port, fe.protocol),
        None => format!("node port {}/{}", fe.port, fe.protocol),
    }
}

/// Sort key for "older first"; objects without a creationTimestamp sort last.
fn creation_key(meta: &ObjectMeta) -> (bool, Option<k8s_openapi::jiff::Timestamp>) {
    match &meta.creation_timestamp {
        Some(t) => (false, Some(t.0)),
        None => (true, None),
    }
}

/// `default` when unset (manifest input; the API server always sets it).
fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    }
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

/// W1: the object belongs to another proxy, or is a headless Service's.
fn is_foreign(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

/// Collects errors about one object.
struct Reporter<'a> {
    kind: ObjectKind,
    namespace: String,
    name: String,
    errors: &'a mut Vec<ObjectError>,
    count: usize,
}

impl<'a> Reporter<'a> {
    fn new(kind: ObjectKind, meta: &ObjectMeta, errors: &'a mut Vec<ObjectError>) -> Self {
        Self {
            kind,
            namespace: namespace_of(meta).to_string(),
            name: name_of(meta).to_string(),
            errors,
            count: 0,
        }
    }

    fn error(
        &mut self,
        field: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        self.count += 1;
        self.errors.push(ObjectError {
            kind: self.kind,
            namespace: Some(self.namespace.clone()),
            name: self.name.clone(),
            field: field.into(),
            value,
            message: message.into(),
        });
    }
}

/// A port-like number that must be 1..=65535.
fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn quoted(s: &str) -> Option<String> {
    Some(format!("{s:?}"))
}
