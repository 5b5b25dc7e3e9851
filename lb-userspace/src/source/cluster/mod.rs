//! Cluster mode's source: the watchers ([`watch`]) feed the cache
//! ([`cache`]); lists are buffered per kind and applied whole.

pub mod cache;
pub mod watch;

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use lb_core::model::{NodeContext, ParsedService, ParsedSlice};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub use cache::ClusterCache;
pub use watch::{Change, SliceChange, Update};

use super::Changes;

/// Most updates taken in one go: one plan per burst.
const BATCH: usize = 4096;

/// What one batch of updates did, for the agent's loop.
#[derive(Debug, Default)]
pub struct Batch {
    /// Something other than a failure arrived.
    pub changed: bool,
    /// The latest version of this node's Node object, if one arrived.
    pub node: Option<Node>,
    /// Whether the watchers reached the API server (the last word of the
    /// batch), if any update said.
    pub connected: Option<bool>,
    /// The earliest EndpointSlice trigger time in the batch.
    pub trigger: Option<SystemTime>,
}

/// Objects of a list in progress, per kind.
#[derive(Debug, Default)]
struct Lists {
    services: Option<Vec<ParsedService>>,
    slices: Option<Vec<ParsedSlice>>,
    services_listed: bool,
    slices_listed: bool,
}

pub struct ClusterSource {
    updates: mpsc::Receiver<Update>,
    watchers: Vec<JoinHandle<()>>,
    cache: ClusterCache,
    lists: Lists,
}

impl Drop for ClusterSource {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

impl ClusterSource {
    /// Starts the watchers of Services, EndpointSlices and this node.
    pub fn start(client: Client, node_name: &str, watch_timeout: Duration) -> Self {
        let (updates, watchers) = watch::spawn_watchers(client, node_name, watch_timeout);
        Self::new(updates, watchers, node_name)
    }

    /// A source fed by `updates` (tests feed it by hand).
    pub fn new(
        updates: mpsc::Receiver<Update>,
        watchers: Vec<JoinHandle<()>>,
        node_name: &str,
    ) -> Self {
        Self {
            updates,
            watchers,
            cache: ClusterCache::new(NodeContext::new(node_name, None)),
            lists: Lists::default(),
        }
    }

    pub fn cache(&self) -> &ClusterCache {
        &self.cache
    }

    /// Both Services and EndpointSlices have been listed once. Before that
    /// nothing is programmed: Services without their slices would look like
    /// Services without endpoints, and an earlier agent's state would be
    /// torn down for nothing.
    pub fn synced(&self) -> bool {
        self.lists.services_listed && self.lists.slices_listed
    }

    /// Waits for the next update and takes whatever else is queued.
    /// `None` when the watchers are gone.
    pub async fn recv(&mut self) -> Option<Batch> {
        let first = self.updates.recv().await?;
        let mut batch = Batch::default();
        self.apply(first, &mut batch);
        for _ in 1..BATCH {
            match self.updates.try_recv() {
                Ok(u) => self.apply(u, &mut batch),
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Feeds one update into the cache.
    pub fn apply(&mut self, update: Update, batch: &mut Batch) {
        if !matches!(update, Update::Failed { .. }) {
            batch.changed = true;
            batch.connected = Some(true);
        }
        match update {
            Update::Service(c) => match c {
                Change::Apply(s) => self.cache.apply_service(s),
                Change::Delete(s) => self.cache.delete_service(&s.service_ref()),
                Change::ListStart => self.lists.services = Some(Vec::new()),
                Change::Listed(s) => self.lists.services.get_or_insert_with(Vec::new).push(s),
                Change::ListDone => {
                    let all = self.lists.services.take().unwrap_or_default();
                    debug!(services = all.len(), "Services listed");
                    self.cache.replace_services(all);
                    self.lists.services_listed = true;
                }
            },
            Update::Slice(SliceChange { change, trigger }) => {
                if let Some(t) = trigger {
                    batch.trigger = Some(batch.trigger.map_or(t, |b| b.min(t)));
                }
                match change {
                    Change::Apply(s) => self.cache.apply_slice(s),
                    Change::Delete(s) => self.cache.delete_slice(&s.key()),
                    Change::ListStart => self.lists.slices = Some(Vec::new()),
                    Change::Listed(s) => self.lists.slices.get_or_insert_with(Vec::new).push(s),
                    Change::ListDone => {
                        let all = self.lists.slices.take().unwrap_or_default();
                        debug!(slices = all.len(), "EndpointSlices listed");
                        self.cache.replace_slices(all);
                        self.lists.slices_listed = true;
                    }
                }
            }
            Update::Node(Change::Apply(n) | Change::Listed(n)) => {
                self.cache.set_node(&n);
                batch.node = Some(*n);
            }
            Update::Node(_) => {}
            Update::Failed { kind, error } => {
                warn!(kind, %error, "watch failed; retrying with backoff, the datapath keeps the last state");
                batch.connected = Some(false);
            }
        }
    }

    /// Recomputes what the updates touched.
    pub fn take_changes(&mut self) -> Changes {
        self.cache.take_changes()
    }
}
