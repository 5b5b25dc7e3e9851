//! Which handler a request goes to: discovery documents (`/version`, `/api`,
//! `/apis/...`), health endpoints, and the verbs on resources (LIST, WATCH,
//! GET, POST, PUT, PATCH, DELETE). Anything else is a 404 Status.

use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::http::{full, json_response, Body};
use crate::list::list;
use crate::query::Query;
use crate::selector::{FieldReq, Filter};
use crate::server::Shared;
use crate::store::WriteOp;
use crate::watch::start_watch;
use crate::ResourceKind;

pub(crate) fn route(
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
        // JSON, or YAML (server-side apply may send it).
        serde_json::from_slice(body).or_else(|_| {
            serde_saphyr::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!(
                    "the body of the request was in an unknown format: {e}"
                ))
            })
        })
    };
    match (&parts.method, name) {
        (&Method::GET, _) if q.flag("watch") => {
            let mut filter = Filter::from_query(kind, ns, q)?;
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
