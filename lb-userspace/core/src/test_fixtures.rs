//! Test fixtures written as YAML (flow style reads like what a user
//! writes), parsed into typed Kubernetes objects with serde-saphyr.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

#[derive(Debug, Default)]
pub struct Fixture {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

impl Fixture {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    }
}

/// Multi-document YAML (and `List`s) -> objects by kind (other kinds are
/// ignored).
/// Panics on bad YAML: fixtures are the test's own.
pub fn parse_fixture(yaml: &str) -> Fixture {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("fixture: {e}\n{yaml}"));
    let mut out = Fixture::default();
    // A `kind: List` document holds objects in `items`.
    let docs = docs
        .into_iter()
        .flat_map(|mut doc| match doc.get_mut("items") {
            Some(serde_json::Value::Array(items)) => std::mem::take(items),
            _ => vec![doc],
        });
    for doc in docs {
        let kind = doc
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let bad = |e: serde_json::Error| -> ! { panic!("fixture {kind}: {e}\n{yaml}") };
        match kind.as_str() {
            "Service" => out
                .services
                .push(serde_json::from_value(doc).unwrap_or_else(|e| bad(e))),
            "EndpointSlice" => out
                .endpoint_slices
                .push(serde_json::from_value(doc).unwrap_or_else(|e| bad(e))),
            "Node" => out
                .nodes
                .push(serde_json::from_value(doc).unwrap_or_else(|e| bad(e))),
            _ => {}
        }
    }
    out
}
