//! The watchers of cluster mode: Services and EndpointSlices with
//! kube-proxy's label selector (W1), and this node's Node, each a kube-rs
//! `watcher` with exponential backoff, merged into one channel.
//!
//! Each object is turned into the model's validated input inside its
//! watcher's task (a stream adapter), so full objects never queue up in the
//! channel and the cache never parses anything again.
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion, and
//! relists on 410 Gone or when a watch cannot be resumed; a relist arrives as
//! `Init`, `InitApply`..., `InitDone` ([`Change::ListStart`],
//! [`Change::Listed`], [`Change::ListDone`]), which the source turns into one
//! atomic replacement of the kind: a relist is diffed, never applied as
//! "delete everything, add everything".

use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use lb_core::model::{Interner, ParsedService, ParsedSlice, PROXY_LABEL_SELECTOR};
use tokio::sync::mpsc;

/// One step of a watch, with the object already converted.
#[derive(Debug)]
pub enum Change<T> {
    /// Added or modified.
    Apply(T),
    Delete(T),
    /// A list (or relist) starts: the items follow, then `ListDone`.
    ListStart,
    Listed(T),
    ListDone,
}

impl<K> Change<K> {
    fn from_event<T>(ev: Event<K>, convert: impl FnOnce(K) -> T) -> Change<T> {
        match ev {
            Event::Apply(k) => Change::Apply(convert(k)),
            Event::Delete(k) => Change::Delete(convert(k)),
            Event::Init => Change::ListStart,
            Event::InitApply(k) => Change::Listed(convert(k)),
            Event::InitDone => Change::ListDone,
        }
    }
}

/// An EndpointSlice change with the time its controller last changed it
/// (`endpoints.kubernetes.io/last-change-trigger-time`): where kube-proxy's
/// network programming latency starts.
#[derive(Debug)]
pub struct SliceChange {
    pub change: Change<ParsedSlice>,
    pub trigger: Option<SystemTime>,
}

/// One item from one of the watchers.
#[derive(Debug)]
pub enum Update {
    Service(Change<ParsedService>),
    Slice(SliceChange),
    // Boxed: a Node is large and arrives rarely.
    Node(Change<Box<Node>>),
    /// A list or watch failed; the watcher retries with backoff.
    Failed {
        kind: &'static str,
        error: String,
    },
}

pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let t = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let ts: k8s_openapi::jiff::Timestamp = t.parse().ok()?;
    Some(SystemTime::from(ts))
}

fn forward<S>(
    kind: &'static str,
    stream: S,
    tx: mpsc::Sender<Update>,
) -> tokio::task::JoinHandle<()>
where
    S: Stream<Item = Result<Update, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let update = item.unwrap_or_else(|e| Update::Failed {
                kind,
                error: e.to_string(),
            });
            if tx.send(update).await.is_err() {
                return; // the agent is stopping
            }
        }
    })
}

/// Starts the three watchers. Their tasks end when the receiver is dropped.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    timeout: Duration,
) -> (mpsc::Receiver<Update>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(4096);
    let timeout = timeout.as_secs().clamp(1, 295) as u32;
    let cfg = watcher::Config::default()
        .labels(PROXY_LABEL_SELECTOR)
        .timeout(timeout);
    let node_cfg = watcher::Config::default()
        .fields(&format!("metadata.name={node_name}"))
        .timeout(timeout);

    let services = watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone())
        .default_backoff()
        .map_ok(|ev| Update::Service(Change::from_event(ev, |s| ParsedService::parse(&s))));

    // Slices share node, zone and port-name strings through the task's own
    // interner, pruned when a relist starts (what the cache still holds
    // stays shared).
    let mut strings = Interner::default();
    let node = node_name.to_string();
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg)
        .default_backoff()
        .map_ok(move |ev| {
            if matches!(ev, Event::Init) {
                strings.prune();
            }
            let mut trigger = None;
            let change = Change::from_event(ev, |s| {
                trigger = trigger_time(&s);
                ParsedSlice::parse(&s, &node, &mut strings)
            });
            Update::Slice(SliceChange { change, trigger })
        });

    let nodes = watcher::watcher(Api::<Node>::all(client), node_cfg)
        .default_backoff()
        .map_ok(|ev| Update::Node(Change::from_event(ev, Box::new)));

    let handles = vec![
        forward("Service", services, tx.clone()),
        forward("EndpointSlice", slices, tx.clone()),
        forward("Node", nodes, tx),
    ];
    (rx, handles)
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

    #[test]
    fn the_trigger_time_annotation_is_read() {
        let mut s = EndpointSlice::default();
        assert_eq!(trigger_time(&s), None);
        s.metadata.annotations = Some(
            [(
                TRIGGER_TIME_ANNOTATION.to_string(),
                "2024-05-01T10:00:00Z".to_string(),
            )]
            .into(),
        );
        let t = trigger_time(&s).unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_714_557_600
        );
    }
}
