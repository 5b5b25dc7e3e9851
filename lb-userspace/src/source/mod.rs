//! Sources of the desired state: the Kubernetes API server (cluster mode,
//! [`cluster`]) or a manifest file ([`manifest`]). Both turn objects into
//! the model's validated inputs once, keep the model's output, and tell the
//! agent what changed ([`Changes`]) and what was rejected.

pub mod cluster;
pub mod manifest;

use std::collections::BTreeSet;

use lb_core::desired::{DesiredPorts, ServiceRef};
use lb_core::model::{HealthCheck, ObjectError, ObjectKind, ObjectRef};
use lb_core::ServicePortName;

use cluster::{Batch, ClusterSource};
use manifest::ManifestSource;

/// An object (or part of one) the model rejected, not reported before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub kind: ObjectKind,
    pub object: ObjectRef,
    pub error: ObjectError,
}

/// What changed in a source since the agent last asked.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// Diff everything (a list or relist, the node's zone, a new manifest).
    pub full: bool,
    /// Otherwise, the service ports whose desired value changed.
    pub ports: BTreeSet<ServicePortName>,
    /// Services recomputed.
    pub services_touched: usize,
    pub rejected: Vec<Rejected>,
}

impl Changes {
    /// Nothing to plan and nothing to report.
    pub fn is_empty(&self) -> bool {
        !self.full && self.ports.is_empty() && self.rejected.is_empty()
    }
}

/// The source the agent runs with.
pub enum Source {
    Manifest(ManifestSource),
    Cluster(ClusterSource),
}

impl Source {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Source::Cluster(_))
    }

    /// Waits for input from the API server (never returns in manifest mode:
    /// the file is polled). `None` when the watchers are gone.
    pub async fn recv(&mut self) -> Option<Batch> {
        match self {
            Source::Cluster(c) => c.recv().await,
            Source::Manifest(_) => std::future::pending().await,
        }
    }

    /// Re-reads what is polled (the manifest). True when it changed.
    pub fn poll(&mut self) -> bool {
        match self {
            Source::Manifest(m) => m.poll(),
            Source::Cluster(_) => false,
        }
    }

    /// The source knows the whole desired state (cluster mode: both kinds
    /// listed once; manifest mode: once a valid file was read).
    pub fn synced(&self) -> bool {
        match self {
            Source::Cluster(c) => c.synced(),
            Source::Manifest(m) => m.loaded(),
        }
    }

    pub fn take_changes(&mut self) -> Changes {
        match self {
            Source::Cluster(c) => c.take_changes(),
            Source::Manifest(m) => m.take_changes(),
        }
    }

    pub fn desired(&self) -> &dyn DesiredPorts {
        match self {
            Source::Cluster(c) => c.cache(),
            Source::Manifest(m) => m.desired(),
        }
    }

    /// H1: the health-check node ports this node serves.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        match self {
            Source::Cluster(c) => c.cache().health_checks(),
            Source::Manifest(m) => m.health_checks().to_vec(),
        }
    }

    /// The object of a Service, for an Event about it (cluster mode).
    pub fn service_object(&self, service: &ServiceRef) -> Option<&ObjectRef> {
        match self {
            Source::Cluster(c) => c.cache().service_object(service),
            Source::Manifest(_) => None,
        }
    }
}
