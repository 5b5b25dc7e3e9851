//! The watchers of cluster mode: Services and EndpointSlices with
//! kube-proxy's label selector (W1), and this node's Node, each a kube-rs
//! `watcher` with exponential backoff, merged into one channel.
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion, and
//! relists on 410 Gone or when a watch cannot be resumed; a relist arrives as
//! `Init`, `InitApply`..., `InitDone`. [`InitBuffers`] turns that into one
//! atomic replacement of the kind in the [`ClusterCache`], so a relist is
//! diffed, never applied as "delete everything, add everything".

use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::cluster::{ClusterCache, Interner, ListedService, ServiceList, SlimSlice};
use crate::model::PROXY_LABEL_SELECTOR;

/// One item from one of the watchers.
// Each update is moved once, through a channel whose buffer grows in small
// blocks; boxing every object would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Update {
    Service(Event<Service>),
    Slice(Event<EndpointSlice>),
    Node(Event<Node>),
    /// One Service of a list (`InitApply`), already slim: converted in the
    /// watcher's task so that full objects never wait in the channel.
    ListedService(ListedService),
    /// One EndpointSlice of a list (`InitApply`), already slim.
    ListedSlice(SlimSlice),
    /// A list or watch failed; the watcher retries with backoff.
    Failed {
        kind: &'static str,
        error: String,
    },
}

impl Update {
    /// When an EndpointSlice was last changed by its controller
    /// (`endpoints.kubernetes.io/last-change-trigger-time`): the start of
    /// kube-proxy's network programming latency.
    pub fn trigger_time(&self) -> Option<SystemTime> {
        let Update::Slice(Event::Apply(s) | Event::Delete(s)) = self else {
            return None;
        };
        let t = s
            .metadata
            .annotations
            .as_ref()?
            .get("endpoints.kubernetes.io/last-change-trigger-time")?;
        let ts: k8s_openapi::jiff::Timestamp = t.parse().ok()?;
        Some(SystemTime::from(ts))
    }
}

fn forward<K, S, W>(
    kind: &'static str,
    stream: S,
    mut wrap: W,
    tx: mpsc::Sender<Update>,
) -> tokio::task::JoinHandle<()>
where
    K: Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    W: FnMut(Event<K>) -> Update + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let update = match item {
                Ok(ev) => wrap(ev),
                Err(e) => Update::Failed {
                    kind,
                    error: e.to_string(),
                },
            };
            if tx.send(update).await.is_err() {
                return; // the agent is stopping
            }
        }
    })
}

fn wrap_service(ev: Event<Service>) -> Update {
    match ev {
        Event::InitApply(s) => Update::ListedService(ListedService::new(s)),
        ev => Update::Service(ev),
    }
}

/// Listed slices share node, zone and namespace strings through the task's
/// own interner (pruned when a relist starts: what the cache still holds
/// stays shared).
fn slice_wrapper() -> impl FnMut(Event<EndpointSlice>) -> Update + Send + 'static {
    let mut strings = Interner::default();
    move |ev| match ev {
        Event::InitApply(s) => Update::ListedSlice(SlimSlice::new(s, &mut strings)),
        ev => {
            if matches!(ev, Event::Init) {
                strings.prune();
            }
            Update::Slice(ev)
        }
    }
}

/// Starts the three watchers. Their tasks end when the receiver is dropped.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    timeout: Duration,
) -> (mpsc::Receiver<Update>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(4096);
    let cfg = watcher::Config::default()
        .labels(PROXY_LABEL_SELECTOR)
        .timeout(timeout.as_secs().clamp(1, 295) as u32);
    let node_cfg = watcher::Config::default()
        .fields(&format!("metadata.name={node_name}"))
        .timeout(timeout.as_secs().clamp(1, 295) as u32);
    let services =
        watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone()).default_backoff();
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg).default_backoff();
    let nodes = watcher::watcher(Api::<Node>::all(client), node_cfg).default_backoff();
    let handles = vec![
        forward("Service", services, wrap_service, tx.clone()),
        forward("EndpointSlice", slices, slice_wrapper(), tx.clone()),
        forward("Node", nodes, Update::Node, tx),
    ];
    (rx, handles)
}

/// Objects of a relist in progress, per kind.
#[derive(Debug, Default)]
pub struct InitBuffers {
    services: Option<ServiceList>,
    slices: Option<Vec<SlimSlice>>,
    services_listed: bool,
    slices_listed: bool,
}

impl InitBuffers {
    /// Both Services and EndpointSlices have been listed once. Before that
    /// nothing is programmed: Services without their slices would look like
    /// Services without endpoints, and an earlier agent's state would be
    /// torn down for nothing.
    pub fn synced(&self) -> bool {
        self.services_listed && self.slices_listed
    }
}

/// What an update did to the connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact {
    /// The API server answered.
    Ok,
    /// A list or watch failed.
    Failed,
}

/// Feeds one update into the cache.
pub fn apply_update(cache: &mut ClusterCache, bufs: &mut InitBuffers, update: Update) -> Contact {
    match update {
        Update::Service(ev) => match ev {
            Event::Apply(s) => cache.apply_service(s),
            Event::Delete(s) => cache.delete_service(&s),
            Event::Init => bufs.services = Some(ServiceList::default()),
            Event::InitApply(s) => bufs.services.get_or_insert_with(Default::default).push(s),
            Event::InitDone => {
                let all = bufs.services.take().unwrap_or_default();
                debug!(services = all.len(), "Services listed");
                cache.replace_service_list(all);
                bufs.services_listed = true;
            }
        },
        Update::Slice(ev) => match ev {
            Event::Apply(s) => cache.apply_slice(s),
            Event::Delete(s) => cache.delete_slice(&s),
            Event::Init => bufs.slices = Some(Vec::new()),
            Event::InitApply(s) => {
                let s = cache.slim_slice(s);
                bufs.slices.get_or_insert_with(Vec::new).push(s)
            }
            Event::InitDone => {
                let all = bufs.slices.take().unwrap_or_default();
                debug!(slices = all.len(), "EndpointSlices listed");
                cache.replace_slices(all);
                bufs.slices_listed = true;
            }
        },
        Update::ListedService(s) => bufs
            .services
            .get_or_insert_with(Default::default)
            .push_listed(s),
        Update::ListedSlice(s) => bufs.slices.get_or_insert_with(Vec::new).push(s),
        Update::Node(ev) => {
            if let Event::Apply(n) | Event::InitApply(n) = ev {
                cache.set_node(&n);
            }
        }
        Update::Failed { kind, error } => {
            warn!(kind, %error, "watch failed; retrying with backoff, the datapath keeps the last state");
            return Contact::Failed;
        }
    }
    Contact::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::client::Body;

    /// W1: what the watchers ask the API server for, seen on a tower-test
    /// mock of the client's HTTP service.
    #[tokio::test]
    async fn w1_watchers_list_with_kube_proxys_selector_and_only_their_node() {
        let (service, handle) =
            tower_test::mock::pair::<hyper::Request<Body>, hyper::Response<Body>>();
        let client = Client::new(service, "default");
        let (_updates, tasks) = spawn_watchers(client, "node-a", Duration::from_secs(60));
        let mut handle = std::pin::pin!(handle);
        let mut uris = Vec::new();
        for _ in 0..3 {
            let (req, _respond) =
                tokio::time::timeout(Duration::from_secs(10), handle.next_request())
                    .await
                    .expect("the watchers list")
                    .expect("a request");
            assert_eq!(req.method(), hyper::Method::GET);
            uris.push(req.uri().to_string());
        }
        for t in tasks {
            t.abort();
        }
        uris.sort();
        let selector = "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
        assert!(uris[0].starts_with("/api/v1/nodes?"), "{uris:?}");
        assert!(
            uris[0].contains("fieldSelector=metadata.name%3Dnode-a"),
            "{uris:?}"
        );
        assert!(uris[1].starts_with("/api/v1/services?"), "{uris:?}");
        assert!(uris[1].contains(selector), "{uris:?}");
        assert!(
            uris[2].starts_with("/apis/discovery.k8s.io/v1/endpointslices?"),
            "{uris:?}"
        );
        assert!(uris[2].contains(selector), "{uris:?}");
    }
}
