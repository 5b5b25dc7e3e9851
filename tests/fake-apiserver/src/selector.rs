//! Label and field selectors as kube-apiserver parses them, and the
//! [`Filter`] a LIST or WATCH applies: which objects it selects and which
//! watch event a change becomes for it.

use std::sync::Arc;

use serde_json::Value;

use crate::error::ApiError;
use crate::object::set_rv;
use crate::query::Query;
use crate::store::{Change, ChangeType};
use crate::ResourceKind;

/// One requirement of a label selector.
#[derive(Clone, Debug)]
pub(crate) enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// One requirement of a field selector (`metadata.name`, `metadata.namespace`).
#[derive(Clone, Debug)]
pub(crate) enum FieldReq {
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
pub(crate) fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, ApiError> {
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

pub(crate) fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, ApiError> {
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
pub(crate) struct Filter {
    pub(crate) kind: ResourceKind,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: Vec<LabelReq>,
    pub(crate) fields: Vec<FieldReq>,
}

impl Filter {
    /// The filter of a request for `kind` (in namespace `ns`, or all), from
    /// its `labelSelector` and `fieldSelector` parameters.
    pub(crate) fn from_query(
        kind: ResourceKind,
        ns: Option<&str>,
        q: &Query,
    ) -> Result<Filter, ApiError> {
        Ok(Filter {
            kind,
            namespace: ns.map(str::to_string),
            labels: parse_label_selector(q.get("labelSelector").unwrap_or(""))?,
            fields: parse_field_selector(q.get("fieldSelector").unwrap_or(""))?,
        })
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
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

    pub(crate) fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    /// The watch event a change produces for this filter, as kube-apiserver's
    /// cacher decides it: an object that stops matching is DELETED (old
    /// content, new RV); one that starts matching is ADDED.
    pub(crate) fn watch_event(&self, ev: &Change) -> Option<(&'static str, Arc<Value>)> {
        if ev.kind != self.kind {
            return None;
        }
        let cur_pass = ev.typ != ChangeType::Deleted && self.matches(&ev.obj);
        let old_pass = ev.prev.as_deref().is_some_and(|p| self.matches(p));
        match (cur_pass, old_pass) {
            (true, true) => Some(("MODIFIED", ev.obj.clone())),
            (true, false) => Some(("ADDED", ev.obj.clone())),
            (false, true) if ev.typ == ChangeType::Deleted => Some(("DELETED", ev.obj.clone())),
            (false, true) => {
                let mut old = ev.prev.as_deref().cloned().unwrap_or(Value::Null);
                set_rv(&mut old, ev.rv);
                Some(("DELETED", Arc::new(old)))
            }
            (false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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
}
