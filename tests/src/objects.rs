//! The Kubernetes objects tests give the agent, as typed k8s-openapi values:
//! Services, EndpointSlices and Nodes with the fields `kubectl get -o yaml`
//! prints for objects the API server has defaulted. Built here and nowhere
//! else, then serialized as YAML for the agent's manifest files
//! ([`manifest`]) or handed to the fake API server as they are (it takes any
//! `Serialize` value).
//!
//! ```
//! use lb_tests::objects::{endpoint_slice, manifest, service, Endpoint, ServicePort};
//! let http = [ServicePort::tcp("http", 80, 8080)];
//! let yaml = manifest(&[
//!     service("web", "10.96.0.10".parse().unwrap()).ports(&http).into(),
//!     endpoint_slice("web", "web-1")
//!         .ports_of(&http)
//!         .endpoint(Endpoint::new("10.244.1.2".parse().unwrap(), "node1").pod("web1"))
//!         .into(),
//! ]);
//! assert!(yaml.starts_with("---\n"));
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeSpec, ObjectReference,
    Service, ServiceSpec, ServiceStatus, SessionAffinityConfig, Taint,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::topology::Pod;

/// The namespace of every object unless a builder says otherwise.
pub const NAMESPACE: &str = "default";

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: &'static str,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn tcp(name: &'static str, port: u16, target_port: u16) -> Self {
        ServicePort {
            name,
            protocol: Protocol::Tcp,
            port,
            target_port,
            node_port: None,
        }
    }

    pub fn udp(name: &'static str, port: u16, target_port: u16) -> Self {
        ServicePort {
            protocol: Protocol::Udp,
            ..Self::tcp(name, port, target_port)
        }
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }
}

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

fn metadata(name: &str, namespace: Option<&str>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: (!labels.is_empty()).then_some(labels),
        ..Default::default()
    }
}

/// A single-stack IPv4 Service, selecting pods labelled `app: <name>`.
pub fn service(name: &str, cluster_ip: Ipv4Addr) -> ServiceBuilder {
    ServiceBuilder {
        name: name.to_string(),
        namespace: NAMESPACE.to_string(),
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        service_type: ServiceType::ClusterIP,
        cluster_ip,
        ports: Vec::new(),
        external_ips: Vec::new(),
        external_traffic_policy_local: false,
        internal_traffic_policy_local: false,
        health_check_node_port: None,
        affinity: None,
        load_balancer_ips: Vec::new(),
        source_ranges: Vec::new(),
    }
}

/// See [`service`].
#[derive(Clone, Debug)]
pub struct ServiceBuilder {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    service_type: ServiceType,
    cluster_ip: Ipv4Addr,
    ports: Vec<ServicePort>,
    external_ips: Vec<Ipv4Addr>,
    external_traffic_policy_local: bool,
    internal_traffic_policy_local: bool,
    health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` with this timeoutSeconds (`None`: the
    /// field left out, the API server's default 10800).
    affinity: Option<Option<u32>>,
    load_balancer_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<String>,
}

impl ServiceBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    /// Adds a label (the agent's watch selects on some, e.g. SEMANTICS W1).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn service_type(mut self, service_type: ServiceType) -> Self {
        self.service_type = service_type;
        self
    }

    pub fn port(mut self, port: ServicePort) -> Self {
        self.ports.push(port);
        self
    }

    pub fn ports(mut self, ports: &[ServicePort]) -> Self {
        self.ports.extend_from_slice(ports);
        self
    }

    pub fn external_ip(mut self, ip: Ipv4Addr) -> Self {
        self.external_ips.push(ip);
        self
    }

    /// `externalTrafficPolicy: Local` (the default is Cluster for the types
    /// that have the field).
    pub fn external_traffic_policy_local(mut self) -> Self {
        self.external_traffic_policy_local = true;
        self
    }

    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    /// `internalTrafficPolicy: Local` (the default is Cluster).
    pub fn internal_traffic_policy_local(mut self) -> Self {
        self.internal_traffic_policy_local = true;
        self
    }

    /// `sessionAffinity: ClientIP` with
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` (as the API server
    /// defaults it: 10800 when not given).
    pub fn session_affinity_client_ip(mut self, timeout_seconds: Option<u32>) -> Self {
        self.affinity = Some(Some(timeout_seconds.unwrap_or(10800)));
        self
    }

    /// A `status.loadBalancer.ingress[].ip` (what a cloud controller or
    /// MetalLB writes for a LoadBalancer Service).
    pub fn load_balancer_ip(mut self, ip: Ipv4Addr) -> Self {
        self.load_balancer_ips.push(ip);
        self
    }

    /// `spec.loadBalancerSourceRanges` (CIDRs as written).
    pub fn load_balancer_source_ranges(mut self, ranges: &[&str]) -> Self {
        self.source_ranges = ranges.iter().map(|r| r.to_string()).collect();
        self
    }

    pub fn build(self) -> Service {
        let ip = self.cluster_ip.to_string();
        let ports = self
            .ports
            .iter()
            .map(|p| k8s_openapi::api::core::v1::ServicePort {
                name: Some(p.name.to_string()),
                protocol: Some(p.protocol.as_str().to_string()),
                port: i32::from(p.port),
                target_port: Some(IntOrString::Int(i32::from(p.target_port))),
                node_port: p.node_port.map(i32::from),
                ..Default::default()
            })
            .collect();
        // The API server defaults externalTrafficPolicy for every type with
        // node ports; a ClusterIP Service has none.
        let external_traffic_policy = match (self.service_type, self.external_traffic_policy_local)
        {
            (_, true) => Some("Local"),
            (ServiceType::ClusterIP, false) => None,
            (_, false) => Some("Cluster"),
        };
        Service {
            metadata: metadata(&self.name, Some(&self.namespace), self.labels),
            spec: Some(ServiceSpec {
                type_: Some(self.service_type.as_str().to_string()),
                cluster_ip: Some(ip.clone()),
                cluster_ips: Some(vec![ip]),
                internal_traffic_policy: Some(
                    if self.internal_traffic_policy_local {
                        "Local"
                    } else {
                        "Cluster"
                    }
                    .to_string(),
                ),
                ip_families: Some(vec!["IPv4".to_string()]),
                ip_family_policy: Some("SingleStack".to_string()),
                session_affinity: Some(
                    if self.affinity.is_some() {
                        "ClientIP"
                    } else {
                        "None"
                    }
                    .to_string(),
                ),
                session_affinity_config: self.affinity.flatten().map(|t| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(i32::try_from(t).unwrap_or(i32::MAX)),
                    }),
                }),
                load_balancer_source_ranges: (!self.source_ranges.is_empty())
                    .then(|| self.source_ranges.clone()),
                selector: Some(BTreeMap::from([("app".to_string(), self.name.clone())])),
                ports: Some(ports),
                external_ips: (!self.external_ips.is_empty())
                    .then(|| self.external_ips.iter().map(Ipv4Addr::to_string).collect()),
                external_traffic_policy: external_traffic_policy.map(str::to_string),
                health_check_node_port: self.health_check_node_port.map(i32::from),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: (!self.load_balancer_ips.is_empty()).then(|| {
                        self.load_balancer_ips
                            .iter()
                            .map(|ip| LoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ip_mode: Some("VIP".to_string()),
                                ..Default::default()
                            })
                            .collect()
                    }),
                }),
                ..Default::default()
            }),
        }
    }
}

/// An endpoint of an EndpointSlice: an address on a node, ready unless
/// said otherwise, usually a pod of the topology.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: String,
    /// The pod behind it (`targetRef`), if any.
    pub pod: Option<String>,
    pub ready: bool,
    /// `conditions.serving` (equals `ready` unless [`Endpoint::terminating`]).
    pub serving: bool,
    pub terminating: bool,
    /// E6: `hints.forZones` names.
    pub for_zones: Vec<String>,
    /// E6: `hints.forNodes` names.
    pub for_nodes: Vec<String>,
}

impl Endpoint {
    pub fn new(ip: Ipv4Addr, node: &str) -> Self {
        Endpoint {
            ip,
            node: node.to_string(),
            pod: None,
            ready: true,
            serving: true,
            terminating: false,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }
    }

    /// A pod of the topology.
    pub fn of(pod: &Pod) -> Self {
        Endpoint::new(pod.ip, &pod.node).pod(&pod.name)
    }

    pub fn pod(mut self, name: &str) -> Self {
        self.pod = Some(name.to_string());
        self
    }

    /// Not ready and not serving (a pod failing its readiness probe).
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }

    /// A pod shutting down that still serves: not ready, serving,
    /// terminating (SEMANTICS E3's fallback).
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }

    /// E6: adds a `hints.forZones` entry.
    pub fn for_zone(mut self, zone: &str) -> Self {
        self.for_zones.push(zone.to_string());
        self
    }

    /// E6: adds a `hints.forNodes` entry.
    pub fn for_node(mut self, node: &str) -> Self {
        self.for_nodes.push(node.to_string());
        self
    }
}

/// An IPv4 EndpointSlice of Service `service` (in its namespace), as the
/// endpointslice controller manages it.
pub fn endpoint_slice(service: &str, name: &str) -> EndpointSliceBuilder {
    EndpointSliceBuilder {
        service: service.to_string(),
        name: name.to_string(),
        namespace: NAMESPACE.to_string(),
        ports: Vec::new(),
        endpoints: Vec::new(),
    }
}

/// See [`endpoint_slice`].
#[derive(Clone, Debug)]
pub struct EndpointSliceBuilder {
    service: String,
    name: String,
    namespace: String,
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<Endpoint>,
}

impl EndpointSliceBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    /// A port of the endpoints (the Service port's name, and its target port).
    pub fn port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
        self.ports.push((name.to_string(), protocol, port));
        self
    }

    /// The ports the controller derives from the Service's: same names and
    /// protocols, the target ports.
    pub fn ports_of(mut self, service_ports: &[ServicePort]) -> Self {
        for p in service_ports {
            self = self.port(p.name, p.protocol, p.target_port);
        }
        self
    }

    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = Endpoint>) -> Self {
        self.endpoints.extend(endpoints);
        self
    }

    pub fn build(self) -> EndpointSlice {
        let labels = BTreeMap::from([
            (SERVICE_NAME_LABEL.to_string(), self.service.clone()),
            (
                "endpointslice.kubernetes.io/managed-by".to_string(),
                "endpointslice-controller.k8s.io".to_string(),
            ),
        ]);
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| SliceEndpoint {
                addresses: vec![e.ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(e.ready),
                    serving: Some(e.serving),
                    terminating: Some(e.terminating),
                }),
                hints: (!e.for_zones.is_empty() || !e.for_nodes.is_empty()).then(|| {
                    EndpointHints {
                        for_zones: (!e.for_zones.is_empty()).then(|| {
                            e.for_zones
                                .iter()
                                .map(|z| ForZone { name: z.clone() })
                                .collect()
                        }),
                        for_nodes: (!e.for_nodes.is_empty()).then(|| {
                            e.for_nodes
                                .iter()
                                .map(|n| ForNode { name: n.clone() })
                                .collect()
                        }),
                    }
                }),
                node_name: Some(e.node.clone()),
                target_ref: e.pod.as_ref().map(|pod| ObjectReference {
                    kind: Some("Pod".to_string()),
                    name: Some(pod.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let ports = self
            .ports
            .iter()
            .map(|(name, protocol, port)| EndpointPort {
                name: Some(name.clone()),
                protocol: Some(protocol.as_str().to_string()),
                port: Some(i32::from(*port)),
                ..Default::default()
            })
            .collect();
        EndpointSlice {
            metadata: metadata(&self.name, Some(&self.namespace), labels),
            address_type: "IPv4".to_string(),
            endpoints,
            ports: Some(ports),
        }
    }
}

/// A Node (cluster-scoped).
pub fn node(name: &str) -> NodeBuilder {
    NodeBuilder {
        name: name.to_string(),
        labels: BTreeMap::new(),
        taints: Vec::new(),
    }
}

/// See [`node`].
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    name: String,
    labels: BTreeMap<String, String>,
    taints: Vec<(String, String)>,
}

impl NodeBuilder {
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// A taint without a value, e.g. the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` with effect `NoSchedule`.
    pub fn taint(mut self, key: &str, effect: &str) -> Self {
        self.taints.push((key.to_string(), effect.to_string()));
        self
    }

    pub fn build(self) -> Node {
        let taints: Vec<Taint> = self
            .taints
            .into_iter()
            .map(|(key, effect)| Taint {
                key,
                effect,
                ..Default::default()
            })
            .collect();
        Node {
            metadata: metadata(&self.name, None, self.labels),
            spec: (!taints.is_empty()).then(|| NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// Any object this module builds: what a manifest holds.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    /// An object as JSON: one a test broke on purpose (a field of the wrong
    /// type), which no typed value can hold.
    Raw(serde_json::Value),
}

impl Object {
    /// As JSON, to break on purpose: e.g. `spec.ports[0].port` made a string.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a Kubernetes object serializes to JSON")
    }
}

impl From<serde_json::Value> for Object {
    fn from(v: serde_json::Value) -> Self {
        Object::Raw(v)
    }
}

impl From<Service> for Object {
    fn from(s: Service) -> Self {
        Object::Service(Box::new(s))
    }
}

impl From<EndpointSlice> for Object {
    fn from(s: EndpointSlice) -> Self {
        Object::EndpointSlice(Box::new(s))
    }
}

impl From<Node> for Object {
    fn from(n: Node) -> Self {
        Object::Node(Box::new(n))
    }
}

impl From<ServiceBuilder> for Object {
    fn from(b: ServiceBuilder) -> Self {
        b.build().into()
    }
}

impl From<EndpointSliceBuilder> for Object {
    fn from(b: EndpointSliceBuilder) -> Self {
        b.build().into()
    }
}

impl From<NodeBuilder> for Object {
    fn from(b: NodeBuilder) -> Self {
        b.build().into()
    }
}

/// A YAML document of one object (`apiVersion` and `kind` included).
pub fn to_yaml<T: Serialize>(object: &T) -> String {
    serde_saphyr::to_string(object).expect("a Kubernetes object serializes to YAML")
}

/// The agent's manifest file: the objects as YAML documents, each after a
/// `---` line.
pub fn manifest(objects: &[Object]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", to_yaml(o)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// What a YAML text says, as JSON (to compare with what kubectl prints).
    fn parse(yaml: &str) -> Vec<Value> {
        serde_saphyr::from_multiple(yaml).unwrap()
    }

    #[test]
    fn services_have_the_fields_kubectl_prints() {
        let svc = service("web", Ipv4Addr::new(10, 96, 0, 10))
            .service_type(ServiceType::NodePort)
            .port(ServicePort::tcp("http", 80, 8080).node_port(30080))
            .port(ServicePort::udp("dns", 53, 5353));
        let got = parse(&manifest(&[svc.into()]));
        let want = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "internalTrafficPolicy": "Cluster",
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "sessionAffinity": "None",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080},
                    {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353},
                ],
                "externalTrafficPolicy": "Cluster",
            },
            "status": {"loadBalancer": {}},
        });
        assert_eq!(got, [want]);

        let local = service("lb", Ipv4Addr::new(10, 96, 0, 11))
            .service_type(ServiceType::LoadBalancer)
            .external_traffic_policy_local()
            .health_check_node_port(32000)
            .external_ip(Ipv4Addr::new(203, 0, 113, 10))
            .label("service.kubernetes.io/headless", "")
            .build();
        let spec = serde_json::to_value(&local).unwrap()["spec"].clone();
        assert_eq!(spec["externalTrafficPolicy"], "Local");
        assert_eq!(spec["healthCheckNodePort"], 32000);
        assert_eq!(spec["externalIPs"], json!(["203.0.113.10"]));
        let cluster_ip = serde_json::to_value(service("c", Ipv4Addr::new(10, 96, 0, 1)).build());
        assert!(cluster_ip.unwrap()["spec"]
            .get("externalTrafficPolicy")
            .is_none());
    }

    #[test]
    fn endpoint_slices_have_the_fields_kubectl_prints() {
        let http = [ServicePort::tcp("http", 80, 8080)];
        let slice = endpoint_slice("web", "web-1")
            .ports_of(&http)
            .endpoint(Endpoint::new(Ipv4Addr::new(10, 244, 1, 2), "node1").pod("web1"))
            .endpoint(Endpoint::new(Ipv4Addr::new(10, 244, 2, 2), "node2").not_ready());
        let got = parse(&manifest(&[slice.into()]));
        let want = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1", "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": ["10.244.1.2"],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "node1",
                    "targetRef": {"kind": "Pod", "name": "web1", "namespace": "default"},
                },
                {
                    "addresses": ["10.244.2.2"],
                    "conditions": {"ready": false, "serving": false, "terminating": false},
                    "nodeName": "node2",
                },
            ],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        });
        assert_eq!(got, [want]);
        // No endpoints is an empty list, not a missing field.
        let empty = to_yaml(&endpoint_slice("web", "web-2").build());
        assert_eq!(parse(&empty)[0]["endpoints"], json!([]));
    }

    #[test]
    fn affinity_policies_load_balancer_and_hints_have_the_api_fields() {
        let svc = service("lb", Ipv4Addr::new(10, 96, 0, 12))
            .service_type(ServiceType::LoadBalancer)
            .port(ServicePort::tcp("http", 80, 8080).node_port(30080))
            .session_affinity_client_ip(Some(3))
            .internal_traffic_policy_local()
            .load_balancer_ip(Ipv4Addr::new(203, 0, 113, 5))
            .load_balancer_source_ranges(&["192.0.2.0/24"])
            .build();
        let v = serde_json::to_value(&svc).unwrap();
        assert_eq!(v["spec"]["sessionAffinity"], "ClientIP");
        assert_eq!(
            v["spec"]["sessionAffinityConfig"],
            json!({"clientIP": {"timeoutSeconds": 3}})
        );
        assert_eq!(v["spec"]["internalTrafficPolicy"], "Local");
        assert_eq!(
            v["spec"]["loadBalancerSourceRanges"],
            json!(["192.0.2.0/24"])
        );
        assert_eq!(
            v["status"],
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.5", "ipMode": "VIP"}]}})
        );
        let default_timeout = service("d", Ipv4Addr::new(10, 96, 0, 13))
            .session_affinity_client_ip(None)
            .build();
        assert_eq!(
            serde_json::to_value(&default_timeout).unwrap()["spec"]["sessionAffinityConfig"]
                ["clientIP"]["timeoutSeconds"],
            10800
        );

        let slice = endpoint_slice("web", "web-1")
            .port("http", Protocol::Tcp, 8080)
            .endpoint(
                Endpoint::new(Ipv4Addr::new(10, 244, 1, 2), "node1")
                    .for_zone("zone-a")
                    .for_node("node1"),
            )
            .endpoint(Endpoint::new(Ipv4Addr::new(10, 244, 2, 2), "node2").terminating());
        let got = parse(&manifest(&[slice.into()]));
        assert_eq!(
            got[0]["endpoints"][0]["hints"],
            json!({"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node1"}]})
        );
        assert_eq!(
            got[0]["endpoints"][1]["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        assert!(got[0]["endpoints"][1].get("hints").is_none());
    }

    #[test]
    fn manifests_are_documents_after_dashes() {
        let m = manifest(&[
            service("web", Ipv4Addr::new(10, 96, 0, 10)).into(),
            endpoint_slice("web", "web-1").into(),
            node("node1")
                .taint("ToBeDeletedByClusterAutoscaler", "NoSchedule")
                .into(),
        ]);
        assert!(m.starts_with("---\n"));
        assert_eq!(m.matches("---\n").count(), 3);
        let docs = parse(&m);
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["Service", "EndpointSlice", "Node"]);
        assert_eq!(
            docs[2],
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node1"},
                "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
            })
        );
    }
}
