//! The public handle: starting and stopping the server thread, the
//! kubeconfig clients use, and what a test does to the store directly
//! (create, replace, delete, compact) or reads back (objects, Events,
//! request counters).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};

use crate::faults::Faults;
use crate::http::serve;
use crate::store::{Store, WriteOp};
use crate::watch::Msg;
use crate::{ResourceKind, TOKEN};

/// Capacity of the live-event channel; a watch that falls this far behind ends
/// (cleanly) and the client resumes from its last resourceVersion.
const CHANNEL_CAPACITY: usize = 16384;

/// What the server has counted, for tests to assert on.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requests: Vec<String>,
    pub(crate) lists: HashMap<ResourceKind, usize>,
    pub(crate) watches: HashMap<ResourceKind, usize>,
    pub(crate) expired_watches: usize,
}

/// Everything the server thread and the test's handle share.
pub(crate) struct Shared {
    pub(crate) addr: SocketAddr,
    store: Mutex<Store>,
    /// Open watches listen here (the store sends its changes under its lock).
    pub(crate) tx: broadcast::Sender<Msg>,
    pub(crate) faults: Faults,
    stats: Mutex<Stats>,
    pub(crate) open_watches: AtomicUsize,
    pub(crate) connections: AtomicUsize,
}

/// Locks `m`, also when a panicking test poisoned it (the data stays usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub(crate) fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }
}

/// A fake kube-apiserver serving HTTP on a listener the caller made. Stops and
/// joins its thread on drop.
pub struct FakeApiServer {
    pub(crate) shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts serving on `listener`, which may belong to any network
    /// namespace (a socket keeps the namespace it was created in). Periodic
    /// bookmarks default to every second.
    pub fn start(listener: TcpListener) -> FakeApiServer {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        let shared = Arc::new(Shared {
            addr,
            store: Mutex::new(Store::new(tx.clone())),
            tx,
            faults: Faults::default(),
            stats: Mutex::new(Stats::default()),
            open_watches: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(serve(sh, listener, stop_rx));
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn fake-apiserver thread");
        FakeApiServer {
            shared,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The kubeconfig (YAML) for this server: one cluster `fake` at
    /// [`Self::url`], one user with the bearer token [`TOKEN`], one context
    /// (namespace `default`), current.
    pub fn kubeconfig_yaml(&self) -> String {
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url()}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{
                "name": "fake",
                "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
            }],
            "current-context": "fake",
        });
        serde_saphyr::to_string(&kubeconfig).expect("a kubeconfig serializes to YAML")
    }

    /// Writes [`Self::kubeconfig_yaml`] to `dir/kubeconfig` (creating `dir`)
    /// and returns the path: usable as `KUBECONFIG`, with
    /// `Kubeconfig::read_from` + `Config::from_custom_kubeconfig`, or as the
    /// agent's `--kubeconfig`.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Creates or replaces an object (a k8s-openapi object, or JSON with
    /// `apiVersion`, `kind` and `metadata.name`; namespaced kinds default to
    /// namespace `default`). Sets uid, creationTimestamp, generation and a new
    /// resourceVersion, and tells the watches; an identical object is a no-op.
    /// Returns the stored object. Panics on an unsupported kind or an invalid
    /// object.
    pub fn apply<T: Serialize>(&self, obj: &T) -> Value {
        let mut v = serde_json::to_value(obj).expect("object serializes to JSON");
        let av = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let k = v
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = ResourceKind::from_type(av, &k)
            .unwrap_or_else(|| panic!("fake apiserver: unsupported apiVersion {av:?} kind {k:?}"));
        let ns = v
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            // The test's copy may be stale: apply always wins.
            m.remove("resourceVersion");
        }
        let res = self
            .shared
            .store()
            .write(kind, &ns, name.as_deref(), WriteOp::Upsert, v);
        match res {
            Ok((obj, _)) => (*obj).clone(),
            Err(e) => panic!("fake apiserver: apply {k} {name:?}: {}", e.message),
        }
    }

    /// [`Self::apply`] for every document of a (multi-document) YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<Value> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)
            .unwrap_or_else(|e| panic!("fake apiserver: apply_yaml: not YAML: {e}"));
        docs.iter()
            .filter(|v| !v.is_null())
            .map(|v| self.apply(v))
            .collect()
    }

    /// Deletes an object (`ns` is ignored for cluster-scoped kinds). Returns
    /// its last state (with the deletion's resourceVersion), None if absent.
    pub fn delete(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store()
            .delete(kind, ns, name)
            .map(|o| (*o).clone())
    }

    /// The stored object, if any (`ns` is ignored for cluster-scoped kinds).
    pub fn get(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { ns } else { "" };
        self.shared
            .store()
            .get(kind, ns, name)
            .map(|o| (*o).clone())
    }

    /// Every stored object of `kind`, sorted by namespace and name.
    pub fn objects(&self, kind: ResourceKind) -> Vec<Value> {
        self.shared
            .store()
            .objects_of(kind)
            .map(|s| (*s.obj).clone())
            .collect()
    }

    /// Forgets the history up to now: a watch or paginated list from an older
    /// resourceVersion gets 410 Expired (a watch: an ERROR event).
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// The Events clients created (core/v1 and events.k8s.io/v1), current
    /// state, in creation order.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.store();
        let mut evs: Vec<(u64, Value)> = [ResourceKind::Event, ResourceKind::CoreEvent]
            .into_iter()
            .flat_map(|kind| store.objects_of(kind))
            .map(|s| (s.seq, (*s.obj).clone()))
            .collect();
        evs.sort_by_key(|(seq, _)| *seq);
        evs.into_iter().map(|(_, v)| v).collect()
    }

    /// Every request received, as `METHOD /path?query` (query as sent).
    pub fn requests(&self) -> Vec<String> {
        self.shared.stats().requests.clone()
    }

    /// Number of WATCH requests served (all kinds), including those answered
    /// with a 410 ERROR event.
    pub fn watch_count(&self) -> usize {
        self.shared.stats().watches.values().sum()
    }

    /// Number of WATCH requests served for `kind`.
    pub fn watch_count_of(&self, kind: ResourceKind) -> usize {
        self.shared.stats().watches.get(&kind).copied().unwrap_or(0)
    }

    /// Number of watches answered with a 410 Expired ERROR event.
    pub fn expired_watch_count(&self) -> usize {
        self.shared.stats().expired_watches
    }

    /// Number of watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Number of TCP connections accepted (also those closed at once while
    /// [`Self::set_unavailable`]).
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Number of LIST requests served for `kind` (each page counts).
    pub fn list_count(&self, kind: ResourceKind) -> usize {
        self.shared.stats().lists.get(&kind).copied().unwrap_or(0)
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
    /// whether it held.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
