//! LIST: the objects of one kind at one resourceVersion, filtered by
//! selectors, in pages (`limit` / `continue`) that all show the state at the
//! first page's resourceVersion, as etcd-backed kube-apiserver does.

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::json;

use crate::error::ApiError;
use crate::http::{serialized_response, Body};
use crate::query::{hex, parse_resource_version, unhex, Query};
use crate::selector::Filter;
use crate::server::Shared;
use crate::ResourceKind;

pub(crate) fn list(
    shared: &Arc<Shared>,
    kind: ResourceKind,
    ns: Option<&str>,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let filter = Filter::from_query(kind, ns, q)?;
    let limit: usize = match q.get("limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
    };
    let rv_param = q.resource_version();
    let rv_match = q.resource_version_match();
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
                    let n = parse_resource_version(n)?;
                    if n < store.compacted {
                        return Err(ApiError::too_old_resource_version(n, store.rv));
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
                    parse_resource_version(n)?;
                    store.rv
                }
            };
            (rv, None)
        }
    };
    // With selectors the server does not say how many remain (as
    // kube-apiserver): only whether more exist, without filtering them all.
    let count_to = if filter.has_selectors() {
        1
    } else {
        usize::MAX
    };
    let (page, remaining) =
        store.page_at(kind, list_rv, start_after.as_ref(), limit, count_to, |o| {
            filter.matches(o)
        });
    drop(store);
    let last_key = page.last().map(|(k, _)| k.clone());
    let items: Vec<ListItem> = page.into_iter().map(|(_, o)| ListItem(o)).collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0 {
        let (kns, kname) = last_key.expect("a full page has a last key");
        let (kns, kname) = (&kns, &kname);
        metadata["continue"] = hex(&format!("{list_rv}\0{kns}\0{kname}")).into();
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    *shared.stats().lists.entry(kind).or_default() += 1;
    let list = ListBody {
        kind: kind.list_kind(),
        api_version: kind.api_version(),
        metadata,
        items,
    };
    Ok(serialized_response(StatusCode::OK, &list))
}

/// A list response, serialized straight from the stored objects (no copy of
/// them: a list of 10,000 objects is the control-plane bench's first step,
/// and the server's own time counts there).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody {
    kind: String,
    api_version: &'static str,
    metadata: serde_json::Value,
    items: Vec<ListItem>,
}

/// A stored object as a list item: kube-apiserver's list items carry no
/// apiVersion/kind.
struct ListItem(Arc<serde_json::Value>);

impl Serialize for ListItem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some(fields) = self.0.as_object() else {
            return self.0.serialize(s);
        };
        let kept = fields
            .iter()
            .filter(|(k, _)| *k != "apiVersion" && *k != "kind");
        let mut map = s.serialize_map(None)?;
        for (k, v) in kept {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}
