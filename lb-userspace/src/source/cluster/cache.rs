//! The cluster source's memory: every Service and EndpointSlice as the
//! model's validated input (parsed once, in the watcher's task), grouped by
//! Service, and the model's output per Service.
//!
//! A watch event touches one Service (a Service event, or an EndpointSlice
//! event of the Service named by its `kubernetes.io/service-name` label).
//! Only that Service is recomputed, and only its changed service ports go
//! to the planner: the cost of an event does not grow with the number of
//! Services. An initial list or a relist (after 410 Gone or a reconnect)
//! replaces a whole kind at once; the Services whose objects differ are
//! recomputed and the planner diffs the whole desired state against the
//! maps: never a flush.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use lb_core::desired::{DesiredPorts, ServiceRef};
use lb_core::model::{
    self, HealthCheck, NodeContext, ObjectError, ObjectKind, ObjectRef, ParsedService, ParsedSlice,
    ServiceOutput, SliceInfo,
};
use lb_core::{DesiredServicePort, ServicePortName};

use crate::source::{Changes, Rejected};

/// Objects by Service, and the model output per Service.
#[derive(Debug)]
pub struct ClusterCache {
    ctx: NodeContext,
    services: BTreeMap<ServiceRef, ParsedService>,
    /// Usable slices by the Service they belong to, sorted by slice name
    /// (usually one or two: a Vec, not a map).
    slices: BTreeMap<ServiceRef, Vec<SliceInfo>>,
    /// Slice namespace/name -> its owner, to follow label changes and deletes.
    slice_owner: BTreeMap<ServiceRef, ServiceRef>,
    /// What is wrong with each slice that has errors (reported once).
    slice_errors: BTreeMap<ServiceRef, Vec<ObjectError>>,
    outputs: BTreeMap<ServiceRef, ServiceOutput>,
    dirty: BTreeSet<ServiceRef>,
    full: bool,
    /// Errors of objects not reported yet.
    rejected: Vec<Rejected>,
}

impl ClusterCache {
    pub fn new(ctx: NodeContext) -> Self {
        Self {
            ctx,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            slice_errors: BTreeMap::new(),
            outputs: BTreeMap::new(),
            dirty: BTreeSet::new(),
            full: true,
            rejected: Vec::new(),
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

    /// The object a Service is, for an Event about it.
    pub fn service_object(&self, service: &ServiceRef) -> Option<&ObjectRef> {
        self.services.get(service).map(|s| &s.reference)
    }

    /// Errors of `new` that `old` did not have: reported once per change.
    fn report(
        &mut self,
        kind: ObjectKind,
        object: &ObjectRef,
        new: &[ObjectError],
        old: &[ObjectError],
    ) {
        for e in new.iter().filter(|e| !old.contains(e)) {
            self.rejected.push(Rejected {
                kind,
                object: object.clone(),
                error: e.clone(),
            });
        }
    }

    pub fn apply_service(&mut self, svc: ParsedService) {
        let key = svc.service_ref();
        let old_errors = self
            .services
            .get(&key)
            .map(|o| o.errors.clone())
            .unwrap_or_default();
        self.report(
            ObjectKind::Service,
            &svc.reference,
            &svc.errors,
            &old_errors,
        );
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
        }
    }

    pub fn delete_service(&mut self, key: &ServiceRef) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    pub fn apply_slice(&mut self, slice: ParsedSlice) {
        let key = slice.key();
        let old_errors = self.slice_errors.remove(&key).unwrap_or_default();
        self.report(
            ObjectKind::EndpointSlice,
            &slice.reference,
            &slice.errors,
            &old_errors,
        );
        if !slice.errors.is_empty() {
            self.slice_errors.insert(key.clone(), slice.errors);
        }
        // The service-name label can change: the old owner loses the slice.
        if let Some(old) = self.slice_owner.get(&key).cloned() {
            if Some(&old) != slice.owner.as_ref() {
                self.remove_slice_from(&old, &key.name);
                self.slice_owner.remove(&key);
                self.dirty.insert(old);
            }
        }
        let Some(owner) = slice.owner else {
            return; // W3: not attributable (reported above)
        };
        self.slice_owner.insert(key.clone(), owner.clone());
        let group = self.slices.entry(owner.clone()).or_default();
        let at = group.binary_search_by(|s| s.name().cmp(&key.name));
        match (at, slice.info) {
            (Ok(i), Some(info)) if group[i] == info => {}
            (Ok(i), Some(info)) => {
                group[i] = info;
                self.dirty.insert(owner);
            }
            (Err(i), Some(info)) => {
                group.insert(i, info);
                group.shrink_to_fit();
                self.dirty.insert(owner);
            }
            // Not usable (IPv6, FQDN, broken): it contributes nothing.
            (Ok(i), None) => {
                group.remove(i);
                self.dirty.insert(owner);
            }
            (Err(_), None) => {}
        }
    }

    pub fn delete_slice(&mut self, key: &ServiceRef) {
        self.slice_errors.remove(key);
        if let Some(owner) = self.slice_owner.remove(key) {
            self.remove_slice_from(&owner, &key.name);
            self.dirty.insert(owner);
        }
    }

    fn remove_slice_from(&mut self, owner: &ServiceRef, name: &str) {
        if let Some(group) = self.slices.get_mut(owner) {
            group.retain(|s| s.name() != name);
            if group.is_empty() {
                self.slices.remove(owner);
            }
        }
    }

    /// A complete list of Services (initial list or relist).
    pub fn replace_services(&mut self, all: Vec<ParsedService>) {
        let mut new: BTreeMap<ServiceRef, ParsedService> = BTreeMap::new();
        for s in all {
            // The last of two objects with the same namespace/name wins.
            new.insert(s.service_ref(), s);
        }
        for (k, s) in &new {
            let old = self.services.get(k);
            let old_errors = old.map(|o| o.errors.clone()).unwrap_or_default();
            if old != Some(s) {
                self.dirty.insert(k.clone());
            }
            self.report(ObjectKind::Service, &s.reference, &s.errors, &old_errors);
        }
        for k in self.services.keys() {
            if !new.contains_key(k) {
                self.dirty.insert(k.clone());
            }
        }
        self.services = new;
        self.full = true;
    }

    /// A complete list of EndpointSlices (initial list or relist).
    pub fn replace_slices(&mut self, all: Vec<ParsedSlice>) {
        let old_slices = std::mem::take(&mut self.slices);
        let old_errors = std::mem::take(&mut self.slice_errors);
        self.slice_owner.clear();
        for s in all {
            let key = s.key();
            let before = old_errors.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            self.report(ObjectKind::EndpointSlice, &s.reference, &s.errors, before);
            if !s.errors.is_empty() {
                self.slice_errors.insert(key.clone(), s.errors);
            }
            let Some(owner) = s.owner else { continue };
            self.slice_owner.insert(key, owner.clone());
            if let Some(info) = s.info {
                self.slices.entry(owner).or_default().push(info);
            }
        }
        for group in self.slices.values_mut() {
            group.sort_by(|a, b| a.name().cmp(b.name()));
            group.dedup_by(|a, b| a.name() == b.name());
            // Usually one slice: not the 4 a first push reserves.
            group.shrink_to_fit();
        }
        let owners: BTreeSet<&ServiceRef> = old_slices.keys().chain(self.slices.keys()).collect();
        for o in owners {
            if old_slices.get(o) != self.slices.get(o) {
                self.dirty.insert(o.clone());
            }
        }
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

    /// Recomputes the dirty Services and returns what changed: the service
    /// ports whose desired value differs (left empty when a full diff is
    /// due: the planner walks every port then).
    pub fn take_changes(&mut self) -> Changes {
        let full = std::mem::take(&mut self.full);
        let dirty = std::mem::take(&mut self.dirty);
        let mut changes = Changes {
            full,
            services_touched: dirty.len(),
            rejected: std::mem::take(&mut self.rejected),
            ..Changes::default()
        };
        for key in dirty {
            let new = match self.services.get(&key).and_then(|s| s.info.as_ref()) {
                Some(info) => {
                    let slices: Vec<&SliceInfo> =
                        self.slices.get(&key).into_iter().flatten().collect();
                    model::compute_service(&self.ctx, info, &slices)
                }
                None => ServiceOutput::default(),
            };
            let old = self.outputs.remove(&key).unwrap_or_default();
            if !full {
                for (name, port) in &new.ports {
                    if old.port(name) != Some(port) {
                        changes.ports.insert(name.clone());
                    }
                }
                for (name, _) in &old.ports {
                    if new.port(name).is_none() {
                        changes.ports.insert(name.clone());
                    }
                }
            }
            if new != ServiceOutput::default() {
                self.outputs.insert(key, new);
            }
        }
        changes
    }

    /// H1: every health-check node port of this node.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        let mut v: Vec<HealthCheck> = self
            .outputs
            .values()
            .filter_map(|o| o.health_check.clone())
            .collect();
        v.sort();
        v
    }
}

impl DesiredPorts for ClusterCache {
    fn port(&self, name: &ServicePortName) -> Option<&DesiredServicePort> {
        self.outputs.get(&name.service())?.port(name)
    }

    fn ports(&self) -> Box<dyn Iterator<Item = (&ServicePortName, &DesiredServicePort)> + '_> {
        // Services in (namespace, name) order, ports sorted within each:
        // ServicePortName order.
        Box::new(
            self.outputs
                .values()
                .flat_map(|o| o.ports.iter().map(|(k, v)| (k, v))),
        )
    }
}

#[cfg(test)]
mod tests;
