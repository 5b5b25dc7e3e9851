//! A fake Kubernetes API server for tests: the real list/watch protocol over
//! plain HTTP/1.1, for the resources the lb agent uses.
//!
//! The agent is tested with its normal `kube::Client`, built from the kubeconfig
//! [`FakeApiServer::write_kubeconfig`] writes. The server runs on its own thread
//! with its own tokio runtime; every control method is synchronous and
//! thread-safe, so plain `#[test]` functions drive it.
//!
//! What it serves (JSON only):
//! - core/v1 `services` (namespaced), `nodes` (cluster-scoped), `events`
//!   (namespaced); discovery.k8s.io/v1 `endpointslices` and events.k8s.io/v1
//!   `events` (namespaced);
//! - LIST (cluster-wide and per namespace) with `labelSelector`,
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`), `limit` and
//!   `continue` (pages consistent at the first page's resourceVersion), and
//!   `resourceVersion` / `resourceVersionMatch`;
//! - WATCH (`watch=true|1`): a chunked stream of `{"type":..,"object":..}` lines:
//!   history after the requested resourceVersion (or synthetic ADDED events of
//!   the current state for `""`/`"0"`/`sendInitialEvents=true`), then live
//!   events; selector transitions become ADDED/DELETED as in kube-apiserver's
//!   cacher; BOOKMARKs (periodic, on demand, and the `k8s.io/initial-events-end`
//!   one for streaming lists); `timeoutSeconds`; an ERROR event with a 410
//!   Expired Status when the resourceVersion was compacted;
//! - GET/POST/PUT/PATCH (merge and strategic-merge as JSON merge patch,
//!   server-side apply as upsert+merge)/DELETE of single objects;
//! - `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}[/v1]`, `/healthz`,
//!   `/livez`, `/readyz`; anything else is a 404 Status.
//!
//! Requests must carry `Authorization: Bearer` [`TOKEN`] (the kubeconfig has
//! it); others get a 401 Status.
//!
//! ```no_run
//! use lb_tests::fake_apiserver::{bind_in_netns, FakeApiServer, ResourceKind};
//! let server = FakeApiServer::start(bind_in_netns(None, "127.0.0.1:0".parse().unwrap()));
//! let kubeconfig = server.write_kubeconfig(std::path::Path::new("/tmp/t1"));
//! server.apply(&serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
//! }));
//! // ... run the agent with KUBECONFIG=kubeconfig ...
//! server.delete(ResourceKind::Service, "default", "web");
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

/// The bearer token the server expects (and the kubeconfig carries).
pub const TOKEN: &str = "fake-apiserver-token";

/// Watches without `timeoutSeconds` end after this long (kube-apiserver picks
/// 30..60 min at random).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Capacity of the live-event channel; a watch that falls this far behind ends
/// (cleanly) and the client resumes from its last resourceVersion.
const CHANNEL_CAPACITY: usize = 16384;

/// The resource types the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// core/v1 Service (namespaced).
    Service,
    /// discovery.k8s.io/v1 EndpointSlice (namespaced).
    EndpointSlice,
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Event (namespaced).
    CoreEvent,
    /// events.k8s.io/v1 Event (namespaced; what kube's `Recorder` writes).
    Event,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Service,
        ResourceKind::EndpointSlice,
        ResourceKind::Node,
        ResourceKind::CoreEvent,
        ResourceKind::Event,
    ];

    /// API group ("" for core).
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node | ResourceKind::CoreEvent => "",
            ResourceKind::EndpointSlice => "discovery.k8s.io",
            ResourceKind::Event => "events.k8s.io",
        }
    }

    /// `apiVersion` of objects of this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node | ResourceKind::CoreEvent => "v1",
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
            ResourceKind::Event => "events.k8s.io/v1",
        }
    }

    /// `kind` of objects of this kind.
    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Node => "Node",
            ResourceKind::CoreEvent | ResourceKind::Event => "Event",
        }
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::Node => "nodes",
            ResourceKind::CoreEvent | ResourceKind::Event => "events",
        }
    }

    pub fn namespaced(self) -> bool {
        self != ResourceKind::Node
    }

    /// The kind from an object's `apiVersion` and `kind`.
    pub fn from_type(api_version: &str, kind: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    fn from_path(group: &str, version: &str, plural: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|k| k.group() == group && version == "v1" && k.plural() == plural)
    }

    /// `services`, `endpointslices.discovery.k8s.io`: how Status messages name it.
    fn qualified(self) -> String {
        if self.group().is_empty() {
            self.plural().to_string()
        } else {
            format!("{}.{}", self.plural(), self.group())
        }
    }

    fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }
}

// ---------------------------------------------------------------------------
// Errors as Kubernetes Status objects

#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    fn unknown_path() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(json!({}));
        e
    }

    fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn not_found(kind: ResourceKind, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        );
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }

    fn already_exists(kind: ResourceKind, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
        );
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }

    fn conflict(kind: ResourceKind, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                kind.qualified()
            ),
        );
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }

    fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// A bare status answer (test-injected failures).
    fn status(code: u16) -> Self {
        let (reason, message) = match code {
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "forbidden"),
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.",
            ),
            500 => (
                "InternalError",
                "Internal error occurred: injected by the fake apiserver",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "Timeout: request did not complete within requested timeout",
            ),
            _ => ("", "injected failure"),
        };
        Self::new(code, reason, message)
    }

    fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    fn into_response(self) -> Response<Body> {
        let mut r = json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.to_status(),
        );
        if self.code == 429 {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }
}

// ---------------------------------------------------------------------------
// The store: objects, one resourceVersion counter, history.

type Key = (ResourceKind, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as etcd's watch would report it.
#[derive(Debug)]
struct HistEvent {
    rv: u64,
    kind: ResourceKind,
    typ: EventType,
    /// The new object (for DELETED: the last state, with the deletion's RV).
    obj: Arc<Value>,
    /// The object before the change (None for a creation).
    prev: Option<Arc<Value>>,
}

#[derive(Clone, Debug)]
enum Msg {
    Event(Arc<HistEvent>),
    Bookmark,
    Disconnect,
}

struct Stored {
    obj: Arc<Value>,
    /// Creation order (for [`FakeApiServer::events`]).
    seq: u64,
}

struct Store {
    rv: u64,
    /// History at or before this RV is forgotten: older RVs get 410.
    compacted: u64,
    seq: u64,
    uid_seed: u64,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Arc<HistEvent>>,
    tx: broadcast::Sender<Msg>,
}

enum WriteOp {
    /// POST: fail if it exists.
    Create,
    /// PUT: fail if missing; 409 when the body's resourceVersion is stale.
    Update,
    /// Test control: create or replace, no RV check.
    Upsert,
    /// PATCH with a JSON merge patch.
    MergePatch,
    /// Server-side apply (approximated: create, or merge into the existing object).
    Apply,
}

impl Store {
    fn new(tx: broadcast::Sender<Msg>) -> Self {
        let uid_seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            & 0xffff_ffff;
        Store {
            rv: 1,
            compacted: 1,
            seq: 0,
            uid_seed,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            tx,
        }
    }

    /// Records a change: bumps the RV, stamps it on the object, keeps history,
    /// tells open watches. `new` None deletes.
    fn commit(&mut self, key: Key, new: Option<Value>) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        let prev = self.objects.get(&key).map(|s| s.obj.clone());
        let (typ, obj) = match new {
            Some(mut v) => {
                set_rv(&mut v, rv);
                let obj = Arc::new(v);
                let seq = match self.objects.get(&key) {
                    Some(s) => s.seq,
                    None => {
                        self.seq += 1;
                        self.seq
                    }
                };
                self.objects.insert(
                    key.clone(),
                    Stored {
                        obj: obj.clone(),
                        seq,
                    },
                );
                let typ = if prev.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                (typ, obj)
            }
            None => {
                self.objects.remove(&key);
                let mut last = prev.as_deref().cloned().unwrap_or(Value::Null);
                set_rv(&mut last, rv);
                (EventType::Deleted, Arc::new(last))
            }
        };
        let ev = Arc::new(HistEvent {
            rv,
            kind: key.0,
            typ,
            obj: obj.clone(),
            prev,
        });
        self.history.push_back(ev.clone());
        // Sent under the store lock so the channel order is the RV order.
        let _ = self.tx.send(Msg::Event(ev));
        obj
    }

    fn new_uid(&mut self) -> String {
        self.seq += 1;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            self.uid_seed,
            (self.seq >> 32) & 0xffff,
            (self.seq >> 20) & 0xfff,
            (self.seq >> 8) & 0xfff,
            self.seq
        )
    }

    fn get(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|s| s.obj.clone())
    }

    /// The objects of `kind` as they were at `rv` (which must not be compacted),
    /// keyed by (namespace, name).
    fn state_at(&self, kind: ResourceKind, rv: u64) -> BTreeMap<(String, String), Arc<Value>> {
        let mut state: BTreeMap<(String, String), Arc<Value>> = self
            .objects
            .range((kind, String::new(), String::new())..)
            .take_while(|(k, _)| k.0 == kind)
            .map(|(k, s)| ((k.1.clone(), k.2.clone()), s.obj.clone()))
            .collect();
        for ev in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if ev.kind != kind {
                continue;
            }
            let key = (meta_str(&ev.obj, "namespace"), meta_str(&ev.obj, "name"));
            match &ev.prev {
                Some(p) => {
                    state.insert(key, p.clone());
                }
                None => {
                    state.remove(&key);
                }
            }
        }
        state
    }

    /// Create / update / patch / upsert one object. Returns the stored object
    /// and whether it was created.
    fn write(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        name: Option<&str>,
        op: WriteOp,
        body: Value,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let Value::Object(_) = body else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        // Type fields.
        for (field, want) in [("apiVersion", kind.api_version()), ("kind", kind.kind())] {
            match body.get(field).and_then(Value::as_str) {
                None | Some("") => {}
                Some(got) if got == want => {}
                Some(got) => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} of the object ({got}) does not match the request ({want})"
                    )))
                }
            }
        }
        // Namespace.
        if kind.namespaced() {
            if let Some(bns) = body.pointer("/metadata/namespace").and_then(Value::as_str) {
                if !bns.is_empty() && bns != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        }
        // Name (generateName for creations).
        let body_name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if let (Some(url), Some(b)) = (name, body_name.as_deref()) {
            if url != b {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
        }
        let name = match (name.map(str::to_string).or(body_name), &op) {
            (Some(n), _) => n,
            (None, WriteOp::Create | WriteOp::Upsert) => {
                match body.pointer("/metadata/generateName").and_then(Value::as_str) {
                    Some(prefix) if !prefix.is_empty() => {
                        self.seq += 1;
                        format!("{prefix}{:05x}", (self.uid_seed ^ self.seq) & 0xfffff)
                    }
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                            kind.kind()
                        )))
                    }
                }
            }
            (None, _) => return Err(ApiError::bad_request("name is required")),
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\"",
                kind.kind()
            )));
        }
        let ns = if kind.namespaced() { ns } else { "" };
        let key: Key = (kind, ns.to_string(), name.clone());
        let existing = self.objects.get(&key).map(|s| s.obj.clone());

        let mut obj = match (&op, &existing) {
            (WriteOp::Create, Some(_)) => return Err(ApiError::already_exists(kind, &name)),
            (WriteOp::Update | WriteOp::MergePatch, None) => {
                return Err(ApiError::not_found(kind, &name))
            }
            (WriteOp::Update, Some(old)) => {
                let want = body
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty());
                let have = old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if want.is_some() && want != have {
                    return Err(ApiError::conflict(kind, &name));
                }
                body
            }
            (WriteOp::MergePatch | WriteOp::Apply, Some(old)) => {
                let want = body
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty());
                let have = old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if want.is_some() && want != have {
                    return Err(ApiError::conflict(kind, &name));
                }
                let mut merged = (**old).clone();
                merge_patch(&mut merged, &body);
                merged
            }
            (_, _) => body,
        };

        // Server-set fields.
        let old_meta = existing.as_ref().and_then(|o| o.get("metadata"));
        {
            let m = obj.as_object_mut().expect("checked above");
            m.insert("apiVersion".into(), kind.api_version().into());
            m.insert("kind".into(), kind.kind().into());
            let meta = m
                .entry("metadata")
                .or_insert_with(|| Value::Object(Map::new()));
            if !meta.is_object() {
                *meta = Value::Object(Map::new());
            }
        }
        let uid = match old_meta.and_then(|m| m.get("uid")).and_then(Value::as_str) {
            Some(u) => u.to_string(),
            None => self.new_uid(),
        };
        let created = old_meta
            .and_then(|m| m.get("creationTimestamp"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(rfc3339_now);
        let generation = if has_generation(kind) {
            match (
                &existing,
                old_meta
                    .and_then(|m| m.get("generation"))
                    .and_then(Value::as_i64),
            ) {
                (Some(old), Some(g)) => Some(if spec_changed(kind, old, &obj) {
                    g + 1
                } else {
                    g
                }),
                _ => Some(1),
            }
        } else {
            None
        };
        {
            let meta = obj["metadata"]
                .as_object_mut()
                .expect("made an object above");
            meta.insert("name".into(), name.clone().into());
            if kind.namespaced() {
                meta.insert("namespace".into(), ns.into());
            } else {
                meta.remove("namespace");
            }
            meta.insert("uid".into(), uid.into());
            meta.insert("creationTimestamp".into(), created.into());
            match generation {
                Some(g) => meta.insert("generation".into(), g.into()),
                None => meta.remove("generation"),
            };
            meta.remove("resourceVersion");
            meta.remove("selfLink");
        }
        validate(kind, &obj)?;

        // A write that changes nothing is a no-op (no new RV, no event).
        if let Some(old) = &existing {
            let mut old_cmp = (**old).clone();
            if let Some(m) = old_cmp.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            if old_cmp == obj {
                return Ok((old.clone(), false));
            }
        }
        let created_now = existing.is_none();
        Ok((self.commit(key, Some(obj)), created_now))
    }

    fn delete(&mut self, kind: ResourceKind, ns: &str, name: &str) -> Option<Arc<Value>> {
        let ns = if kind.namespaced() { ns } else { "" };
        let key: Key = (kind, ns.to_string(), name.to_string());
        if !self.objects.contains_key(&key) {
            return None;
        }
        Some(self.commit(key, None))
    }
}

fn set_rv(v: &mut Value, rv: u64) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), rv.to_string().into());
    }
}

fn meta_str(v: &Value, field: &str) -> String {
    v.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn has_generation(kind: ResourceKind) -> bool {
    matches!(kind, ResourceKind::Service | ResourceKind::EndpointSlice)
}

/// Whether an update bumps metadata.generation (Service: spec; EndpointSlice:
/// anything outside metadata).
fn spec_changed(kind: ResourceKind, old: &Value, new: &Value) -> bool {
    match kind {
        ResourceKind::Service => old.get("spec") != new.get("spec"),
        _ => {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("metadata");
                }
                v
            };
            strip(old) != strip(new)
        }
    }
}

/// DNS-1123 subdomain-ish (what names of these kinds must be).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// The few validations worth having: the ones a client can get wrong.
fn validate(kind: ResourceKind, obj: &Value) -> Result<(), ApiError> {
    let name = meta_str(obj, "name");
    let invalid = |field: &str, what: &str| {
        ApiError::invalid(format!(
            "{}.{} \"{name}\" is invalid: {field}: {what}",
            kind.plural(),
            kind.group()
        ))
    };
    if kind == ResourceKind::Event {
        if obj.get("eventTime").is_none_or(Value::is_null) {
            return Err(invalid("eventTime", "Required value"));
        }
        for field in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            if obj
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(invalid(field, "Required value"));
            }
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("Normal" | "Warning") => {}
            _ => return Err(invalid("type", "Unsupported value")),
        }
    }
    if kind == ResourceKind::CoreEvent && obj.get("involvedObject").is_none_or(Value::is_null) {
        return Err(invalid("involvedObject", "Required value"));
    }
    if kind == ResourceKind::EndpointSlice
        && obj.get("addressType").and_then(Value::as_str).is_none()
    {
        return Err(invalid("addressType", "Required value"));
    }
    Ok(())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

// ---------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Clone, Debug)]
enum FieldReq {
    Eq(&'static str, String),
    NotEq(&'static str, String),
}

fn valid_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parses a label selector as `labels.Parse` does (equality- and set-based).
fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, ApiError> {
    let bad = |t: &str| ApiError::bad_request(format!("unable to parse requirement: {t:?}"));
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut reqs = Vec::new();
    for raw in terms {
        let t = raw.trim();
        if t.is_empty() {
            if s.trim().is_empty() {
                continue;
            }
            return Err(bad(raw));
        }
        let req = if let Some(k) = t.strip_prefix('!') {
            let k = k.trim();
            if !valid_label_key(k) {
                return Err(bad(t));
            }
            LabelReq::NotExists(k.to_string())
        } else if let Some(open) = t.find('(') {
            if !t.ends_with(')') {
                return Err(bad(t));
            }
            let mut head = t[..open].split_whitespace();
            let (Some(k), Some(op), None) = (head.next(), head.next(), head.next()) else {
                return Err(bad(t));
            };
            let values: Vec<String> = t[open + 1..t.len() - 1]
                .split(',')
                .map(|v| v.trim().to_string())
                .collect();
            if !valid_label_key(k) || values.iter().any(|v| !valid_label_value(v)) {
                return Err(bad(t));
            }
            match op {
                "in" => LabelReq::In(k.to_string(), values),
                "notin" => LabelReq::NotIn(k.to_string(), values),
                _ => return Err(bad(t)),
            }
        } else if let Some((k, v)) = t.split_once("!=") {
            LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = t.split_once("==") {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = t.split_once('=') {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else {
            LabelReq::Exists(t.to_string())
        };
        match &req {
            LabelReq::Exists(k) | LabelReq::NotExists(k) if !valid_label_key(k) => {
                return Err(bad(t))
            }
            LabelReq::Eq(k, v) | LabelReq::NotEq(k, v)
                if !valid_label_key(k) || !valid_label_value(v) =>
            {
                return Err(bad(t))
            }
            _ => {}
        }
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut reqs = Vec::new();
    for raw in s.split(',') {
        let t = raw.trim();
        if t.is_empty() {
            continue;
        }
        let (field, value, neg) = if let Some((f, v)) = t.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = t.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = t.split_once('=') {
            (f, v, false)
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid selector: '{s}'; can't understand '{t}'"
            )));
        };
        let field: &'static str = match field.trim() {
            "metadata.name" => "name",
            "metadata.namespace" => "namespace",
            other => {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {other}"
                )))
            }
        };
        let value = value.trim().to_string();
        reqs.push(if neg {
            FieldReq::NotEq(field, value)
        } else {
            FieldReq::Eq(field, value)
        });
    }
    Ok(reqs)
}

/// What a LIST or WATCH selects.
#[derive(Clone, Debug)]
struct Filter {
    kind: ResourceKind,
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let meta = obj.get("metadata");
        let mstr = |f: &str| {
            meta.and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        if let Some(ns) = &self.namespace {
            if mstr("namespace") != ns {
                return false;
            }
        }
        let fields_ok = self.fields.iter().all(|r| match r {
            FieldReq::Eq(f, v) => mstr(f) == v,
            FieldReq::NotEq(f, v) => mstr(f) != v,
        });
        if !fields_ok {
            return false;
        }
        let labels = meta
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        })
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    /// The watch event a change produces for this filter, as kube-apiserver's
    /// cacher decides it: an object that stops matching is DELETED (old
    /// content, new RV); one that starts matching is ADDED.
    fn watch_event(&self, ev: &HistEvent) -> Option<(&'static str, Arc<Value>)> {
        if ev.kind != self.kind {
            return None;
        }
        let cur_pass = ev.typ != EventType::Deleted && self.matches(&ev.obj);
        let old_pass = ev.prev.as_deref().is_some_and(|p| self.matches(p));
        match (cur_pass, old_pass) {
            (true, true) => Some(("MODIFIED", ev.obj.clone())),
            (true, false) => Some(("ADDED", ev.obj.clone())),
            (false, true) if ev.typ == EventType::Deleted => Some(("DELETED", ev.obj.clone())),
            (false, true) => {
                let mut old = ev.prev.as_deref().cloned().unwrap_or(Value::Null);
                set_rv(&mut old, ev.rv);
                Some(("DELETED", Arc::new(old)))
            }
            (false, false) => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state

#[derive(Default)]
struct Stats {
    requests: Vec<String>,
    lists: HashMap<ResourceKind, usize>,
    watches: HashMap<ResourceKind, usize>,
    expired_watches: usize,
}

struct Shared {
    addr: SocketAddr,
    store: Mutex<Store>,
    tx: broadcast::Sender<Msg>,
    latency: Mutex<Duration>,
    down: AtomicBool,
    error_status: Mutex<Option<u16>>,
    bookmark_interval: Mutex<Option<Duration>>,
    bookmark_changed: Notify,
    stats: Mutex<Stats>,
    open_watches: AtomicUsize,
    connections: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }
}

// ---------------------------------------------------------------------------
// The public handle

/// A fake kube-apiserver serving HTTP on a listener the caller made. Stops and
/// joins its thread on drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Binds a TCP listener in the network namespace `/run/netns/NAME` (from a
/// short-lived thread that entered it: a socket keeps the namespace it was
/// created in), or in the calling thread's namespace with `None`. Panics on
/// failure.
pub fn bind_in_netns(netns_name: Option<&str>, addr: SocketAddr) -> TcpListener {
    match netns_name {
        None => TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")),
        Some(name) => crate::netns::in_named_netns(name, || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in netns {name}: {e}"))
        }),
    }
}

impl FakeApiServer {
    /// Starts serving on `listener` (any namespace; see [`bind_in_netns`]).
    /// Periodic bookmarks default to every second.
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
            latency: Mutex::new(Duration::ZERO),
            down: AtomicBool::new(false),
            error_status: Mutex::new(None),
            bookmark_interval: Mutex::new(Some(Duration::from_secs(1))),
            bookmark_changed: Notify::new(),
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
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             preferences: {{}}\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user:\n    token: {TOKEN}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        )
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
        let v = serde_json::to_value(obj).expect("object serializes to JSON");
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
        let mut v = v;
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
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(yaml)
            .map(|doc| Value::deserialize(doc).expect("YAML document"))
            .filter(|v| !v.is_null())
            .map(|v| self.apply(&v))
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
        let store = self.shared.store();
        store
            .objects
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(_, s)| (*s.obj).clone())
            .collect()
    }

    /// Forgets the history up to now: a watch or paginated list from an older
    /// resourceVersion gets 410 Expired (a watch: an ERROR event).
    pub fn compact(&self) {
        let mut s = self.shared.store();
        s.compacted = s.rv;
        s.history.clear();
    }

    /// Abruptly closes every open watch stream (the chunked body is cut: the
    /// client sees an unexpected EOF and resumes from its last resourceVersion).
    pub fn disconnect_watches(&self) {
        let _ = self.shared.tx.send(Msg::Disconnect);
    }

    /// Sends a BOOKMARK now on every watch that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        let _ = self.shared.tx.send(Msg::Bookmark);
    }

    /// `true`: the server is down: open watches are cut, new connections are
    /// closed at once and requests on kept-alive connections get the connection
    /// closed without an answer (what a client sees when kube-apiserver
    /// restarts). `false`: serve again.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.disconnect_watches();
        }
    }

    /// Answers every request with this HTTP status and a Status body (503,
    /// 500, 429 with `Retry-After: 1`, ...), or serves normally with `None`.
    /// Open watches are not touched. Note kube's default client retries 429,
    /// 503 and 504 itself (up to 15 times, exponential backoff from 5 ms).
    pub fn set_error_status(&self, status: Option<u16>) {
        *lock(&self.shared.error_status) = status;
    }

    /// Delays every answer (the response head; watch events flow at once).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// Period of BOOKMARK events on watches that allowed them (`None`: only
    /// [`Self::send_bookmarks`] and the initial-events-end one). Default 1 s.
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        *lock(&self.shared.bookmark_interval) = interval;
        self.shared.bookmark_changed.notify_one();
    }

    /// The Events clients created (core/v1 and events.k8s.io/v1), current
    /// state, in creation order.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.store();
        let mut evs: Vec<(u64, Value)> = store
            .objects
            .iter()
            .filter(|(k, _)| matches!(k.0, ResourceKind::Event | ResourceKind::CoreEvent))
            .map(|(_, s)| (s.seq, (*s.obj).clone()))
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

// ---------------------------------------------------------------------------
// HTTP

type Body = UnsyncBoxBody<Bytes, io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("JSON");
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(bookmark_ticker(shared.clone()));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    if shared.down.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let sh = shared.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(sh.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn bookmark_ticker(shared: Arc<Shared>) {
    loop {
        let interval = *lock(&shared.bookmark_interval);
        match interval {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => { let _ = shared.tx.send(Msg::Bookmark); }
                    _ = shared.bookmark_changed.notified() => {}
                }
            }
            None => shared.bookmark_changed.notified().await,
        }
    }
}

/// Parsed query string (percent-decoded).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (pct_decode(k), pct_decode(v)),
                    None => (pct_decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let digit = |c: u8| (c as char).to_digit(16);
                match (digit(b[i + 1]), digit(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    shared
        .stats()
        .requests
        .push(format!("{} {target}", req.method()));
    if shared.down.load(Ordering::SeqCst) {
        return Err(io::Error::other("fake apiserver is down"));
    }
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
        if shared.down.load(Ordering::SeqCst) {
            return Err(io::Error::other("fake apiserver is down"));
        }
    }
    if let Some(code) = *lock(&shared.error_status) {
        return Ok(ApiError::status(code).into_response());
    }
    let want = format!("Bearer {TOKEN}");
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == want);
    if !authorized {
        return Ok(ApiError::status(401).into_response());
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    Ok(route(&shared, &parts, &body).unwrap_or_else(ApiError::into_response))
}

fn route(
    shared: &Arc<Shared>,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let path = parts.uri.path();
    let q = Query::parse(parts.uri.query());
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get_only = |v: Value| {
        if parts.method == Method::GET {
            Ok(json_response(StatusCode::OK, &v))
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segs.as_slice() {
        ["version"] => get_only(json!({
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-lb-fake",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ["healthz" | "livez" | "readyz"] => {
            let mut r = Response::new(full("ok"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(r)
        }
        ["api"] => get_only(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
            ],
        })),
        ["api", "v1"] => get_only(resource_list("")),
        ["apis"] => {
            let groups: Vec<Value> = ["discovery.k8s.io", "events.k8s.io"]
                .into_iter()
                .map(api_group)
                .collect();
            get_only(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", g @ ("discovery.k8s.io" | "events.k8s.io")] => {
            let mut v = api_group(g);
            v["kind"] = "APIGroup".into();
            v["apiVersion"] = "v1".into();
            get_only(v)
        }
        ["apis", g @ ("discovery.k8s.io" | "events.k8s.io"), "v1"] => get_only(resource_list(g)),
        ["api", "v1", rest @ ..] => resource(shared, parts, &q, body, "", "v1", rest),
        ["apis", g, v, rest @ ..] => resource(shared, parts, &q, body, g, v, rest),
        _ => Err(ApiError::unknown_path()),
    }
}

fn api_group(name: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

fn resource_list(group: &str) -> Value {
    let resources: Vec<Value> = ResourceKind::ALL
        .into_iter()
        .filter(|k| k.group() == group)
        .map(|k| {
            json!({
                "name": k.plural(),
                "singularName": k.kind().to_lowercase(),
                "namespaced": k.namespaced(),
                "kind": k.kind(),
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    let gv = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn resource(
    shared: &Arc<Shared>,
    parts: &hyper::http::request::Parts,
    q: &Query,
    body: &Bytes,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let (plural, ns, name) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, None, Some(*name)),
        ["namespaces", ns, plural] => (*plural, Some(*ns), None),
        ["namespaces", ns, plural, name] => (*plural, Some(*ns), Some(*name)),
        _ => return Err(ApiError::unknown_path()),
    };
    let kind =
        ResourceKind::from_path(group, version, plural).ok_or_else(ApiError::unknown_path)?;
    // Namespaced URL for a cluster-scoped kind, or a single namespaced object
    // without its namespace: not a real path.
    if (ns.is_some() && !kind.namespaced()) || (name.is_some() && kind.namespaced() && ns.is_none())
    {
        return Err(ApiError::unknown_path());
    }
    let ns_str = ns.unwrap_or("");
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body)
            .or_else(|_| serde_yaml::from_slice(body))
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "the body of the request was in an unknown format: {e}"
                ))
            })
    };
    match (&parts.method, name) {
        (&Method::GET, _) if q.flag("watch") => {
            let mut filter = make_filter(kind, ns, q)?;
            if let Some(n) = name {
                filter.fields.push(FieldReq::Eq("name", n.to_string()));
            }
            start_watch(shared, filter, q)
        }
        (&Method::GET, None) => list(shared, kind, ns, q),
        (&Method::GET, Some(n)) => {
            let obj = shared
                .store()
                .get(kind, ns_str, n)
                .ok_or_else(|| ApiError::not_found(kind, n))?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::POST, None) if ns.is_some() || !kind.namespaced() => {
            let (obj, _) =
                shared
                    .store()
                    .write(kind, ns_str, None, WriteOp::Create, parse_body()?)?;
            Ok(json_response(StatusCode::CREATED, &obj))
        }
        (&Method::PUT, Some(n)) => {
            let (obj, _) =
                shared
                    .store()
                    .write(kind, ns_str, Some(n), WriteOp::Update, parse_body()?)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::PATCH, Some(n)) => {
            let ctype = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let op = match ctype.as_str() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    WriteOp::MergePatch
                }
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => WriteOp::Apply,
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other:?})"),
                    ))
                }
            };
            let (obj, created) = shared
                .store()
                .write(kind, ns_str, Some(n), op, parse_body()?)?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &obj))
        }
        (&Method::DELETE, Some(n)) => {
            let obj = shared
                .store()
                .delete(kind, ns_str, n)
                .ok_or_else(|| ApiError::not_found(kind, n))?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn make_filter(kind: ResourceKind, ns: Option<&str>, q: &Query) -> Result<Filter, ApiError> {
    Ok(Filter {
        kind,
        namespace: ns.map(str::to_string),
        labels: parse_label_selector(q.get("labelSelector").unwrap_or(""))?,
        fields: parse_field_selector(q.get("fieldSelector").unwrap_or(""))?,
    })
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn too_old(rv: u64, current: u64) -> String {
    format!("too old resource version: {rv} ({current})")
}

fn list(
    shared: &Arc<Shared>,
    kind: ResourceKind,
    ns: Option<&str>,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let filter = make_filter(kind, ns, q)?;
    let limit: usize = match q.get("limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
    };
    let rv_param = q.get("resourceVersion").unwrap_or("");
    let rv_match = q.get("resourceVersionMatch").unwrap_or("");
    match rv_match {
        "" | "NotOlderThan" | "Exact" => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "unsupported resourceVersionMatch {other:?}"
            )))
        }
    }
    if !rv_match.is_empty() && rv_param.is_empty() {
        return Err(ApiError::invalid(
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if rv_match == "Exact" && rv_param == "0" {
        return Err(ApiError::invalid(
            "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        ));
    }
    let store = shared.store();
    // (list RV, key to start after)
    let (list_rv, start_after): (u64, Option<(String, String)>) = match q.get("continue") {
        Some(tok) if !tok.is_empty() => {
            if !rv_param.is_empty() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let bad = || ApiError::bad_request("continue key is not valid");
            let decoded = unhex(tok).ok_or_else(bad)?;
            let mut it = decoded.splitn(3, '\0');
            let (Some(rv), Some(ns), Some(name)) = (it.next(), it.next(), it.next()) else {
                return Err(bad());
            };
            let rv: u64 = rv.parse().map_err(|_| bad())?;
            if rv < store.compacted {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                ));
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
        _ => {
            let rv = match (rv_param, rv_match) {
                ("", _) | ("0", _) => store.rv,
                (n, "Exact") => {
                    let n = parse_rv(n)?;
                    if n < store.compacted {
                        return Err(ApiError::expired(too_old(n, store.rv)));
                    }
                    if n > store.rv {
                        return Err(ApiError::new(
                            504,
                            "Timeout",
                            format!("Too large resource version: {n}, current: {}", store.rv),
                        ));
                    }
                    n
                }
                (n, _) => {
                    parse_rv(n)?;
                    store.rv
                }
            };
            (rv, None)
        }
    };
    let state = store.state_at(kind, list_rv);
    drop(store);

    let mut matching = state
        .iter()
        .filter(|(k, _)| start_after.as_ref().is_none_or(|s| *k > s))
        .filter(|(_, o)| filter.matches(o));
    let mut items = Vec::new();
    let mut last_key = None;
    for (k, o) in matching.by_ref() {
        let mut item = (**o).clone();
        if let Some(m) = item.as_object_mut() {
            // kube-apiserver's list items carry no apiVersion/kind.
            m.remove("apiVersion");
            m.remove("kind");
        }
        items.push(item);
        last_key = Some(k);
        if limit > 0 && items.len() == limit {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0 {
        let (kns, kname) = last_key.expect("a full page has a last key");
        metadata["continue"] = hex(&format!("{list_rv}\0{kns}\0{kname}")).into();
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    *shared.stats().lists.entry(kind).or_default() += 1;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    ))
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

fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let rv_param = q.get("resourceVersion").unwrap_or("");
    let rv_match = q.get("resourceVersionMatch").unwrap_or("");
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
        n => Some(parse_rv(n)?),
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
                let status = ApiError::expired(too_old(n, store.rv)).to_status();
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
            for (k, s) in store.objects.iter() {
                if k.0 == filter.kind && filter.matches(&s.obj) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    fn sel(s: &str) -> Filter {
        Filter {
            kind: ResourceKind::Service,
            namespace: None,
            labels: parse_label_selector(s).unwrap(),
            fields: vec![],
        }
    }

    #[test]
    fn label_selectors() {
        let w1 = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
        assert!(sel(w1).matches(&obj(json!({"app": "x"}))));
        assert!(!sel(w1).matches(&obj(json!({"service.kubernetes.io/headless": ""}))));
        assert!(!sel(w1).matches(&obj(
            json!({"service.kubernetes.io/service-proxy-name": "x"})
        )));
        assert!(sel("app").matches(&obj(json!({"app": "x"}))));
        assert!(!sel("app").matches(&obj(json!({}))));
        assert!(sel("app=x").matches(&obj(json!({"app": "x"}))));
        assert!(sel("app==x").matches(&obj(json!({"app": "x"}))));
        assert!(!sel("app=y").matches(&obj(json!({"app": "x"}))));
        assert!(sel("app!=y").matches(&obj(json!({"app": "x"}))));
        assert!(sel("app!=y").matches(&obj(json!({}))));
        assert!(sel("app in (x, y),tier notin (db)").matches(&obj(json!({"app": "y"}))));
        assert!(!sel("app in (x,y)").matches(&obj(json!({}))));
        assert!(!sel("tier notin (db)").matches(&obj(json!({"tier": "db"}))));
        assert!(sel("").matches(&obj(json!({}))));
        assert!(parse_label_selector("a b").is_err());
        assert!(parse_label_selector("a,,b").is_err());
        assert!(parse_field_selector("spec.foo=1").is_err());
    }

    #[test]
    fn misc() {
        assert_eq!(pct_decode("a%21b%2Cc+d"), "a!b,c d");
        assert_eq!(pct_decode("100%"), "100%");
        assert_eq!(unhex(&hex("5\0ns\0n")).unwrap(), "5\0ns\0n");
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        let mut a = json!({"a": {"b": 1, "c": 2}, "d": 1});
        merge_patch(&mut a, &json!({"a": {"b": null, "e": 3}, "d": [1]}));
        assert_eq!(a, json!({"a": {"c": 2, "e": 3}, "d": [1]}));
    }
}
