//! Cluster mode's source: the objects the watchers deliver, kept per Service,
//! and the per-Service model output they produce.
//!
//! A watch event touches one Service (a Service event, or an EndpointSlice
//! event of the Service named by its `kubernetes.io/service-name` label). Only
//! that Service is recomputed through the pure model, and only its service
//! ports are handed to the planner: the cost of an event does not grow with
//! the number of Services. An initial list or a relist (after 410 Gone or a
//! reconnect) replaces a whole kind at once; the Services whose objects
//! differ are marked, and the agent diffs the complete desired state against
//! the maps: never a flush.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{self, HealthCheck, NodeContext, ObjectError, ObjectKind, LABEL_SERVICE_NAME};
use crate::state::{DesiredServicePort, DesiredState, ServicePortName};

/// namespace/name of a Service (also the owner key of its slices).
pub type ServiceRef = (String, String);

fn key_of(meta: &ObjectMeta) -> ServiceRef {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Shares the strings many objects repeat (node names, zones, namespaces,
/// label keys, protocols): one allocation each instead of one per endpoint.
#[derive(Debug, Default)]
pub struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: String) -> Arc<str> {
        if let Some(a) = self.0.get(s.as_str()) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
        a
    }

    /// Forgets the strings nothing else holds any more.
    pub fn prune(&mut self) {
        self.0.retain(|a| Arc::strong_count(a) > 1);
    }
}

/// The parts of an EndpointSlice the model reads. The k8s-openapi struct
/// spends 352 bytes on every endpoint before its strings; at 10,000 Services
/// with 10 endpoints each that alone is most of the agent's memory.
#[derive(Clone, Debug, PartialEq)]
pub struct SlimSlice {
    name: Box<str>,
    namespace: Arc<str>,
    /// Only the labels the model looks at (W1, W3). A Vec: one or two
    /// entries, where a map would allocate a whole node.
    labels: Box<[(Arc<str>, Box<str>)]>,
    uid: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    address_type: Arc<str>,
    ports: Option<Box<[SlimPort]>>,
    endpoints: Box<[SlimEndpoint]>,
}

#[derive(Clone, Debug, PartialEq)]
struct SlimPort {
    name: Option<Box<str>>,
    port: Option<i32>,
    protocol: Option<Arc<str>>,
    app_protocol: Option<Arc<str>>,
}

/// An endpoint's first address: parsed when it is an IPv4 address that
/// prints back exactly as given, the original text otherwise (so the model
/// sees, and reports, exactly what the API server sent).
#[derive(Clone, Debug, PartialEq)]
enum SlimAddr {
    None,
    V4(Ipv4Addr),
    Other(Box<str>),
}

impl SlimAddr {
    fn new(a: Option<String>) -> Self {
        match a {
            None => SlimAddr::None,
            Some(a) => match a.parse::<Ipv4Addr>() {
                Ok(ip) if ip.to_string() == a => SlimAddr::V4(ip),
                _ => SlimAddr::Other(a.into()),
            },
        }
    }

    fn to_string_opt(&self) -> Option<String> {
        match self {
            SlimAddr::None => None,
            SlimAddr::V4(ip) => Some(ip.to_string()),
            SlimAddr::Other(s) => Some(s.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct SlimEndpoint {
    /// W3: only the first address is used.
    address: SlimAddr,
    node_name: Option<Arc<str>>,
    for_zones: Option<Box<[Arc<str>]>>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

impl From<EndpointSlice> for SlimSlice {
    /// With an interner of its own (tests); the cache shares one.
    fn from(s: EndpointSlice) -> Self {
        SlimSlice::new(s, &mut Interner::default())
    }
}

impl SlimSlice {
    pub fn new(s: EndpointSlice, strings: &mut Interner) -> Self {
        let labels = s
            .metadata
            .labels
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| {
                k == LABEL_SERVICE_NAME
                    || k == model::LABEL_SERVICE_PROXY_NAME
                    || k == model::LABEL_HEADLESS
            })
            .map(|(k, v)| (strings.get(k), v.into_boxed_str()))
            .collect();
        SlimSlice {
            name: s.metadata.name.unwrap_or_default().into(),
            namespace: strings.get(s.metadata.namespace.unwrap_or_else(|| "default".into())),
            labels,
            uid: s.metadata.uid.map(String::into_boxed_str),
            resource_version: s.metadata.resource_version.map(String::into_boxed_str),
            address_type: strings.get(s.address_type),
            ports: s.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|p| SlimPort {
                        name: p.name.map(String::into_boxed_str),
                        port: p.port,
                        protocol: p.protocol.map(|x| strings.get(x)),
                        app_protocol: p.app_protocol.map(|x| strings.get(x)),
                    })
                    .collect()
            }),
            endpoints: s
                .endpoints
                .into_iter()
                .map(|e| {
                    let c = e.conditions.unwrap_or_default();
                    SlimEndpoint {
                        address: SlimAddr::new(e.addresses.into_iter().next()),
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                        node_name: e.node_name.map(|n| strings.get(n)),
                        for_zones: e
                            .hints
                            .and_then(|h| h.for_zones)
                            .map(|z| z.into_iter().map(|z| strings.get(z.name)).collect()),
                    }
                })
                .collect(),
        }
    }

    fn key(&self) -> ServiceRef {
        (self.namespace.to_string(), self.name.to_string())
    }

    fn owner(&self) -> Option<ServiceRef> {
        self.labels
            .iter()
            .find(|(k, _)| &**k == LABEL_SERVICE_NAME)
            .map(|(_, n)| (self.namespace.to_string(), n.to_string()))
    }

    /// Back to the API type, for the model (transient: one Service's slices).
    fn to_slice(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(self.name.to_string()),
                namespace: Some(self.namespace.to_string()),
                labels: Some(
                    self.labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                uid: self.uid.as_deref().map(str::to_string),
                resource_version: self.resource_version.as_deref().map(str::to_string),
                ..ObjectMeta::default()
            },
            address_type: self.address_type.to_string(),
            ports: self.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| EndpointPort {
                        name: p.name.as_deref().map(str::to_string),
                        port: p.port,
                        protocol: p.protocol.as_deref().map(str::to_string),
                        app_protocol: p.app_protocol.as_deref().map(str::to_string),
                    })
                    .collect()
            }),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: e.address.to_string_opt().into_iter().collect(),
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    node_name: e.node_name.as_deref().map(str::to_string),
                    hints: e.for_zones.as_ref().map(|z| EndpointHints {
                        for_zones: Some(
                            z.iter()
                                .map(|name| ForZone {
                                    name: name.to_string(),
                                })
                                .collect(),
                        ),
                        ..EndpointHints::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }
}

/// Drops what the model never reads and can be large (managedFields, the
/// last-applied annotation, status conditions) before a Service is kept.
fn slim_service(mut s: Service) -> Service {
    s.metadata.managed_fields = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("service.kubernetes.io/"));
    }
    if let Some(st) = s.status.as_mut() {
        st.conditions = None;
    }
    s
}

/// A listed Service in the form the cache keeps it: converted in the
/// watcher's task, so full objects never queue up in the channel.
#[derive(Debug)]
pub struct ListedService(ServiceRef, PackedService);

impl ListedService {
    pub fn new(s: Service) -> Self {
        let s = slim_service(s);
        ListedService(key_of(&s.metadata), PackedService::new(&s))
    }
}

/// Services of a list in progress, slimmed and keyed as they arrive (one
/// copy of each, never a Vec of full objects and a map of slim ones). The
/// last of two objects with the same namespace/name wins.
#[derive(Debug, Default)]
pub struct ServiceList(BTreeMap<ServiceRef, PackedService>);

impl ServiceList {
    pub fn push(&mut self, s: Service) {
        self.push_listed(ListedService::new(s));
    }

    pub fn push_listed(&mut self, s: ListedService) {
        self.0.insert(s.0, s.1);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A kept Service: the slimmed object as compact JSON. A k8s-openapi
/// `Service` is 824 bytes before its strings, most of them empty options;
/// its JSON holds only what is set. Read back (exactly: the types round-trip
/// through serde) only to run the model on it or to name it in an Event.
/// Equal objects give equal text (maps serialize in key order).
#[derive(Clone, Debug, PartialEq)]
struct PackedService(Box<str>);

impl PackedService {
    fn new(s: &Service) -> Self {
        PackedService(
            serde_json::to_string(s)
                .expect("a Service serializes")
                .into_boxed_str(),
        )
    }

    fn unpack(&self) -> Service {
        serde_json::from_str(&self.0).expect("a packed Service reads back")
    }
}

fn find_port<'a>(
    ports: &'a [(ServicePortName, DesiredServicePort)],
    name: &ServicePortName,
) -> Option<&'a DesiredServicePort> {
    ports.iter().find(|(n, _)| n == name).map(|(_, p)| p)
}

/// What the model made of one Service and its slices. Vecs, not maps: a
/// Service has a handful of ports, and 10,000 map nodes cost tens of MiB.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceOutput {
    /// Sorted by name.
    pub ports: Vec<(ServicePortName, DesiredServicePort)>,
    pub health_checks: Vec<HealthCheck>,
    pub errors: Vec<ObjectError>,
}

/// What changed since the last [`ClusterCache::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Service ports to program (`None`: remove).
    pub ports: BTreeMap<ServicePortName, Option<DesiredServicePort>>,
    /// A kind was relisted or the node changed: diff everything.
    pub full: bool,
    /// Errors not reported before, with the object they are about.
    pub new_errors: Vec<(ObjectReference, ObjectError)>,
    /// Services that were recomputed.
    pub services_touched: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && !self.full && self.new_errors.is_empty()
    }
}

/// Objects by Service, and the model output per Service.
#[derive(Debug)]
pub struct ClusterCache {
    ctx: NodeContext,
    services: BTreeMap<ServiceRef, PackedService>,
    /// Slices grouped by the Service they belong to, sorted by slice name
    /// (usually one or two: a Vec, not a map).
    slices: BTreeMap<ServiceRef, Vec<SlimSlice>>,
    /// slice namespace/name -> its owner, to follow label changes and deletes.
    slice_owner: BTreeMap<ServiceRef, ServiceRef>,
    outputs: BTreeMap<ServiceRef, ServiceOutput>,
    dirty: BTreeSet<ServiceRef>,
    full: bool,
    strings: Interner,
}

impl ClusterCache {
    pub fn new(ctx: NodeContext) -> Self {
        Self {
            ctx,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            outputs: BTreeMap::new(),
            dirty: BTreeSet::new(),
            full: true,
            strings: Interner::default(),
        }
    }

    pub fn node_context(&self) -> &NodeContext {
        &self.ctx
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slice_owner.len()
    }

    pub fn apply_service(&mut self, svc: Service) {
        let svc = slim_service(svc);
        let k = key_of(&svc.metadata);
        let svc = PackedService::new(&svc);
        if self.services.get(&k) != Some(&svc) {
            self.services.insert(k.clone(), svc);
            self.dirty.insert(k);
        }
    }

    pub fn delete_service(&mut self, svc: &Service) {
        let k = key_of(&svc.metadata);
        if self.services.remove(&k).is_some() {
            self.dirty.insert(k);
        }
    }

    /// The slim form of a slice, sharing this cache's strings.
    pub fn slim_slice(&mut self, slice: EndpointSlice) -> SlimSlice {
        SlimSlice::new(slice, &mut self.strings)
    }

    pub fn apply_slice(&mut self, slice: EndpointSlice) {
        let slice = self.slim_slice(slice);
        let k = slice.key();
        let owner = slice.owner();
        // The service-name label can change: the old owner loses the slice.
        if let Some(old) = self.slice_owner.get(&k).cloned() {
            if Some(&old) != owner.as_ref() {
                self.remove_slice_from(&old, &k.1);
                self.slice_owner.remove(&k);
                self.dirty.insert(old);
            }
        }
        let Some(owner) = owner else {
            return; // W3: not attributable; the model would only report it
        };
        let group = self.slices.entry(owner.clone()).or_default();
        match group.binary_search_by(|s| (*s.name).cmp(k.1.as_str())) {
            Ok(i) if group[i] == slice => {}
            Ok(i) => {
                group[i] = slice;
                self.dirty.insert(owner.clone());
            }
            Err(i) => {
                group.insert(i, slice);
                group.shrink_to_fit();
                self.dirty.insert(owner.clone());
            }
        }
        self.slice_owner.insert(k, owner);
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        let k = key_of(&slice.metadata);
        if let Some(owner) = self.slice_owner.remove(&k) {
            self.remove_slice_from(&owner, &k.1);
            self.dirty.insert(owner);
        }
    }

    fn remove_slice_from(&mut self, owner: &ServiceRef, name: &str) {
        if let Some(group) = self.slices.get_mut(owner) {
            group.retain(|s| &*s.name != name);
            if group.is_empty() {
                self.slices.remove(owner);
            }
        }
    }

    /// A complete list of Services (initial list or relist).
    pub fn replace_services(&mut self, all: Vec<Service>) {
        let mut new = ServiceList::default();
        for s in all {
            new.push(s);
        }
        self.replace_service_list(new);
    }

    /// [`ClusterCache::replace_services`] from a list gathered as it arrived.
    pub fn replace_service_list(&mut self, new: ServiceList) {
        let new = new.0;
        for (k, old) in &self.services {
            if new.get(k) != Some(old) {
                self.dirty.insert(k.clone());
            }
        }
        for (k, s) in &new {
            if self.services.get(k) != Some(s) {
                self.dirty.insert(k.clone());
            }
        }
        self.services = new;
        self.full = true;
    }

    /// A complete list of EndpointSlices (initial list or relist); convert
    /// each with [`ClusterCache::slim_slice`] as it arrives.
    pub fn replace_slices(&mut self, all: Vec<SlimSlice>) {
        let old_slices = std::mem::take(&mut self.slices);
        self.slice_owner.clear();
        for s in all {
            let k = s.key();
            if let Some(owner) = s.owner() {
                self.slice_owner.insert(k.clone(), owner.clone());
                self.slices.entry(owner).or_default().push(s);
            }
        }
        for group in self.slices.values_mut() {
            group.sort_by(|a, b| a.name.cmp(&b.name));
            group.dedup_by(|a, b| a.name == b.name);
            // Usually one slice: not the 4 a first push reserves.
            group.shrink_to_fit();
        }
        let owners: BTreeSet<&ServiceRef> = old_slices.keys().chain(self.slices.keys()).collect();
        for o in owners {
            if old_slices.get(o) != self.slices.get(o) {
                self.dirty.insert(o.clone());
            }
        }
        drop(old_slices);
        self.strings.prune();
        self.full = true;
    }

    /// This node's Node object: its zone decides topology hints (E6) for
    /// every Service.
    pub fn set_node(&mut self, node: &Node) {
        let ctx = NodeContext::with_node(self.ctx.node_name.clone(), Some(node));
        if ctx != self.ctx {
            self.ctx = ctx;
            self.dirty.extend(self.services.keys().cloned());
            self.full = true;
        }
    }

    /// Recomputes the dirty Services and returns what changed.
    pub fn take_changes(&mut self) -> Changes {
        self.take_changes_inner(true)
    }

    /// [`ClusterCache::take_changes`] for a caller that plans a full diff
    /// from [`ClusterCache::desired_ports`] whenever `full` is set: then
    /// `ports` is left empty instead of holding a copy of every port.
    pub fn take_changes_for_plan(&mut self) -> Changes {
        self.take_changes_inner(false)
    }

    fn take_changes_inner(&mut self, ports_when_full: bool) -> Changes {
        let mut changes = Changes {
            full: std::mem::take(&mut self.full),
            ..Changes::default()
        };
        let dirty = std::mem::take(&mut self.dirty);
        changes.services_touched = dirty.len();
        let list_ports = ports_when_full || !changes.full;
        for k in dirty {
            let new = match self.services.get(&k) {
                Some(svc) => {
                    let svc = svc.unpack();
                    let slices: Vec<EndpointSlice> = self
                        .slices
                        .get(&k)
                        .map(|g| g.iter().map(SlimSlice::to_slice).collect())
                        .unwrap_or_default();
                    let out = model::desired_state(&self.ctx, std::slice::from_ref(&svc), &slices);
                    ServiceOutput {
                        ports: out.state.services.into_iter().collect(),
                        health_checks: out.health_checks,
                        errors: out.errors,
                    }
                }
                None => ServiceOutput::default(),
            };
            let old = self.outputs.remove(&k).unwrap_or_default();
            for (name, port) in new.ports.iter().filter(|_| list_ports) {
                if find_port(&old.ports, name) != Some(port) {
                    changes.ports.insert(name.clone(), Some(port.clone()));
                }
            }
            for (name, _) in old.ports.iter().filter(|_| list_ports) {
                if find_port(&new.ports, name).is_none() {
                    changes.ports.insert(name.clone(), None);
                }
            }
            for e in &new.errors {
                if !old.errors.contains(e) {
                    if let Some(r) = self.reference_of(e) {
                        changes.new_errors.push((r, e.clone()));
                    }
                }
            }
            if new != ServiceOutput::default() {
                self.outputs.insert(k, new);
            }
        }
        changes
    }

    /// The complete desired state, from the per-Service outputs.
    pub fn desired_state(&self) -> DesiredState {
        let mut d = DesiredState::default();
        for out in self.outputs.values() {
            for (k, v) in &out.ports {
                d.services.insert(k.clone(), v.clone());
            }
        }
        d
    }

    /// Every service port of the desired state, borrowed, in
    /// [`DesiredState`] order (for [`crate::sync::SyncState::plan_full_ports`]).
    pub fn desired_ports(&self) -> impl Iterator<Item = (&ServicePortName, &DesiredServicePort)> {
        self.outputs
            .values()
            .flat_map(|o| o.ports.iter().map(|(k, v)| (k, v)))
    }

    /// H1: every health-check node port of this node.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        let mut v: Vec<HealthCheck> = self
            .outputs
            .values()
            .flat_map(|o| o.health_checks.iter().cloned())
            .collect();
        v.sort();
        v
    }

    /// The API object an error is about (for its Event).
    /// The API object of a Service, for an Event about it.
    pub fn service_reference(&self, namespace: &str, name: &str) -> Option<ObjectReference> {
        let meta = self
            .services
            .get(&(namespace.to_string(), name.to_string()))?
            .unpack()
            .metadata;
        Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
            resource_version: meta.resource_version,
            ..ObjectReference::default()
        })
    }

    fn reference_of(&self, e: &ObjectError) -> Option<ObjectReference> {
        let ns = e.namespace.clone().unwrap_or_else(|| "default".into());
        let (api_version, kind, meta) = match e.kind {
            ObjectKind::Service => {
                let s = self.services.get(&(ns.clone(), e.name.clone()))?;
                ("v1", "Service", s.unpack().metadata)
            }
            ObjectKind::EndpointSlice => {
                let owner = self.slice_owner.get(&(ns.clone(), e.name.clone()))?;
                let s = self
                    .slices
                    .get(owner)?
                    .iter()
                    .find(|s| *s.name == *e.name)?;
                return Some(ObjectReference {
                    api_version: Some("discovery.k8s.io/v1".into()),
                    kind: Some("EndpointSlice".into()),
                    namespace: Some(s.namespace.to_string()),
                    name: Some(s.name.to_string()),
                    uid: s.uid.as_deref().map(str::to_string),
                    resource_version: s.resource_version.as_deref().map(str::to_string),
                    ..ObjectReference::default()
                });
            }
            ObjectKind::Node => return None,
        };
        Some(ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectReference::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Protocol;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn web(cluster_ip: &str) -> Service {
        svc(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default, uid: u1}}\n\
             spec:\n  clusterIP: {cluster_ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"
        ))
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
        let mut y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for ip in ips {
            y.push_str(&format!("- addresses: [{ip}]\n  nodeName: n1\n"));
        }
        if ips.is_empty() {
            y.push_str("  []\n");
        }
        serde_yaml::from_str(&y).unwrap()
    }

    fn http() -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    fn cache() -> ClusterCache {
        ClusterCache::new(NodeContext::new("n1", None))
    }

    fn backends(c: &Changes) -> Vec<String> {
        c.ports[&http()]
            .as_ref()
            .unwrap()
            .backends
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    #[test]
    fn an_endpoint_change_touches_only_its_service() {
        let mut c = cache();
        c.replace_services(vec![web("10.96.0.10")]);
        c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"]).into()]);
        let first = c.take_changes();
        assert!(first.full);
        assert_eq!(backends(&first), vec!["10.244.1.2"]);

        c.apply_slice(slice("web-1", "web", &["10.244.1.2", "10.244.1.3"]));
        let ch = c.take_changes();
        assert!(!ch.full);
        assert_eq!(ch.services_touched, 1);
        assert_eq!(backends(&ch), vec!["10.244.1.2", "10.244.1.3"]);

        // The same object again: nothing to do.
        c.apply_slice(slice("web-1", "web", &["10.244.1.2", "10.244.1.3"]));
        assert!(c.take_changes().is_empty());
    }

    #[test]
    fn slices_of_one_service_merge_and_deletes_follow() {
        let mut c = cache();
        c.apply_service(web("10.96.0.10"));
        c.apply_slice(slice("web-1", "web", &["10.244.1.2"]));
        c.apply_slice(slice("web-2", "web", &["10.244.1.3"]));
        assert_eq!(
            backends(&c.take_changes()),
            vec!["10.244.1.2", "10.244.1.3"]
        );
        c.delete_slice(&slice("web-1", "web", &[]));
        assert_eq!(backends(&c.take_changes()), vec!["10.244.1.3"]);
    }

    #[test]
    fn a_slice_moving_to_another_service_leaves_the_first() {
        let mut c = cache();
        c.apply_service(web("10.96.0.10"));
        c.apply_slice(slice("s", "web", &["10.244.1.2"]));
        c.take_changes();
        c.apply_slice(slice("s", "other", &["10.244.1.2"]));
        let ch = c.take_changes();
        assert_eq!(ch.ports[&http()].as_ref().unwrap().backends, vec![]);
    }

    #[test]
    fn deleting_a_service_removes_its_ports() {
        let mut c = cache();
        c.apply_service(web("10.96.0.10"));
        c.take_changes();
        c.delete_service(&web("10.96.0.10"));
        let ch = c.take_changes();
        assert_eq!(ch.ports.get(&http()), Some(&None));
        assert!(c.desired_state().services.is_empty());
    }

    #[test]
    fn a_relist_marks_only_what_differs_and_asks_for_a_full_diff() {
        let mut c = cache();
        c.replace_services(vec![web("10.96.0.10")]);
        c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"]).into()]);
        c.take_changes();
        // Same objects again (a relist after 410 Gone): nothing recomputed.
        c.replace_services(vec![web("10.96.0.10")]);
        c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"]).into()]);
        let ch = c.take_changes();
        assert!(ch.full);
        assert_eq!(ch.services_touched, 0);
        assert!(ch.ports.is_empty());
        assert_eq!(c.desired_state().services.len(), 1);
        assert!(c
            .desired_ports()
            .map(|(k, v)| (k.clone(), v.clone()))
            .eq(c.desired_state().services));
        // A slice vanished while disconnected.
        c.replace_slices(vec![]);
        let ch = c.take_changes();
        assert_eq!(ch.services_touched, 1);
        assert!(backends(&ch).is_empty());
    }

    #[test]
    fn a_full_change_for_the_planner_leaves_the_ports_to_desired_ports() {
        let mut c = cache();
        c.replace_services(vec![web("10.96.0.10")]);
        c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"]).into()]);
        let ch = c.take_changes_for_plan();
        assert!(ch.full && ch.ports.is_empty() && !ch.is_empty());
        assert_eq!(ch.services_touched, 1);
        let ports: Vec<_> = c.desired_ports().collect();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].0, &http());
        // Not full: the changed ports, as take_changes gives them.
        c.apply_slice(slice("web-1", "web", &["10.244.1.3"]));
        let ch = c.take_changes_for_plan();
        assert!(!ch.full);
        assert_eq!(backends(&ch), vec!["10.244.1.3"]);
    }

    #[test]
    fn bad_objects_are_reported_once_with_their_reference() {
        let mut c = cache();
        c.apply_service(web("10.96.0.300"));
        let ch = c.take_changes();
        assert!(ch.ports.is_empty());
        assert_eq!(ch.new_errors.len(), 1, "{:?}", ch.new_errors);
        let (r, e) = &ch.new_errors[0];
        assert_eq!(r.kind.as_deref(), Some("Service"));
        assert_eq!(r.uid.as_deref(), Some("u1"));
        assert!(e.to_string().contains("spec.clusterIP"), "{e}");
        // Unchanged: not reported again; fixed: programmed.
        c.apply_slice(slice("web-1", "web", &["10.244.1.2"]));
        assert!(c.take_changes().new_errors.is_empty());
        c.apply_service(web("10.96.0.30"));
        let ch = c.take_changes();
        assert!(ch.new_errors.is_empty());
        assert_eq!(backends(&ch), vec!["10.244.1.2"]);
    }

    #[test]
    fn slim_slices_give_the_model_the_same_answers() {
        // W3 (first address), W5 (nil conditions), W6 (nodeName), E3
        // (terminating fallback), E6 (hints), W1 labels, bad addresses.
        let y = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: s, namespace: default, uid: u9, labels: {kubernetes.io/service-name: web, other: x}, annotations: {a: b}}\n\
                 addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP, appProtocol: h2c}, {port: 53, protocol: UDP}]\nendpoints:\n\
                 - {addresses: [10.244.1.2, 10.244.1.99], nodeName: n1, zone: a, hints: {forZones: [{name: a}]}}\n\
                 - {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: b}]}}\n\
                 - {addresses: [not-an-ip], conditions: {ready: true}}\n\
                 - {addresses: [10.244.01.5], nodeName: n2}\n\
                 - {addresses: ['::1'], nodeName: n2}\n\
                 - {addresses: [' 10.244.1.6'], nodeName: n1}\n\
                 - {addresses: []}\n";
        let full: EndpointSlice = serde_yaml::from_str(y).unwrap();
        let slim = SlimSlice::from(full.clone()).to_slice();
        // The kept fields come back exactly as sent.
        let first = |s: &EndpointSlice| -> Vec<Vec<String>> {
            s.endpoints
                .iter()
                .map(|e| e.addresses.iter().take(1).cloned().collect())
                .collect()
        };
        assert_eq!(first(&slim), first(&full));
        assert_eq!(slim.ports, full.ports);
        assert_eq!(slim.metadata.uid, full.metadata.uid);
        // Shared strings do not change what a slice is equal to.
        let mut strings = Interner::default();
        let x = SlimSlice::new(full.clone(), &mut strings);
        assert_eq!(x, SlimSlice::new(full.clone(), &mut strings));
        assert_eq!(x, SlimSlice::from(full.clone()));
        let svc = svc("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default, annotations: {service.kubernetes.io/topology-mode: Auto}}\n\
             spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n");
        for zone in [None, Some("a".to_string()), Some("b".to_string())] {
            let ctx = NodeContext::new("n1", zone);
            let a = model::desired_state(
                &ctx,
                std::slice::from_ref(&svc),
                std::slice::from_ref(&full),
            );
            let b = model::desired_state(
                &ctx,
                std::slice::from_ref(&svc),
                std::slice::from_ref(&slim),
            );
            assert_eq!(a.state, b.state);
            assert_eq!(a.errors, b.errors);
            assert_eq!(a.health_checks, b.health_checks);
            assert!(!a.errors.is_empty(), "the bad endpoints are reported");
        }
    }

    #[test]
    fn packed_services_read_back_exactly() {
        let y = "apiVersion: v1\nkind: Service\n\
                 metadata: {name: web, namespace: default, uid: u1, resourceVersion: '7', creationTimestamp: '2024-01-02T03:04:05Z', labels: {a: b}, annotations: {service.kubernetes.io/topology-mode: Auto}}\n\
                 spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n  externalIPs: [192.0.2.1]\n\
                 \x20 externalTrafficPolicy: Local\n  internalTrafficPolicy: Cluster\n  healthCheckNodePort: 30001\n\
                 \x20 sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  selector: {}\n\
                 \x20 ports:\n  - {name: http, port: 80, targetPort: web, nodePort: 30080, protocol: TCP, appProtocol: http}\n\
                 \x20 - {port: 53, targetPort: 53, protocol: UDP}\n\
                 status: {loadBalancer: {ingress: [{ip: 192.0.2.9, ipMode: VIP}]}}\n";
        let full = slim_service(svc(y));
        assert_eq!(PackedService::new(&full).unpack(), full);
        assert_eq!(PackedService::new(&full), PackedService::new(&full.clone()));
        let mut c = cache();
        c.apply_service(svc(y));
        let ch = c.take_changes();
        let mut plain = cache();
        let out = model::desired_state(&plain.ctx, std::slice::from_ref(&full), &[]);
        assert_eq!(
            c.desired_state(),
            out.state,
            "{:?} {:?}",
            ch.new_errors,
            out.errors
        );
        assert_eq!(c.health_checks(), out.health_checks);
        plain.apply_service(svc(y));
        assert_eq!(plain.take_changes().new_errors, ch.new_errors);
    }

    #[test]
    fn e6_a_zone_change_recomputes_every_service() {
        let mut c = cache();
        c.apply_service(web("10.96.0.10"));
        c.take_changes();
        let node: Node = serde_yaml::from_str(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}\n",
        )
        .unwrap();
        c.set_node(&node);
        let ch = c.take_changes();
        assert!(ch.full);
        assert_eq!(ch.services_touched, 1);
        assert_eq!(c.node_context().zone.as_deref(), Some("a"));
        c.set_node(&node);
        assert!(c.take_changes().is_empty());
    }
}
