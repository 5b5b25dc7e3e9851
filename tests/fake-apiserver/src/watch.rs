//! WATCH: a chunked stream of `{"type":..,"object":..}` lines. The history
//! after the requested resourceVersion (or synthetic ADDED events of the
//! current state), then live changes as the store commits them; BOOKMARKs;
//! an ERROR event with a 410 Status for a compacted resourceVersion; a clean
//! end at `timeoutSeconds`, and a cut connection when a test disconnects
//! the watches.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::error::ApiError;
use crate::http::Body;
use crate::query::{parse_resource_version, Query};
use crate::selector::Filter;
use crate::server::Shared;
use crate::store::Change;
use crate::ResourceKind;

/// Watches without `timeoutSeconds` end after this long (kube-apiserver picks
/// 30..60 min at random).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// What every open watch is told, in the order the store committed it.
#[derive(Clone, Debug)]
pub(crate) enum Msg {
    /// A committed change (each watch decides, through its filter, what it
    /// becomes for it).
    Event(Arc<Change>),
    /// Send a BOOKMARK now (where the client allowed them).
    Bookmark,
    /// Cut the stream without the final chunk (fault injection).
    Disconnect,
}

#[derive(Serialize)]
struct WatchLine<'a> {
    #[serde(rename = "type")]
    typ: &'a str,
    object: &'a Value,
}

fn watch_line(typ: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&WatchLine { typ, object }).expect("JSON");
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark(kind: ResourceKind, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": meta}),
    )
}

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let rv_param = q.resource_version();
    let rv_match = q.resource_version_match();
    let allow_bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = match q.get("sendInitialEvents") {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid sendInitialEvents {other:?}"
            )))
        }
    };
    if send_initial {
        if rv_match != "NotOlderThan" {
            return Err(ApiError::invalid(
                "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
            ));
        }
        if !allow_bookmarks {
            return Err(ApiError::invalid(
                "allowWatchBookmarks: Required value: allowWatchBookmarks must be set to true when sendInitialEvents is set",
            ));
        }
    } else if !rv_match.is_empty() {
        return Err(ApiError::invalid(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let timeout = match q.get("timeoutSeconds") {
        None | Some("") => DEFAULT_WATCH_TIMEOUT,
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
    };
    let from_rv = match rv_param {
        "" | "0" => None,
        n => Some(parse_resource_version(n)?),
    };

    // Snapshot + subscription under the store lock: nothing falls in between.
    let store = shared.store();
    let rx = shared.tx.subscribe();
    let start_rv = store.rv;
    let mut initial: Vec<Bytes> = Vec::new();
    let mut expired = false;
    match from_rv {
        Some(n) if !send_initial => {
            if n < store.compacted {
                expired = true;
                let status = ApiError::too_old_resource_version(n, store.rv).to_status();
                initial.push(watch_line("ERROR", &status));
            } else {
                for ev in store.history.iter().filter(|e| e.rv > n) {
                    if let Some((t, o)) = filter.watch_event(ev) {
                        initial.push(watch_line(t, &o));
                    }
                }
            }
        }
        _ => {
            for s in store.objects_of(filter.kind) {
                if filter.matches(&s.obj) {
                    initial.push(watch_line("ADDED", &s.obj));
                }
            }
            if send_initial {
                initial.push(bookmark(filter.kind, start_rv, true));
            }
        }
    }
    drop(store);
    {
        let mut st = shared.stats();
        *st.watches.entry(filter.kind).or_default() += 1;
        if expired {
            st.expired_watches += 1;
        }
    }

    let (tx, mut frames) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(64);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let guard = OpenWatch(shared.clone());
    tokio::spawn(run_watch(
        guard,
        filter,
        rx,
        tx,
        initial,
        !expired,
        start_rv,
        allow_bookmarks,
        timeout,
    ));
    let body = StreamBody::new(futures::stream::poll_fn(move |cx| frames.poll_recv(cx)));
    let mut r = Response::new(body.boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn run_watch(
    _guard: OpenWatch,
    filter: Filter,
    mut rx: broadcast::Receiver<Msg>,
    tx: FrameTx,
    initial: Vec<Bytes>,
    go_on: bool,
    start_rv: u64,
    allow_bookmarks: bool,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    for line in initial {
        if tx.send(Ok(Frame::data(line))).await.is_err() {
            return;
        }
    }
    if !go_on {
        return; // clean end after the ERROR event
    }
    // The RV this stream has caught up to (events of every kind count).
    let mut processed = start_rv;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tx.closed() => return,
        };
        let line = match msg {
            Ok(Msg::Event(ev)) => {
                if ev.rv <= processed {
                    continue;
                }
                processed = ev.rv;
                match filter.watch_event(&ev) {
                    Some((t, o)) => watch_line(t, &o),
                    None => continue,
                }
            }
            Ok(Msg::Bookmark) if allow_bookmarks => bookmark(filter.kind, processed, false),
            Ok(Msg::Bookmark) => continue,
            Ok(Msg::Disconnect) => {
                // An error in the body makes hyper cut the connection without
                // the final chunk: the client sees an unexpected EOF.
                let _ = tx
                    .send(Err(io::Error::other("watch disconnected by the test")))
                    .await;
                return;
            }
            // Fell too far behind: end cleanly; the client resumes from its RV.
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(Ok(Frame::data(line))).await.is_err() {
            return;
        }
    }
}

/// Sends the periodic BOOKMARKs; the period can change at any time.
pub(crate) async fn bookmark_ticker(shared: Arc<Shared>) {
    loop {
        let interval = shared.faults.bookmark_interval();
        match interval {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => { let _ = shared.tx.send(Msg::Bookmark); }
                    _ = shared.faults.bookmark_interval_changed() => {}
                }
            }
            None => shared.faults.bookmark_interval_changed().await,
        }
    }
}
