//! The model: Kubernetes Services and EndpointSlices -> what THIS node's
//! datapath must be programmed with.
//!
//! Two stages, so that a source can keep the first one's output instead of
//! the objects:
//! 1. **parse** each object once into a validated input:
//!    [`ParsedService::parse`] and [`ParsedSlice::parse`] apply every rule
//!    that needs only the object (W1-W6, F1, F4-F9, E5, H1 fields) and
//!    report what is wrong with it as [`ObjectError`]s naming the field;
//! 2. **compute** one Service's service ports from its parsed Service and
//!    slices ([`compute_service`]: W3, W4, E3, E6, H1 counts).
//!
//! [`desired_state`] runs both over whole lists (manifest mode, tests).
//!
//! Pure and deterministic: no I/O, no clock, no randomness; the same objects
//! in any order give the same output. Frontend conflicts between service
//! ports are not decided here but by the planner, in one place (C7).
//!
//! Bad input is rejected per object, and as narrowly as makes sense:
//! - a Service-wide field that is wrong (type, clusterIP, sessionAffinity,
//!   traffic policies, loadBalancerSourceRanges, a name longer than
//!   Kubernetes allows) skips the whole Service;
//! - a wrong port (protocol, port, nodePort, targetPort, name, duplicate
//!   name) skips that port only;
//! - a wrong externalIPs / ingress entry skips that frontend only;
//! - a wrong EndpointSlice port or endpoint skips that port or endpoint.
//!
//! Objects that are not ours (W1 labels, headless, ExternalName, IPv6-only
//! Services, IPv6/FQDN slices) are skipped silently: they are not errors.

mod endpoints;
mod intern;
mod service;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use endpoints::{ParsedSlice, SliceInfo};
pub use intern::Interner;
pub use service::{ParsedService, ServiceInfo};

use crate::desired::{DesiredServicePort, DesiredState, ServicePortName, ServiceRef};

/// W1: Services/EndpointSlices with this label belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// W1: set by the EndpointSlice controller on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// W3: the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// E6: the zone label of a Node.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// W1: the label selector watchers use for Services and EndpointSlices
/// (the model applies the same filter itself for manifest input).
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Most frontends (ports x addresses, plus node ports) one Service may
/// have: a Service with 100k externalIPs or 10k ports is rejected as a
/// whole, not allowed to fill LB_SERVICES (131,072 entries) for everyone.
pub const MAX_FRONTENDS_PER_SERVICE: usize = 4096;
/// Most loadBalancerSourceRanges one Service may have (LB_SOURCE_RANGES holds
/// 65,536 for all).
pub const MAX_SOURCE_RANGES_PER_SERVICE: usize = 1024;

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

    /// The `apiVersion` of objects of this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            ObjectKind::Service | ObjectKind::Node => "v1",
            ObjectKind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which object something is about: enough to name it in a log line and to
/// attach a Kubernetes Event to it (uid, resourceVersion).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

impl ObjectRef {
    fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: namespace_of(meta).to_string(),
            name: name_of(meta).to_string(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
        }
    }
}

/// A problem with one object (or one part of it) that the model skipped.
/// Displays as one line, e.g.
/// `Service default/web: spec.clusterIP "10.0.0.300": not an IPv4 address`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
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

/// What one Service and its slices give this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceOutput {
    /// Sorted by name. A Vec: a Service has a handful of ports.
    pub ports: Vec<(ServicePortName, DesiredServicePort)>,
    pub health_check: Option<HealthCheck>,
}

impl ServiceOutput {
    pub fn port(&self, name: &ServicePortName) -> Option<&DesiredServicePort> {
        self.ports
            .binary_search_by(|(n, _)| n.cmp(name))
            .ok()
            .map(|i| &self.ports[i].1)
    }
}

/// Stage 2: one Service's service ports, from its validated input and the
/// validated slices that belong to it (in any order).
pub fn compute_service(
    ctx: &NodeContext,
    service: &ServiceInfo,
    slices: &[&SliceInfo],
) -> ServiceOutput {
    let mut slices = slices.to_vec();
    // W3: duplicates across slices are resolved in slice name order.
    slices.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = ServiceOutput::default();
    let mut local_ready_total = 0usize;
    for port in &service.ports {
        let name = ServicePortName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol,
        };
        let eps = endpoints::collect(&slices, &port.name, port.protocol);
        local_ready_total += eps.iter().filter(|e| e.local && e.ready).count();
        let sets = endpoints::categorize(&eps, ctx.zone.as_deref());
        let frontends = service.frontends(port);
        if frontends.is_empty() {
            continue;
        }
        out.ports.push((
            name,
            DesiredServicePort {
                frontends,
                backends: sets.cluster,
                local_backends: sets.local,
                flags: service.flags,
                affinity_timeout_sec: service.affinity_timeout_sec,
                source_ranges: service.source_ranges.clone(),
                created: service.created,
            },
        ));
    }
    out.ports.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(node_port) = service.health_check_node_port {
        out.health_check = Some(HealthCheck {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            node_port,
            local_endpoints: local_ready_total,
        });
    }
    out
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
}

/// Both stages over whole lists of objects. Pure; see the module docs. An
/// object listed twice (same namespace/name) is an error; the first one is
/// used.
pub fn desired_state(
    ctx: &NodeContext,
    services: &[Service],
    slices: &[EndpointSlice],
) -> ModelOutput {
    let mut errors = Vec::new();
    let mut strings = Interner::default();

    let mut parsed: BTreeMap<ServiceRef, ParsedService> = BTreeMap::new();
    for svc in services {
        let p = ParsedService::parse(svc);
        let key = p.service_ref();
        if parsed.contains_key(&key) {
            errors.push(duplicate(ObjectKind::Service, &key));
            continue;
        }
        parsed.insert(key, p);
    }
    let mut by_owner: BTreeMap<ServiceRef, Vec<SliceInfo>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for slice in slices {
        let p = ParsedSlice::parse(slice, &ctx.node_name, &mut strings);
        if p.owner.is_none() && p.errors.is_empty() {
            continue; // W1: not ours
        }
        if !seen.insert(p.key()) {
            errors.push(duplicate(ObjectKind::EndpointSlice, &p.key()));
            continue;
        }
        errors.extend(p.errors);
        if let (Some(owner), Some(info)) = (p.owner, p.info) {
            by_owner.entry(owner).or_default().push(info);
        }
    }

    let mut out = ModelOutput::default();
    for (key, p) in parsed {
        errors.extend(p.errors);
        let Some(info) = &p.info else { continue };
        let slices: Vec<&SliceInfo> = by_owner.get(&key).into_iter().flatten().collect();
        let svc_out = compute_service(ctx, info, &slices);
        out.state.services.extend(svc_out.ports);
        out.health_checks.extend(svc_out.health_check);
    }
    out.health_checks.sort();
    // Stable sort: field order within one object is kept.
    errors.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    out.errors = errors;
    out
}

fn duplicate(kind: ObjectKind, key: &ServiceRef) -> ObjectError {
    ObjectError {
        kind,
        namespace: Some(key.namespace.clone()),
        name: key.name.clone(),
        field: "metadata.name".into(),
        value: None,
        message: format!("the same {kind} appears twice; the second one is ignored"),
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
struct Reporter {
    kind: ObjectKind,
    namespace: String,
    name: String,
    errors: Vec<ObjectError>,
}

impl Reporter {
    fn new(kind: ObjectKind, meta: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: namespace_of(meta).to_string(),
            name: name_of(meta).to_string(),
            errors: Vec::new(),
        }
    }

    fn count(&self) -> usize {
        self.errors.len()
    }

    fn error(
        &mut self,
        field: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
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
