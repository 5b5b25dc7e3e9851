//! Manifest source: Kubernetes objects from a YAML file instead of the API server.
//!
//! The input is ordinary Kubernetes YAML as `kubectl get -o yaml` prints it:
//! any number of `---` separated documents, each a single object or a `List`
//! (`kind: List`, or a typed list such as `ServiceList`) whose `items` are
//! objects. Empty documents are allowed.
//!
//! Services (`v1`), EndpointSlices (`discovery.k8s.io/v1`) and Nodes (`v1`)
//! are returned typed; other kinds are not an error, they are listed in
//! [`Objects::ignored`] so the caller can log them.
//!
//! The file is all-or-nothing: a malformed document (bad YAML, missing
//! `kind`/`apiVersion`, a field of the wrong type) makes [`parse_manifest`]
//! fail with a one-line [`ManifestError`] naming the document (1-based), the
//! object when it can be read, and the field path. The caller keeps the
//! previous state rather than programming a file it only half understood
//! (a skipped Service document would otherwise look like a deleted Service).
//!
//! Objects without `metadata.namespace` get `default`, as `kubectl apply`
//! would do for a namespaced kind.
//!
//! YAML is read with serde-saphyr (the parser kube-client itself uses) into
//! JSON values, then into the k8s-openapi types with serde_path_to_error, so
//! an error names the field. Documents are split at `---` lines, as kubectl's
//! YAML reader does, so that an error names its document and its line in the
//! file.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::model::{self, HealthCheck, ModelOutput};
use lb_core::DesiredState;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{debug, error, info};

use super::Changes;

/// The objects of a manifest that the agent understands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    /// Objects of other kinds, as `Kind/name` (`Kind/name (apiVersion)` when
    /// the kind is one of ours but the apiVersion is not).
    pub ignored: Vec<String>,
}

impl Objects {
    /// The Node called `name`, if the manifest has one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    }
}

/// Why a manifest could not be used. Displays as one line, e.g.
/// `document 3 (Service default/web): spec.ports[0].port: invalid type: string "eighty", expected i32`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 0-based index in the `items` of a List document.
    pub item: Option<usize>,
    /// `Kind namespace/name` (or less, as far as it could be read).
    pub object: Option<String>,
    /// Field path inside the object (`spec.ports[0].port`), when known.
    pub path: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        f.write_str(": ")?;
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Manifest mode's source: the file, polled. All or nothing: a file that
/// does not parse, or whose objects the model rejects, changes nothing (a
/// skipped Service would otherwise look like a deleted one).
#[derive(Debug)]
pub struct ManifestSource {
    path: PathBuf,
    node_name: String,
    /// Hash of the text last parsed.
    hash: Option<u64>,
    last_read_error: Option<String>,
    desired: DesiredState,
    health_checks: Vec<HealthCheck>,
    /// The last good file has not been handed to the planner yet.
    pending: bool,
    /// A valid file was read once: before that, nothing is programmed.
    loaded: bool,
}

impl ManifestSource {
    pub fn new(path: PathBuf, node_name: String) -> Self {
        Self {
            path,
            node_name,
            hash: None,
            last_read_error: None,
            desired: DesiredState::default(),
            health_checks: Vec::new(),
            pending: false,
            loaded: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file. Returns whether it changed and is valid (a new
    /// desired state to program).
    pub fn poll(&mut self) -> bool {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                if self.last_read_error.as_ref() != Some(&msg) {
                    error!(manifest = %self.path.display(), error = %msg, "cannot read manifest; keeping the current state");
                    self.last_read_error = Some(msg);
                }
                return false;
            }
        };
        self.last_read_error = None;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if self.hash == Some(hash) {
            return false;
        }
        self.hash = Some(hash);
        match self.compute(&text) {
            Ok(out) => {
                info!(manifest = %self.path.display(), service_ports = out.state.services.len(), "manifest loaded");
                self.desired = out.state;
                self.health_checks = out.health_checks;
                self.pending = true;
                self.loaded = true;
                true
            }
            Err(errors) => {
                for e in &errors {
                    error!(manifest = %self.path.display(), "{e}");
                }
                error!(manifest = %self.path.display(), errors = errors.len(), "manifest rejected; keeping the current state");
                false
            }
        }
    }

    /// Manifest text -> model output, or every error found (document, field).
    fn compute(&self, text: &str) -> Result<ModelOutput, Vec<String>> {
        let objects = parse_manifest(text).map_err(|e| vec![e.to_string()])?;
        for ignored in &objects.ignored {
            debug!(object = %ignored, "ignoring object of a kind lb does not use");
        }
        let ctx = model::NodeContext::with_node(&self.node_name, objects.node(&self.node_name));
        let out = model::desired_state(&ctx, &objects.services, &objects.endpoint_slices);
        if out.errors.is_empty() {
            Ok(out)
        } else {
            Err(out.errors.iter().map(ToString::to_string).collect())
        }
    }

    /// A valid file has been read.
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// A new file is due to be programmed: always a full diff.
    pub fn take_changes(&mut self) -> Changes {
        Changes {
            full: std::mem::take(&mut self.pending),
            ..Changes::default()
        }
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn health_checks(&self) -> &[HealthCheck] {
        &self.health_checks
    }
}

const API_CORE_V1: &str = "v1";
const API_DISCOVERY_V1: &str = "discovery.k8s.io/v1";

/// Splits a manifest into its documents at `---` lines (kubectl's rule):
/// (text, line of the file its first line is on). A `---` line may carry
/// the start of its document after the marker.
fn documents(text: &str) -> Vec<(String, usize)> {
    let mut out = vec![(String::new(), 1)];
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let marker = line
            .strip_prefix("---")
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r']));
        match marker {
            Some(rest) => out.push((rest.trim_start_matches([' ', '\t']).to_string(), i + 1)),
            None => out.last_mut().expect("one document").0.push_str(line),
        }
    }
    out
}

/// A YAML syntax error in one line, with the line and column in the file.
fn yaml_error(e: &serde_saphyr::Error, first_line: usize) -> String {
    let text = e.without_snippet().to_string();
    let message = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text.as_str(),
    };
    match e.location() {
        Some(l) => format!(
            "{message} at line {} column {}",
            first_line + l.line() as usize - 1,
            l.column()
        ),
        None => message.to_string(),
    }
}

/// Parses a multi-document Kubernetes YAML manifest. See the module docs.
pub fn parse_manifest(text: &str) -> Result<Objects, ManifestError> {
    let mut out = Objects::default();
    let docs = documents(text);
    // A leading `---` opens the first document: don't count the empty text
    // before it.
    let skip = usize::from(text.starts_with("---"));
    for (i, (doc, first_line)) in docs.iter().enumerate().skip(skip) {
        let document = i + 1 - skip;
        let value: Option<Value> = serde_saphyr::from_str(doc).map_err(|e| ManifestError {
            document,
            item: None,
            object: None,
            path: None,
            message: format!("invalid YAML: {}", yaml_error(&e, *first_line)),
        })?;
        let Some(mut value) = value.filter(|v| !v.is_null()) else {
            continue; // empty document
        };
        let at = Position {
            document,
            item: None,
        };
        let head = header(&value, at, None)?;
        if head.kind == "List" || (head.kind.ends_with("List") && value.get("items").is_some()) {
            let items = match value.get_mut("items") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => std::mem::take(items),
                Some(_) => {
                    return Err(at.error(
                        Some(head.describe()),
                        Some("items".into()),
                        "expected a list of objects".into(),
                    ))
                }
            };
            // Typed lists (ServiceList, ...) as the API returns them omit
            // kind/apiVersion on the items.
            let item_default = (head.kind != "List").then(|| Header {
                kind: head.kind.trim_end_matches("List").to_string(),
                api_version: head.api_version.clone(),
                namespace: None,
                name: None,
            });
            for (j, item) in items.into_iter().enumerate() {
                let at = Position {
                    document,
                    item: Some(j),
                };
                let h = header(&item, at, item_default.as_ref())?;
                if h.kind.ends_with("List") && item.get("items").is_some() {
                    return Err(at.error(
                        Some(h.describe()),
                        None,
                        "a List inside a List is not supported".into(),
                    ));
                }
                add_object(&mut out, item, h, at)?;
            }
        } else {
            add_object(&mut out, value, head, at)?;
        }
    }
    Ok(out)
}

#[derive(Clone, Copy)]
struct Position {
    document: usize,
    item: Option<usize>,
}

impl Position {
    fn error(self, object: Option<String>, path: Option<String>, message: String) -> ManifestError {
        ManifestError {
            document: self.document,
            item: self.item,
            object,
            path,
            message,
        }
    }
}

struct Header {
    kind: String,
    api_version: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Header {
    /// `Kind namespace/name`, `Kind name` or `Kind`.
    fn describe(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => format!("{} {ns}/{n}", self.kind),
            (None, Some(n)) => format!("{} {n}", self.kind),
            _ => self.kind.clone(),
        }
    }
}

/// Reads kind, apiVersion and metadata.namespace/name of an object, leniently
/// for the names (they only label errors), strictly for kind and apiVersion.
fn header(value: &Value, at: Position, default: Option<&Header>) -> Result<Header, ManifestError> {
    if !value.is_object() {
        return Err(at.error(
            None,
            None,
            format!(
                "expected a Kubernetes object (a mapping), found {}",
                value_kind(value)
            ),
        ));
    }
    let meta = value.get("metadata");
    let meta_str = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let namespace = meta_str("namespace");
    let name = meta_str("name");
    let field = |key: &str, default: Option<&String>| -> Result<Option<String>, String> {
        match value.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            None | Some(Value::Null) => Ok(default.cloned()),
            Some(Value::String(_)) => Ok(default.cloned()),
            Some(other) => Err(format!(
                "invalid type: {}, expected a string",
                value_kind(other)
            )),
        }
    };
    let kind = field("kind", default.map(|d| &d.kind));
    let api_version = field("apiVersion", default.map(|d| &d.api_version));
    let partial = |kind: Option<&String>| {
        let h = Header {
            kind: kind.cloned().unwrap_or_else(|| "object".into()),
            api_version: String::new(),
            namespace: namespace.clone(),
            name: name.clone(),
        };
        (kind.is_some() || name.is_some()).then(|| h.describe())
    };
    let kind = match kind {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(at.error(partial(None), Some("kind".into()), "missing field".into()))
        }
        Err(e) => return Err(at.error(partial(None), Some("kind".into()), e)),
    };
    let api_version = match api_version {
        Ok(Some(v)) => v,
        Ok(None) => {
            return Err(at.error(
                partial(Some(&kind)),
                Some("apiVersion".into()),
                "missing field".into(),
            ))
        }
        Err(e) => return Err(at.error(partial(Some(&kind)), Some("apiVersion".into()), e)),
    };
    Ok(Header {
        kind,
        api_version,
        namespace,
        name,
    })
}

fn value_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a sequence".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn add_object(
    out: &mut Objects,
    mut value: Value,
    head: Header,
    at: Position,
) -> Result<(), ManifestError> {
    // Typed-list items may lack kind/apiVersion; the k8s-openapi types
    // accept that, but fill them in so the object reads as complete.
    if let Value::Object(m) = &mut value {
        m.entry("kind")
            .or_insert_with(|| Value::String(head.kind.clone()));
        m.entry("apiVersion")
            .or_insert_with(|| Value::String(head.api_version.clone()));
    }
    match (head.api_version.as_str(), head.kind.as_str()) {
        (API_CORE_V1, "Service") => {
            let mut svc: Service = typed(value, &head, at)?;
            svc.metadata
                .namespace
                .get_or_insert_with(|| "default".into());
            out.services.push(svc);
        }
        (API_DISCOVERY_V1, "EndpointSlice") => {
            let mut slice: EndpointSlice = typed(value, &head, at)?;
            slice
                .metadata
                .namespace
                .get_or_insert_with(|| "default".into());
            out.endpoint_slices.push(slice);
        }
        (API_CORE_V1, "Node") => out.nodes.push(typed(value, &head, at)?),
        (_, kind) => {
            let name = head.name.as_deref().unwrap_or("<unnamed>");
            if matches!(kind, "Service" | "EndpointSlice" | "Node") {
                out.ignored
                    .push(format!("{kind}/{name} ({})", head.api_version));
            } else {
                out.ignored.push(format!("{kind}/{name}"));
            }
        }
    }
    Ok(())
}

fn typed<T: DeserializeOwned>(
    value: Value,
    head: &Header,
    at: Position,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = (path != "." && !path.is_empty()).then_some(path);
        at.error(Some(head.describe()), path, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true}
  nodeName: node-a
ports:
- name: http
  port: 8080
  protocol: TCP
";

    const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    topology.kubernetes.io/zone: zone-a
";

    #[test]
    fn multi_document_with_empty_documents() {
        let text = format!("---\n{SVC}---\n---\n{SLICE}---\n# only a comment\n---\n{NODE}");
        let o = parse_manifest(&text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.services[0].metadata.name.as_deref(), Some("web"));
        let spec = o.services[0].spec.as_ref().unwrap();
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 80);
        assert_eq!(o.endpoint_slices.len(), 1);
        assert_eq!(
            o.endpoint_slices[0].endpoints[0].addresses,
            vec!["10.1.0.5"]
        );
        assert_eq!(o.nodes.len(), 1);
        assert!(o.node("node-a").is_some());
        assert!(o.node("node-b").is_none());
        assert!(o.ignored.is_empty());
    }

    #[test]
    fn empty_input_is_empty() {
        assert_eq!(parse_manifest("").unwrap(), Objects::default());
        assert_eq!(parse_manifest("---\n---\n").unwrap(), Objects::default());
    }

    fn indent(s: &str, n: usize) -> String {
        let pad = " ".repeat(n);
        s.lines().map(|l| format!("{pad}{l}\n")).collect::<String>()
    }

    #[test]
    fn kind_list_items() {
        let text = format!(
            "apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n- {}- {}",
            indent(SVC, 2).trim_start(),
            indent(SLICE, 2).trim_start()
        );
        let o = parse_manifest(&text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.endpoint_slices.len(), 1);
    }

    #[test]
    fn typed_list_items_without_kind() {
        let text = "\
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: a, namespace: ns1}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 53, protocol: UDP}]}
- metadata: {name: b}
  spec: {clusterIP: 10.96.0.2}
";
        let o = parse_manifest(text).unwrap();
        assert_eq!(o.services.len(), 2);
        assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("ns1"));
        // Namespace defaults like kubectl apply.
        assert_eq!(o.services[1].metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn other_kinds_are_ignored_and_listed() {
        let text = format!(
            "{SVC}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec: {{replicas: 3}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{a: b}}\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {{name: kn}}\n"
        );
        let o = parse_manifest(&text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(
            o.ignored,
            vec![
                "Deployment/web".to_string(),
                "ConfigMap/cfg".to_string(),
                "Service/kn (serving.knative.dev/v1)".to_string()
            ]
        );
    }

    #[test]
    fn wrong_type_names_document_object_and_field() {
        let bad = SVC.replace("port: 80", "port: \"eighty\"");
        let text = format!("{NODE}---\n{SLICE}---\n{bad}");
        let e = parse_manifest(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 3 (Service default/web): spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        );
        assert_eq!(e.document, 3);
        assert_eq!(e.path.as_deref(), Some("spec.ports[0].port"));
    }

    #[test]
    fn error_inside_a_list_names_the_item() {
        let bad = SLICE.replace("ready: true", "ready: maybe");
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}- {}",
            indent(SVC, 2).trim_start(),
            indent(&bad, 2).trim_start()
        );
        let e = parse_manifest(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1, items[1] (EndpointSlice default/web-abc): endpoints[0].conditions.ready: invalid type: string \"maybe\", expected a boolean"
        );
    }

    #[test]
    fn missing_kind_or_api_version_is_an_error() {
        let e = parse_manifest("apiVersion: v1\nmetadata: {name: x}\n").unwrap_err();
        assert_eq!(e.to_string(), "document 1 (object x): kind: missing field");
        let text = format!("{SVC}---\nkind: Service\nmetadata: {{name: why, namespace: ns}}\n");
        let e = parse_manifest(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 2 (Service ns/why): apiVersion: missing field"
        );
        let e = parse_manifest("kind: [a]\napiVersion: v1\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1: kind: invalid type: a sequence, expected a string"
        );
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let text = format!("{SVC}---\nkind: Service\n  bad: indent: here\n");
        let e = parse_manifest(&text).unwrap_err();
        assert_eq!(e.document, 2);
        let s = e.to_string();
        assert!(s.starts_with("document 2: invalid YAML: "), "{s}");
        assert!(!s.contains('\n'), "{s}");
    }

    #[test]
    fn scalar_document_is_an_error() {
        let e = parse_manifest("just a string\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1: expected a Kubernetes object (a mapping), found string \"just a string\""
        );
    }

    #[test]
    fn wrong_shape_of_a_list_field() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: d}\naddressType: IPv4\nendpoints: {a: 1}\n";
        let e = parse_manifest(text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (EndpointSlice d/s): endpoints: invalid type: map, expected a sequence"
        );
    }

    #[test]
    fn bad_yaml_line_numbers_are_file_absolute() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\na: b\n  c: d\n";
        assert_eq!(
            parse_manifest(text).unwrap_err().to_string(),
            "document 2: invalid YAML: mapping values are not allowed in this context at line 6 column 4"
        );
    }

    #[test]
    fn yaml_1_1_booleans_read_as_kubectl_reads_them() {
        // `n`, `no`, `off` are booleans to kubectl (YAML 1.1) and here: an
        // unquoted namespace `n` is an error naming the field, not a string.
        let text = SVC.replace("namespace: default", "namespace: n");
        let e = parse_manifest(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (Service web): metadata.namespace: invalid type: boolean `false`, expected a string"
        );
        let quoted = SVC.replace("namespace: default", "namespace: 'n'");
        assert_eq!(
            parse_manifest(&quoted).unwrap().services[0]
                .metadata
                .namespace
                .as_deref(),
            Some("n")
        );
    }

    #[test]
    fn target_port_accepts_int_and_string() {
        let named = SVC.replace("targetPort: 8080", "targetPort: http");
        let o = parse_manifest(&format!(
            "{SVC}---\n{}",
            named.replace("name: web", "name: web2")
        ))
        .unwrap();
        assert_eq!(o.services.len(), 2);
    }
}
