//! The store: objects of every kind, one resourceVersion counter shared by
//! all of them (as etcd has), and the history of changes that watches resume
//! from. Every write goes through [`Store::commit`], which also tells the
//! open watches, under the store lock, so they see changes in RV order.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::object::{
    has_generation, merge_patch, meta_str, rfc3339_now, set_rv, spec_changed, valid_name, validate,
};
use crate::watch::Msg;
use crate::ResourceKind;

/// (kind, namespace or "" for cluster-scoped kinds, name): sorted, so a
/// kind's objects are one range, by namespace and name.
type Key = (ResourceKind, String, String);

/// What a change did to its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change, as etcd's watch would report it; the history is a list of them.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: ResourceKind,
    pub(crate) typ: ChangeType,
    /// The new object (for DELETED: the last state, with the deletion's RV).
    pub(crate) obj: Arc<Value>,
    /// The object before the change (None for a creation).
    pub(crate) prev: Option<Arc<Value>>,
}

/// An object as stored.
/// A listed object: (namespace, name) and the object.
pub(crate) type Listed = ((String, String), Arc<Value>);

pub(crate) struct Stored {
    pub(crate) obj: Arc<Value>,
    /// Creation order (for [`crate::FakeApiServer::events`]).
    pub(crate) seq: u64,
}

/// Everything stored, behind one lock (see [`crate::server::Shared`]).
pub(crate) struct Store {
    /// The resourceVersion of the last change.
    pub(crate) rv: u64,
    /// History at or before this RV is forgotten: older RVs get 410.
    pub(crate) compacted: u64,
    seq: u64,
    uid_seed: u64,
    objects: BTreeMap<Key, Stored>,
    pub(crate) history: VecDeque<Arc<Change>>,
    tx: broadcast::Sender<Msg>,
}

/// How a write treats an existing object (the HTTP verb, or a test's apply).
pub(crate) enum WriteOp {
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
    pub(crate) fn new(tx: broadcast::Sender<Msg>) -> Self {
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
    pub(crate) fn commit(&mut self, key: Key, new: Option<Value>) -> Arc<Value> {
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
                    ChangeType::Modified
                } else {
                    ChangeType::Added
                };
                (typ, obj)
            }
            None => {
                self.objects.remove(&key);
                let mut last = prev.as_deref().cloned().unwrap_or(Value::Null);
                set_rv(&mut last, rv);
                (ChangeType::Deleted, Arc::new(last))
            }
        };
        let ev = Arc::new(Change {
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

    pub(crate) fn get(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|s| s.obj.clone())
    }

    /// The objects of `kind` as they were at `rv` (which must not be compacted),
    /// keyed by (namespace, name).
    /// One page of a list: up to `limit` (0: all) objects of `kind` after
    /// `start_after` (namespace, name) that pass `keep`, as they were at
    /// `rv`, in key order; and how many more pass `keep` (counted only up to
    /// `count_to`). Cheap when `rv` is the current version (the common case:
    /// no history to undo, no copy of the whole kind).
    pub(crate) fn page_at(
        &self,
        kind: ResourceKind,
        rv: u64,
        start_after: Option<&(String, String)>,
        limit: usize,
        count_to: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Listed>, usize) {
        let newer = self
            .history
            .iter()
            .rev()
            .take_while(|e| e.rv > rv)
            .any(|e| e.kind == kind);
        let mut items = Vec::new();
        let mut rest = 0;
        let mut visit = |k: &(String, String), o: &Arc<Value>| -> bool {
            if !keep(o) {
                return true;
            }
            if limit == 0 || items.len() < limit {
                items.push((k.clone(), o.clone()));
                return true;
            }
            rest += 1;
            rest < count_to
        };
        if newer {
            for (k, o) in self
                .state_at(kind, rv)
                .iter()
                .filter(|(k, _)| start_after.is_none_or(|s| *k > s))
            {
                if !visit(k, o) {
                    break;
                }
            }
        } else {
            let from = match start_after {
                Some((ns, name)) => Bound::Excluded((kind, ns.clone(), name.clone())),
                None => Bound::Included((kind, String::new(), String::new())),
            };
            for (k, stored) in self
                .objects
                .range((from, Bound::Unbounded))
                .take_while(|(k, _)| k.0 == kind)
            {
                if !visit(&(k.1.clone(), k.2.clone()), &stored.obj) {
                    break;
                }
            }
        }
        (items, rest)
    }

    pub(crate) fn state_at(
        &self,
        kind: ResourceKind,
        rv: u64,
    ) -> BTreeMap<(String, String), Arc<Value>> {
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
    pub(crate) fn write(
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

    pub(crate) fn delete(
        &mut self,
        kind: ResourceKind,
        ns: &str,
        name: &str,
    ) -> Option<Arc<Value>> {
        let ns = if kind.namespaced() { ns } else { "" };
        let key: Key = (kind, ns.to_string(), name.to_string());
        if !self.objects.contains_key(&key) {
            return None;
        }
        Some(self.commit(key, None))
    }

    /// Forgets the history up to now: older resourceVersions get 410 Expired.
    pub(crate) fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// The current objects of `kind`, sorted by namespace and name.
    pub(crate) fn objects_of(&self, kind: ResourceKind) -> impl Iterator<Item = &Stored> {
        self.objects
            .range((kind, String::new(), String::new())..)
            .take_while(move |(k, _)| k.0 == kind)
            .map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(cluster_ip: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"clusterIP": cluster_ip},
        })
    }

    #[test]
    fn writes_share_one_resource_version_and_keep_history() {
        let (tx, mut rx) = broadcast::channel(16);
        let mut s = Store::new(tx);
        let svc = ResourceKind::Service;
        let (a, created) = s
            .write(svc, "default", None, WriteOp::Upsert, service("10.96.0.1"))
            .unwrap();
        assert!(created);
        assert_eq!(meta_str(&a, "resourceVersion"), "2");
        assert_eq!(a["metadata"]["generation"], 1);
        assert_eq!(meta_str(&a, "uid").len(), 36);
        assert!(matches!(rx.try_recv(), Ok(Msg::Event(c)) if c.typ == ChangeType::Added));

        // The same object again changes nothing: no new RV, no event.
        let (_, created) = s
            .write(svc, "default", None, WriteOp::Upsert, service("10.96.0.1"))
            .unwrap();
        assert!(!created);
        assert_eq!(s.rv, 2);
        assert!(rx.try_recv().is_err());

        // A spec change bumps the generation; the uid stays.
        let (b, _) = s
            .write(svc, "default", None, WriteOp::Upsert, service("10.96.0.2"))
            .unwrap();
        assert_eq!(b["metadata"]["generation"], 2);
        assert_eq!(meta_str(&b, "uid"), meta_str(&a, "uid"));
        let err = s
            .write(svc, "default", None, WriteOp::Create, service("10.96.0.3"))
            .unwrap_err();
        assert_eq!(err.code, 409);

        // Deleted at RV 4; the past states stay readable from the history.
        s.delete(svc, "default", "a").unwrap();
        assert_eq!(s.rv, 4);
        let ip_at = |rv| {
            s.state_at(svc, rv)
                .values()
                .map(|o| o["spec"]["clusterIP"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert!(ip_at(1).is_empty());
        assert_eq!(ip_at(2), ["10.96.0.1"]);
        assert_eq!(ip_at(3), ["10.96.0.2"]);
        assert!(ip_at(4).is_empty());
        s.compact();
        assert_eq!((s.compacted, s.history.len()), (4, 0));
    }
}
