//! Bad input at scale (proptest, with shrinking): whatever a manifest holds,
//! the parser and the model never panic, and what they refuse is refused with
//! one line naming where. Generated objects use the real field names with
//! values of every shape, so they get deep into the model's validation.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::parse_manifest;
use lb_core::model::{self, NodeContext};

/// Field names the model reads, and a few it does not.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "creationTimestamp",
    "spec",
    "status",
    "type",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "ports",
    "port",
    "targetPort",
    "nodePort",
    "protocol",
    "sessionAffinity",
    "sessionAffinityConfig",
    "clientIP",
    "timeoutSeconds",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
    "healthCheckNodePort",
    "loadBalancerSourceRanges",
    "loadBalancer",
    "ingress",
    "ip",
    "ipMode",
    "addressType",
    "endpoints",
    "addresses",
    "conditions",
    "ready",
    "serving",
    "terminating",
    "nodeName",
    "hints",
    "forZones",
    "forNodes",
    "items",
    "other",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (0i64..70_000).prop_map(|n| json!(n)),
        prop_oneof![
            Just("TCP"),
            Just("UDP"),
            Just("SCTP"),
            Just("10.96.0.10"),
            Just("10.0.0.300"),
            Just("::1"),
            Just("None"),
            Just("ClientIP"),
            Just("Local"),
            Just("Cluster"),
            Just("LoadBalancer"),
            Just("NodePort"),
            Just("IPv4"),
            Just("IPv6"),
            Just(""),
            Just("10.0.0.0/8"),
            Just("kubernetes.io/service-name"),
            Just("x"),
        ]
        .prop_map(|s| json!(s)),
        "[a-z0-9./:-]{0,12}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..6).prop_map(
                |kv| {
                    let mut m = Map::new();
                    for (k, v) in kv {
                        m.insert(k.to_string(), v);
                    }
                    Value::Object(m)
                }
            ),
        ]
    })
}

/// A Service or EndpointSlice with random contents under the real header.
fn object() -> impl Strategy<Value = Value> {
    (any::<bool>(), value(), value(), value()).prop_map(|(svc, metadata, spec, rest)| {
        let mut m = match rest {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if svc {
            m.insert("apiVersion".into(), json!("v1"));
            m.insert("kind".into(), json!("Service"));
            m.insert("spec".into(), spec);
        } else {
            m.insert("apiVersion".into(), json!("discovery.k8s.io/v1"));
            m.insert("kind".into(), json!("EndpointSlice"));
        }
        m.insert("metadata".into(), metadata);
        Value::Object(m)
    })
}

/// A string a field of that kind might hold, good or bad.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "TCP",
            "UDP",
            "SCTP",
            "10.96.0.10",
            "10.96.0.11",
            "203.0.113.7",
            "10.0.0.300",
            "::1",
            "fd00::1",
            "None",
            "ClientIP",
            "Local",
            "Cluster",
            "LoadBalancer",
            "NodePort",
            "ClusterIP",
            "ExternalName",
            "Proxy",
            "VIP",
            "",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "10.0.0.0/33",
            "node-a",
            "node-b",
            "zone-a",
            "web",
            "http",
            "a-very-long-port-name",
        ])
        .prop_map(str::to_string),
        "[a-z0-9./:-]{0,20}",
    ]
}

fn port_number() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(80i64),
        Just(0),
        Just(-1),
        Just(65_536),
        1i64..65_536,
        any::<i32>().prop_map(i64::from)
    ]
}

/// A Service with the right shape and values of every kind (what the API
/// server would refuse included): deep into the model's validation.
fn service() -> impl Strategy<Value = Value> {
    (
        text(),
        proptest::collection::vec((text(), port_number(), proptest::option::of(port_number()), text()), 0..4),
        proptest::collection::vec(text(), 0..3),
        proptest::collection::vec(text(), 0..3),
        proptest::collection::vec(text(), 0..3),
        (text(), text(), text(), text(), proptest::option::of(any::<i32>())),
    )
        .prop_map(|(cluster_ip, ports, external_ips, ranges, ingress, (ty, affinity, etp, itp, timeout))| {
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "svc", "namespace": "default"},
                "spec": {
                    "type": ty, "clusterIP": cluster_ip, "externalIPs": external_ips,
                    "ports": ports.iter().map(|(name, port, np, proto)| json!({
                        "name": name, "port": port, "nodePort": np, "protocol": proto,
                    })).collect::<Vec<_>>(),
                    "sessionAffinity": affinity,
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                    "externalTrafficPolicy": etp, "internalTrafficPolicy": itp,
                    "loadBalancerSourceRanges": ranges,
                },
                "status": {"loadBalancer": {"ingress": ingress.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}},
            })
        })
}

/// An EndpointSlice of Service `svc` with the right shape and values of every kind.
fn endpoint_slice() -> impl Strategy<Value = Value> {
    (
        text(),
        proptest::collection::vec((text(), proptest::option::of(port_number()), text()), 0..3),
        proptest::collection::vec(
            (
                proptest::collection::vec(text(), 0..2),
                proptest::option::of(any::<bool>()),
                proptest::option::of(any::<bool>()),
                proptest::option::of(any::<bool>()),
                text(),
                proptest::collection::vec(text(), 0..2),
            ),
            0..4,
        ),
    )
        .prop_map(|(address_type, ports, endpoints)| {
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "svc-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "svc"}},
                "addressType": address_type,
                "ports": ports.iter().map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto})).collect::<Vec<_>>(),
                "endpoints": endpoints.iter().map(|(addresses, ready, serving, terminating, node, zones)| json!({
                    "addresses": addresses,
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                    "nodeName": node,
                    "hints": {"forZones": zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>(),
                              "forNodes": [{"name": node}]},
                })).collect::<Vec<_>>(),
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Well-shaped objects with values of every kind reach the model: it
    /// never panics, never programs a frontend it reported, and names the
    /// object and field of everything it skips.
    #[test]
    fn well_shaped_objects_with_bad_values_are_refused_field_by_field(
        svc in service(),
        slice in endpoint_slice(),
    ) {
        let text = format!("---\n{svc}\n---\n{slice}\n");
        let o = parse_manifest(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ctx = NodeContext::new("node-a", Some("zone-a".into()));
        let out = model::desired_state(&ctx, &o.services, &o.endpoint_slices);
        for e in &out.errors {
            let line = e.to_string();
            prop_assert!(!line.contains('\n'), "{line}");
            prop_assert!(!e.field.is_empty(), "{line}");
        }
        for p in out.state.services.values() {
            prop_assert!(!p.frontends.is_empty());
            prop_assert!(p.frontends.iter().all(|f| f.port != 0));
            prop_assert!(p.backends.iter().chain(&p.local_backends).all(|e| e.port != 0));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any text: parsed, or refused with one line that names the document.
    #[test]
    fn any_text_is_parsed_or_refused_in_one_line(text in "(?s).{0,300}") {
        if let Err(e) = parse_manifest(&text) {
            let line = e.to_string();
            prop_assert!(!line.contains('\n'), "{line}");
            prop_assert!(line.starts_with("document "), "{line}");
        }
    }

    /// Objects of every shape: the parser either refuses the file with one
    /// line or hands typed objects to the model, which never panics and
    /// names the object and field of everything it skips.
    #[test]
    fn random_objects_never_panic_the_parser_or_the_model(
        objects in proptest::collection::vec(object(), 1..4),
    ) {
        let text: String = objects
            .iter()
            .map(|o| format!("---\n{}", serde_json::to_string(o).expect("json")))
            .collect();
        match parse_manifest(&text) {
            Err(e) => prop_assert!(!e.to_string().contains('\n')),
            Ok(o) => {
                let ctx = NodeContext::new("node-a", Some("zone-a".into()));
                let out = model::desired_state(&ctx, &o.services, &o.endpoint_slices);
                for e in &out.errors {
                    let line = e.to_string();
                    prop_assert!(!line.contains('\n'), "{line}");
                    prop_assert!(
                        line.starts_with("Service ") || line.starts_with("EndpointSlice "),
                        "{line}"
                    );
                }
            }
        }
    }
}
