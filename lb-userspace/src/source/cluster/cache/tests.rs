//! The cluster cache: one Service recomputed per event, relists diffed,
//! errors reported once. Objects are built as typed k8s-openapi values.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_core::model::{Interner, ParsedService, ParsedSlice};
use lb_core::{Protocol, ServicePortName};

use super::*;

fn web(cluster_ip: &str) -> ParsedService {
    ParsedService::parse(&Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("u1".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

fn raw_slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(
                [(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                node_name: Some("n1".into()),
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
    }
}

fn slice(name: &str, service: &str, ips: &[&str]) -> ParsedSlice {
    ParsedSlice::parse(
        &raw_slice(name, service, ips),
        "n1",
        &mut Interner::default(),
    )
}

fn http() -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn cache() -> ClusterCache {
    ClusterCache::new(NodeContext::new("n1", None))
}

fn backends(c: &ClusterCache) -> Vec<String> {
    c.port(&http())
        .map(|p| p.backends.iter().map(|e| e.addr.to_string()).collect())
        .unwrap_or_default()
}

fn only_http() -> BTreeSet<ServicePortName> {
    [http()].into()
}

#[test]
fn an_endpoint_change_touches_only_its_service() {
    let mut c = cache();
    c.replace_services(vec![web("10.96.0.10")]);
    c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"])]);
    let first = c.take_changes();
    assert!(first.full && first.ports.is_empty());
    assert_eq!(backends(&c), vec!["10.244.1.2"]);

    c.apply_slice(slice("web-1", "web", &["10.244.1.2", "10.244.1.3"]));
    let ch = c.take_changes();
    assert!(!ch.full);
    assert_eq!(ch.services_touched, 1);
    assert_eq!(ch.ports, only_http());
    assert_eq!(backends(&c), vec!["10.244.1.2", "10.244.1.3"]);

    // The same object again: nothing to do.
    c.apply_slice(slice("web-1", "web", &["10.244.1.2", "10.244.1.3"]));
    assert!(c.take_changes().is_empty());
}

#[test]
fn slices_of_one_service_merge_and_deletes_follow() {
    let mut c = cache();
    c.apply_service(web("10.96.0.10"));
    c.apply_slice(slice("web-1", "web", &["10.244.1.2"]));
    c.apply_slice(slice("web-2", "web", &["10.244.1.3"]));
    c.take_changes();
    assert_eq!(backends(&c), vec!["10.244.1.2", "10.244.1.3"]);
    c.delete_slice(&slice("web-1", "web", &[]).key());
    assert_eq!(c.take_changes().ports, only_http());
    assert_eq!(backends(&c), vec!["10.244.1.3"]);
}

#[test]
fn a_slice_moving_to_another_service_leaves_the_first() {
    let mut c = cache();
    c.apply_service(web("10.96.0.10"));
    c.apply_slice(slice("s", "web", &["10.244.1.2"]));
    c.take_changes();
    c.apply_slice(slice("s", "other", &["10.244.1.2"]));
    assert_eq!(c.take_changes().ports, only_http());
    assert!(backends(&c).is_empty());
}

#[test]
fn deleting_a_service_removes_its_ports() {
    let mut c = cache();
    c.apply_service(web("10.96.0.10"));
    c.take_changes();
    c.delete_service(&web("10.96.0.10").service_ref());
    assert_eq!(c.take_changes().ports, only_http());
    assert_eq!(c.ports().count(), 0);
}

#[test]
fn a_relist_marks_only_what_differs_and_asks_for_a_full_diff() {
    let mut c = cache();
    c.replace_services(vec![web("10.96.0.10")]);
    c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"])]);
    c.take_changes();
    // Same objects again (a relist after 410 Gone): nothing recomputed.
    c.replace_services(vec![web("10.96.0.10")]);
    c.replace_slices(vec![slice("web-1", "web", &["10.244.1.2"])]);
    let ch = c.take_changes();
    assert!(ch.full);
    assert_eq!(ch.services_touched, 0);
    assert_eq!(c.ports().count(), 1);
    // A slice vanished while disconnected.
    c.replace_slices(vec![]);
    let ch = c.take_changes();
    assert_eq!(ch.services_touched, 1);
    assert!(backends(&c).is_empty());
}

#[test]
fn bad_objects_are_reported_once_with_their_reference() {
    let mut c = cache();
    c.apply_service(web("10.96.0.300"));
    let ch = c.take_changes();
    assert!(ch.ports.is_empty());
    assert_eq!(ch.rejected.len(), 1, "{:?}", ch.rejected);
    let r = &ch.rejected[0];
    assert_eq!(r.kind, ObjectKind::Service);
    assert_eq!(r.object.uid.as_deref(), Some("u1"));
    assert!(
        r.error.to_string().contains("spec.clusterIP"),
        "{}",
        r.error
    );
    // Unchanged: not reported again; fixed: programmed.
    c.apply_service(web("10.96.0.300"));
    c.apply_slice(slice("web-1", "web", &["10.244.1.2"]));
    assert!(c.take_changes().rejected.is_empty());
    c.apply_service(web("10.96.0.30"));
    let ch = c.take_changes();
    assert!(ch.rejected.is_empty());
    assert_eq!(backends(&c), vec!["10.244.1.2"]);
    // A bad slice: its endpoint is reported once, the rest is used.
    c.apply_slice(slice("web-2", "web", &["10.244.1.3", "nope"]));
    let ch = c.take_changes();
    assert_eq!(ch.rejected.len(), 1);
    assert_eq!(ch.rejected[0].kind, ObjectKind::EndpointSlice);
    c.apply_slice(slice("web-2", "web", &["10.244.1.3", "nope"]));
    assert!(c.take_changes().rejected.is_empty());
    assert_eq!(backends(&c), vec!["10.244.1.2", "10.244.1.3"]);
}

#[test]
fn the_desired_ports_equal_the_whole_model_over_the_same_objects() {
    // The cache computes per Service; the model over the whole lists must
    // agree (the validated inputs are the model's own).
    let svc = web("10.96.0.10");
    let slices = [
        raw_slice("web-1", "web", &["10.244.1.2", "10.244.1.9"]),
        raw_slice("web-2", "web", &["10.244.1.3", "10.244.1.2"]),
    ];
    let mut c = cache();
    c.apply_service(svc);
    for s in &slices {
        c.apply_slice(ParsedSlice::parse(s, "n1", &mut Interner::default()));
    }
    c.take_changes();
    let raw = Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let whole = lb_core::model::desired_state(c.node_context(), &[raw], &slices);
    let ours: Vec<_> = c.ports().map(|(k, v)| (k.clone(), v.clone())).collect();
    let want: Vec<_> = whole.state.services.into_iter().collect();
    assert_eq!(ours, want);
}

#[test]
fn e6_a_zone_change_recomputes_every_service() {
    let mut c = cache();
    c.apply_service(web("10.96.0.10"));
    c.take_changes();
    let node = Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            labels: Some([("topology.kubernetes.io/zone".to_string(), "a".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    c.set_node(&node);
    let ch = c.take_changes();
    assert!(ch.full);
    assert_eq!(ch.services_touched, 1);
    assert_eq!(c.node_context().zone.as_deref(), Some("a"));
    c.set_node(&node);
    assert!(c.take_changes().is_empty());
}
