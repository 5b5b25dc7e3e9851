//! Cluster mode end to end: the agents watch a fake API server (the real
//! list/watch protocol over HTTP, on the lan of the netns topology) through a
//! generated kubeconfig, and real traffic follows what the test creates,
//! updates and deletes there. Test names carry SEMANTICS.md ids.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, ResourceKind};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_tests::objects::{endpoint_slice, node, service, Endpoint, ServicePort, ServiceType};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const WARMUP: Duration = Duration::from_secs(10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// node1: client1, web1; node2: web2, web3; an external client. Backends
/// answer HTTP on 8080 and a line protocol on TCP 9000.
fn topology() -> Topology {
    let t = Topology::builder()
        .node("node1", &["client1", "web1"])
        .node("node2", &["web2", "web3"])
        .build()
        .expect("building the topology");
    for w in ["web1", "web2", "web3"] {
        t.spawn_backend(w, &["http:8080", "tcp:9000"]).unwrap();
    }
    t
}

fn web_ports() -> [ServicePort; 2] {
    [
        ServicePort::tcp("http", 80, 8080),
        ServicePort::tcp("line", 9000, 9000),
    ]
}

/// Service `web` at [`VIP`] with [`web_ports`].
fn web_service() -> Service {
    service("web", VIP).ports(&web_ports()).build()
}

fn web_slice(t: &Topology, pods: &[&str]) -> EndpointSlice {
    endpoint_slice("web", "web-1")
        .ports_of(&web_ports())
        .endpoints(pods.iter().map(|p| Endpoint::of(t.pod(p))))
        .build()
}

fn addrs(t: &Topology, pods: &[&str], port: u16) -> Vec<SocketAddrV4> {
    pods.iter().map(|p| sa(t.pod(p).ip, port)).collect()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (scope, map writes) of every "maps updated" line of an agent log.
fn plan_scopes(log: &str) -> Vec<(String, usize)> {
    log.lines()
        .filter(|l| l.contains("maps updated"))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            };
            (
                field("scope"),
                field("map_writes").parse().unwrap_or(usize::MAX),
            )
        })
        .collect()
}

fn start(t: &Topology) -> FakeApiServer {
    t.start_api_server().expect("starting the fake API server")
}

/// F1, F3, W1 in cluster mode: a Service and its EndpointSlice created on the
/// API server get programmed on every node; an added endpoint gets flows, a
/// removed one no longer does; Services labelled for another proxy or as
/// headless are not watched; a deleted Service stops answering.
#[test]
fn w1_f1_f3_traffic_follows_the_api_server() {
    require_privileges!();
    let t = topology();
    let server = start(&t);
    server.apply(&web_service());
    server.apply(&web_slice(&t, &["web1"]));
    let foreign_ip = Ipv4Addr::new(10, 96, 2, 11);
    server.apply(
        &service("foreign", foreign_ip)
            .ports(&web_ports())
            .label("service.kubernetes.io/service-proxy-name", "someone-else")
            .build(),
    );
    t.start_all_agents().unwrap();
    let http = Frontend::tcp(VIP, 80);
    t.wait_for_backends_everywhere(&http, &addrs(&t, &["web1"], 8080))
        .unwrap();
    let url = format!("http://{VIP}/");
    let r = t.request_eventually("client1", &url, WARMUP).unwrap();
    assert_eq!(
        (r.backend.as_str(), *r.client.ip()),
        ("web1", t.pod("client1").ip)
    );
    // W1: the watch's label selector keeps the other proxy's Service out.
    let services = t.lbctl("node1", &["services"]).unwrap();
    assert!(!services.contains("10.96.2.11"), "{services}");

    server.apply(&web_slice(&t, &["web1", "web2"]));
    t.wait_for_backends_everywhere(&http, &addrs(&t, &["web1", "web2"], 8080))
        .unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        seen.insert(t.request("client1", &url).unwrap().backend);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web1".to_string(), "web2".to_string()])
    );

    server.apply(&web_slice(&t, &["web2", "web3"]));
    t.wait_for_backends_everywhere(&http, &addrs(&t, &["web2", "web3"], 8080))
        .unwrap();
    for _ in 0..10 {
        let r = t.request("client1", &url).unwrap();
        assert_ne!(r.backend, "web1", "a removed endpoint still gets flows");
    }

    server.delete(ResourceKind::Service, "default", "web");
    wait_until("the deleted Service's frontends to go", WARMUP, || {
        let s = t.lbctl("node1", &["services"]).unwrap();
        !s.contains("10.96.2.10")
    });
    assert!(
        t.curl("client1", &url).is_err(),
        "a deleted Service still answers"
    );
    // The initial list was one full diff; every event after it was planned
    // for its own service ports only.
    let plans: Vec<_> = plan_scopes(&t.log("agent-node1"))
        .into_iter()
        .filter(|p| p.0 != "node-addresses")
        .collect();
    assert_eq!(
        plans.first().map(|p| p.0.as_str()),
        Some("full"),
        "{plans:?}"
    );
    assert!(plans.len() >= 4, "{plans:?}");
    assert!(plans[1..].iter().all(|p| p.0 == "ports"), "{plans:?}");
}

/// While the API server is unreachable the datapath keeps serving the last
/// state (old and new flows); /healthz stays 200 as kube-proxy's does when no
/// change is pending; the agent retries with backoff. Changes made meanwhile
/// arrive through a relist (410 Gone after compaction), diffed against the
/// maps: an open connection survives, nothing is flushed.
#[test]
fn api_outage_and_relist_keep_serving_and_converge() {
    require_privileges!();
    let t = topology();
    let server = start(&t);
    // Slow answers throughout: the agent must not care.
    server.set_latency(Duration::from_millis(150));
    server.apply(&web_service());
    server.apply(&web_slice(&t, &["web1"]));
    t.start_all_agents().unwrap();
    t.wait_for_backends_everywhere(&Frontend::tcp(VIP, 9000), &addrs(&t, &["web1"], 9000))
        .unwrap();
    let url = format!("http://{VIP}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let mut conn = t.connect("client1", sa(VIP, 9000)).unwrap();
    assert_eq!(conn.send("before").unwrap().backend, "web1");
    let lists_before = server.list_count(ResourceKind::EndpointSlice);

    server.set_unavailable(true);
    wait_until(
        "the agent to notice the outage",
        Duration::from_secs(20),
        || {
            t.sh("node1", "curl -s http://127.0.0.1:10249/metrics")
                .map(|m| m.contains("lb_apiserver_connected 0"))
                .unwrap_or(false)
        },
    );
    // The datapath serves on: the open flow and new ones.
    assert_eq!(conn.send("during").unwrap().backend, "web1");
    assert_eq!(t.request("client1", &url).unwrap().backend, "web1");
    let healthz = t
        .sh(
            "ext",
            &format!(
                "curl -s -o /dev/null -w '%{{http_code}}' http://{}:10256/healthz",
                t.node("node1").address
            ),
        )
        .unwrap();
    assert_eq!(
        healthz, "200",
        "kube-proxy's /healthz stays 200 with nothing pending"
    );

    // Changes during the outage; their history is compacted away, so the
    // agent's watch resumes into 410 Gone and it must relist.
    server.apply(&web_slice(&t, &["web1", "web2"]));
    server.compact();
    server.set_unavailable(false);
    t.wait_for_backends_everywhere(
        &Frontend::tcp(VIP, 9000),
        &addrs(&t, &["web1", "web2"], 9000),
    )
    .unwrap();
    assert!(
        server.list_count(ResourceKind::EndpointSlice) > lists_before,
        "the agent converged without relisting?"
    );
    // The relist was diffed: its full plan wrote only the new endpoint
    // (backend, slot and count for each of the two ports), no flush.
    let plans = plan_scopes(&t.log("agent-node1"));
    let last = plans.last().expect("maps updated after the relist");
    assert_eq!(last.0, "full", "{plans:?}");
    assert!(
        last.1 <= 6,
        "the relist rewrote more than the difference: {plans:?}"
    );
    assert_eq!(
        conn.send("after").unwrap().backend,
        "web1",
        "the relist broke an open connection"
    );
    wait_until("lb_apiserver_connected 1", Duration::from_secs(20), || {
        t.sh("node1", "curl -s http://127.0.0.1:10249/metrics")
            .map(|m| m.contains("lb_apiserver_connected 1"))
            .unwrap_or(false)
    });
}

/// Bad objects: a Service the agent cannot program gets a Warning Event
/// naming the field, a log line and a metric; everything else keeps working.
#[test]
fn bad_objects_get_a_warning_event_and_nothing_else_breaks() {
    require_privileges!();
    let t = topology();
    let server = start(&t);
    server.apply(&web_service());
    server.apply(&web_slice(&t, &["web1"]));
    // Not an IPv4 address: no typed builder makes one, so break a good one.
    let mut bad = service("bad", Ipv4Addr::new(10, 96, 2, 20))
        .ports(&web_ports())
        .build();
    let spec = bad.spec.as_mut().expect("a Service has a spec");
    spec.cluster_ip = Some("10.96.2.300".into());
    spec.cluster_ips = Some(vec!["10.96.2.300".into()]);
    server.apply(&bad);
    t.start_all_agents().unwrap();
    t.wait_for_backends_everywhere(&Frontend::tcp(VIP, 80), &addrs(&t, &["web1"], 8080))
        .unwrap();
    assert!(
        server.wait_until(Duration::from_secs(20), |s| {
            s.events().iter().any(|e| {
                e["type"] == "Warning"
                    && e["regarding"]["name"] == "bad"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("spec.clusterIP") && n.contains("10.96.2.300"))
            })
        }),
        "no Warning Event about Service default/bad: {:?}",
        server.events()
    );
    let log = t.log("agent-node1");
    assert!(log.contains("spec.clusterIP"), "{log}");
    let metrics = t
        .sh("node1", "curl -s http://127.0.0.1:10249/metrics")
        .unwrap();
    assert!(
        metrics.contains("lb_rejected_objects_total{kind=\"Service\"}"),
        "{metrics}"
    );
    let r = t
        .request_eventually("client1", &format!("http://{VIP}/"), WARMUP)
        .unwrap();
    assert_eq!(r.backend, "web1");
}

/// H1 and A1/A2: a LoadBalancer Service with externalTrafficPolicy=Local
/// gets a health-check node port answering 200 where a local endpoint is
/// and 503 elsewhere, with kube-proxy's JSON; it closes when the policy
/// goes back to Cluster. /healthz, /livez, /metrics and /proxyMode answer.
#[test]
fn h1_health_check_node_port_and_agent_endpoints() {
    require_privileges!();
    let t = topology();
    let server = start(&t);
    let ports = [ServicePort::tcp("http", 80, 8080).node_port(30080)];
    let lbsvc = service("lbsvc", VIP)
        .service_type(ServiceType::LoadBalancer)
        .ports(&ports);
    server.apply(
        &lbsvc
            .clone()
            .external_traffic_policy_local()
            .health_check_node_port(32000)
            .build(),
    );
    server.apply(
        &endpoint_slice("lbsvc", "lbsvc-1")
            .ports_of(&ports)
            .endpoint(Endpoint::of(t.pod("web1")))
            .build(),
    );
    t.start_all_agents().unwrap();
    t.wait_for_backends_everywhere(&Frontend::tcp(VIP, 80), &addrs(&t, &["web1"], 8080))
        .unwrap();

    let get = |node: &str, port: u16, path: &str| -> String {
        t.sh(
            "ext",
            &format!(
                "curl -s -m 3 -w ' %{{http_code}} %{{content_type}}' http://{}:{port}{path}",
                t.node(node).address
            ),
        )
        .unwrap_or_else(|e| format!("ERROR {e:#}"))
    };
    let mut on1 = String::new();
    wait_until("the health-check node port on node1", WARMUP, || {
        on1 = get("node1", 32000, "/anything");
        on1.contains(" 200 ")
    });
    assert!(on1.contains("\"localEndpoints\": 1"), "{on1}");
    assert!(on1.contains("\"name\": \"lbsvc\""), "{on1}");
    assert!(on1.contains("\"serviceProxyHealthy\": true"), "{on1}");
    assert!(on1.ends_with("application/json"), "{on1}");
    let on2 = get("node2", 32000, "/");
    assert!(on2.contains(" 503 "), "{on2}");
    assert!(on2.contains("\"localEndpoints\": 0"), "{on2}");

    let healthz = get("node1", 10256, "/healthz");
    assert!(
        healthz.contains(" 200 ") && healthz.contains("lastUpdated"),
        "{healthz}"
    );
    assert!(get("node1", 10256, "/livez").contains(" 200 "));
    let metrics = t
        .sh("node1", "curl -s http://127.0.0.1:10249/metrics")
        .unwrap();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "lb_map_entries",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let mode = t
        .sh("node1", "curl -s http://127.0.0.1:10249/proxyMode")
        .unwrap();
    assert_eq!(mode, "ebpf");

    // A1: the node being drained by the cluster autoscaler: /healthz 503
    // (load balancers stop sending), /livez still 200 (no restart).
    server.apply(
        &node("node1")
            .taint("ToBeDeletedByClusterAutoscaler", "NoSchedule")
            .build(),
    );
    wait_until("/healthz 503 on a node being deleted", WARMUP, || {
        get("node1", 10256, "/healthz").contains(" 503 ")
    });
    assert!(get("node1", 10256, "/livez").contains(" 200 "));
    assert!(get("node2", 10256, "/healthz").contains(" 200 "));

    // Back to Cluster: the health-check port closes.
    server.apply(&lbsvc.build());
    wait_until("the health-check node port to close", WARMUP, || {
        get("node1", 32000, "/").starts_with("ERROR") || get("node1", 32000, "/").contains(" 000")
    });
}
