//! Manifest mode: Service and EndpointSlice documents from a file, polled;
//! every change is planned as a whole-state diff (files are small).

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use lb_userspace::manifest;
use lb_userspace::model;
use lb_userspace::state::DesiredState;
use tokio::signal::unix::Signal;
use tokio::sync::Notify;
use tracing::{debug, error, info};

use crate::node::{NodeAgent, Ticks};

struct ManifestSource {
    path: PathBuf,
    node_name: String,
    /// Hash of the text last parsed.
    hash: Option<u64>,
    last_read_error: Option<String>,
}

impl ManifestSource {
    /// The new desired state when the file changed and is valid. A file that
    /// does not parse, or whose objects the model rejects, changes nothing:
    /// the previous state stays.
    fn poll(&mut self) -> Option<DesiredState> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                if self.last_read_error.as_ref() != Some(&msg) {
                    error!(manifest = %self.path.display(), error = %msg, "cannot read manifest; keeping the current state");
                    self.last_read_error = Some(msg);
                }
                return None;
            }
        };
        self.last_read_error = None;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if self.hash == Some(hash) {
            return None;
        }
        self.hash = Some(hash);
        match compute_desired(&text, &self.node_name) {
            Ok(d) => {
                info!(manifest = %self.path.display(), service_ports = d.services.len(), "manifest loaded");
                Some(d)
            }
            Err(errors) => {
                for e in &errors {
                    error!(manifest = %self.path.display(), "{e}");
                }
                error!(manifest = %self.path.display(), errors = errors.len(), "manifest rejected; keeping the current state");
                None
            }
        }
    }
}

/// Manifest text -> desired state, or every error found (document, field).
fn compute_desired(text: &str, node_name: &str) -> Result<DesiredState, Vec<String>> {
    let objects = manifest::parse_manifest(text).map_err(|e| vec![e.to_string()])?;
    for ignored in &objects.ignored {
        debug!(object = %ignored, "ignoring object of a kind lb does not use");
    }
    let node = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let ctx = model::NodeContext::with_node(node_name, node);
    let out = model::desired_state(&ctx, &objects.services, &objects.endpoint_slices);
    if out.errors.is_empty() {
        Ok(out.state)
    } else {
        Err(out.errors.iter().map(ToString::to_string).collect())
    }
}

pub async fn run(
    mut node: NodeAgent,
    path: PathBuf,
    node_name: String,
    mut ticks: Ticks,
    changed: Arc<Notify>,
    mut term: Signal,
    mut int: Signal,
) -> Result<()> {
    let mut source = ManifestSource {
        path,
        node_name,
        hash: None,
        last_read_error: None,
    };
    let mut desired: Option<DesiredState> = None;
    let mut dirty = true;
    loop {
        tokio::select! {
            _ = ticks.poll.tick() => {}
            _ = changed.notified() => debug!("netlink change"),
            _ = ticks.gc.tick() => { node.collect_conntrack(); continue; }
            _ = ticks.refresh.tick() => { node.refresh_metrics(); continue; }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let started = Instant::now();
        match node.reconcile_interfaces() {
            Ok(addrs_changed) => dirty |= addrs_changed,
            Err(e) => error!(
                error = format!("{e:#}"),
                "interface sync failed; will retry"
            ),
        }
        if let Some(d) = source.poll() {
            node.health.queued_update();
            desired = Some(d);
            dirty = true;
        }
        let Some(d) = &desired else { continue };
        if !dirty {
            continue;
        }
        let result = node.resync_if_needed().and_then(|()| {
            let plan = node.sync.plan_full(d, &node.node_addrs)?;
            node.apply(plan, started, "full")
        });
        match result {
            Ok(_) => dirty = false,
            Err(e) => error!(error = format!("{e:#}"), "map sync failed; will retry"),
        }
    }
    Ok(())
}
