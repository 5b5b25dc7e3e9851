//! Handler tests call the request handlers directly (no sockets). The
//! listener tests run in a private network namespace created by the test
//! (`in_private_netns`), never in the root one.

use super::*;
use crate::observe::test_support::{
    assert_refused, connect, get, get_once, in_private_netns, is_closed, read_response, request,
    runtime,
};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::UNIX_EPOCH;

use hyper::header::{HeaderMap, CONTENT_TYPE};
use k8s_openapi::api::core::v1::{NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A fixed start: 2024-05-01T10:00:00Z.
fn t0() -> Moment {
    Moment {
        wall: UNIX_EPOCH + Duration::from_secs(1_714_557_600),
        mono: Instant::now(),
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn assert_json_headers(h: &HeaderMap) {
    assert_eq!(h[CONTENT_TYPE], "application/json");
    assert_eq!(h["x-content-type-options"], "nosniff");
}

// ---- A1: /healthz and /livez ------------------------------------------------------

#[test]
fn a1_healthz_200_after_an_update_with_kube_proxy_body() {
    let h = ProxyHealth::new(TIMEOUT);
    let t = t0();
    h.updated_at(t);
    let now = t.after(Duration::from_millis(1500));
    let (status, headers, body) = read_response(health_response(&h, &get("/healthz"), now));
    assert_eq!(status, StatusCode::OK);
    assert_json_headers(&headers);
    // kube-proxy's exact layout; healthy -> lastUpdated is reported as now.
    assert_eq!(
        body,
        r#"{"lastUpdated": "2024-05-01T10:00:01.5Z","currentTime": "2024-05-01T10:00:01.5Z", "nodeEligible": true}"#
    );
    let v = json(&body);
    assert_eq!(v["nodeEligible"], true);
    // Both times are RFC 3339.
    for k in ["lastUpdated", "currentTime"] {
        let s = v[k].as_str().expect("string");
        s.parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap_or_else(|e| panic!("{k} {s:?} is not RFC 3339: {e}"));
        assert!(s.ends_with('Z') && s.contains('T'), "{s}");
    }
    // Query strings and methods do not matter (Go mux semantics).
    let req = Request::builder()
        .method("POST")
        .uri("/healthz?verbose=1")
        .body(())
        .expect("request");
    assert_eq!(health_response(&h, &req, now).status(), StatusCode::OK);
}

#[test]
fn a1_healthy_while_a_pending_update_is_younger_than_the_timeout() {
    let h = ProxyHealth::new(TIMEOUT);
    let t = t0();
    h.updated_at(t);
    h.queued_update_at(t.after(Duration::from_secs(10)));
    // 59.999 s pending: still fine.
    let now = t.after(Duration::from_secs(10) + TIMEOUT - Duration::from_millis(1));
    assert!(h.is_healthy(now));
    assert_eq!(h.healthz_body(now).status, StatusCode::OK);
    // Exactly the timeout: unhealthy (kube-proxy: age < timeout is healthy).
    let now = t.after(Duration::from_secs(10) + TIMEOUT);
    assert!(!h.is_healthy(now));
}

#[test]
fn a1_healthz_and_livez_503_when_an_update_is_pending_longer_than_the_timeout() {
    let h = ProxyHealth::new(TIMEOUT);
    let t = t0();
    h.updated_at(t);
    h.queued_update_at(t.after(Duration::from_secs(1)));
    // A later queued update does not reset the age of the oldest one.
    h.queued_update_at(t.after(Duration::from_secs(50)));
    let now = t.after(Duration::from_secs(61));
    assert!(!h.is_healthy(now));
    let (status, headers, body) = read_response(health_response(&h, &get("/healthz"), now));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_json_headers(&headers);
    // Unhealthy: the real last update is reported.
    assert_eq!(
        body,
        r#"{"lastUpdated": "2024-05-01T10:00:00Z","currentTime": "2024-05-01T10:01:01Z", "nodeEligible": true}"#
    );
    let (status, _, body) = read_response(health_response(&h, &get("/livez"), now));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        r#"{"lastUpdated": "2024-05-01T10:00:00Z","currentTime": "2024-05-01T10:01:01Z"}"#
    );

    // The sync finally completes: healthy again, nothing pending.
    let later = t.after(Duration::from_secs(62));
    h.updated_at(later);
    assert!(h.is_healthy(later.after(Duration::from_secs(3600))));
}

#[test]
fn a1_before_the_first_update_kube_proxy_counts_the_proxy_as_healthy() {
    // kube-proxy: "the proxier is healthy while it's starting up", even with
    // an update queued (the agent calls updated() when its loop starts).
    let h = ProxyHealth::new(TIMEOUT);
    let t = t0();
    assert!(h.is_healthy(t));
    h.queued_update_at(t);
    let now = t.after(Duration::from_secs(600));
    assert!(h.is_healthy(now));
    let reply = h.healthz_body(now);
    assert_eq!(reply.status, StatusCode::OK);
    // Once the loop has started, a stuck update is noticed.
    h.updated_at(now);
    h.queued_update_at(now);
    assert!(!h.is_healthy(now.after(TIMEOUT)));
}

#[test]
fn a1_node_not_eligible_healthz_503_livez_200() {
    let h = ProxyHealth::new(TIMEOUT);
    let t = t0();
    h.updated_at(t);
    h.set_node_eligible(false);
    let now = t.after(Duration::from_secs(2));
    let (status, headers, body) = read_response(health_response(&h, &get("/healthz"), now));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_json_headers(&headers);
    // Not healthy overall -> lastUpdated is the real one.
    assert_eq!(
        body,
        r#"{"lastUpdated": "2024-05-01T10:00:00Z","currentTime": "2024-05-01T10:00:02Z", "nodeEligible": false}"#
    );
    let (status, _, body) = read_response(health_response(&h, &get("/livez"), now));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"lastUpdated": "2024-05-01T10:00:02Z","currentTime": "2024-05-01T10:00:02Z"}"#
    );
    // The proxy itself is healthy (health-check node ports keep answering 200).
    assert!(h.is_healthy(now));

    // Never updated and not eligible: Go's zero time.
    let h = ProxyHealth::new(TIMEOUT);
    h.set_node_eligible(false);
    let reply = h.healthz_body(t);
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        json(&reply.body)["lastUpdated"],
        "0001-01-01T00:00:00Z",
        "{}",
        reply.body
    );
}

#[test]
fn a1_node_eligibility_follows_deletion_and_autoscaler_taint() {
    let h = ProxyHealth::new(TIMEOUT);
    assert!(h.node_eligible(), "eligible while starting up");
    let mut node = Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    h.sync_node(&node);
    assert!(h.node_eligible());
    node.spec = Some(NodeSpec {
        taints: Some(vec![Taint {
            key: TO_BE_DELETED_TAINT.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    h.sync_node(&node);
    assert!(!h.node_eligible());
    node.spec = None;
    h.sync_node(&node);
    assert!(h.node_eligible());
    node.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    h.sync_node(&node);
    assert!(!h.node_eligible());
}

#[test]
fn a1_other_paths_are_404() {
    let h = ProxyHealth::new(TIMEOUT);
    for p in ["/", "/healthz/", "/metrics", "/livezz", "/HEALTHZ"] {
        let (status, headers, body) = read_response(health_response(&h, &get(p), t0()));
        assert_eq!(status, StatusCode::NOT_FOUND, "{p}");
        assert_eq!(headers[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(body, "404 page not found\n");
    }
}

#[test]
fn a1_rfc3339_keeps_sub_second_precision() {
    let t = UNIX_EPOCH + Duration::new(1_714_557_600, 123_456_789);
    assert_eq!(rfc3339(Some(t)), "2024-05-01T10:00:00.123456789Z");
    assert_eq!(rfc3339(None), "0001-01-01T00:00:00Z");
}

// ---- H1: health-check node port answers ------------------------------------------

#[test]
fn h1_200_with_local_endpoints_and_healthy_proxy_exact_body() {
    let (status, headers, body) = read_response(service_health_response("default", "web", 2, true));
    assert_eq!(status, StatusCode::OK);
    assert_json_headers(&headers);
    // kube-proxy's bytes (dedented template, tabs, no trailing newline).
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let v = json(&body);
    assert_eq!(
        v,
        serde_json::json!({
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": true
        })
    );
}

#[test]
fn h1_503_without_local_endpoints() {
    let (status, headers, body) = read_response(service_health_response("ns1", "api", 0, true));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_json_headers(&headers);
    let v = json(&body);
    assert_eq!(v["localEndpoints"], 0);
    assert_eq!(v["serviceProxyHealthy"], true);
    assert_eq!(v["service"]["namespace"], "ns1");
    assert_eq!(v["service"]["name"], "api");
}

#[test]
fn h1_503_when_proxy_unhealthy_even_with_endpoints() {
    let (status, _, body) = read_response(service_health_response("ns1", "api", 3, false));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v = json(&body);
    assert_eq!(v["localEndpoints"], 3);
    assert_eq!(v["serviceProxyHealthy"], false);
}

#[test]
fn h1_body_escapes_odd_names() {
    // Not valid Kubernetes names, but manifests are free text: still JSON.
    let body = service_health_body("a\"b", "c\\d\n", 1, true);
    let v = json(&body);
    assert_eq!(v["service"]["namespace"], "a\"b");
    assert_eq!(v["service"]["name"], "c\\d\n");
}

// ---- Real listeners, inside a private network namespace ---------------------------

fn check(ns: &str, name: &str, port: u16, n: usize) -> HealthCheck {
    HealthCheck {
        namespace: ns.into(),
        name: name.into(),
        node_port: port,
        local_endpoints: n,
    }
}

#[test]
fn h1_health_check_node_ports_open_update_in_place_and_close_in_netns() {
    in_private_netns(
        "h1_health_check_node_ports_open_update_in_place_and_close_in_netns",
        || {
            let rt = runtime();
            let health = ProxyHealth::new(TIMEOUT);
            health.updated();
            let servers = ServiceHealthServers::new(health.clone(), vec![]);

            let errs = rt.block_on(servers.sync(&[check("default", "web", 31000, 2)]));
            assert!(errs.is_empty(), "{errs:?}");
            assert_eq!(rt.block_on(servers.ports()), vec![31000]);

            // Any path; exact body and headers.
            let mut conn = connect(31000).expect("connect 31000");
            let a = request(&mut conn, "/some/path?x=1");
            assert_eq!(a.status, 200);
            assert_eq!(a.header("content-type"), Some("application/json"));
            assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(a.body, service_health_body("default", "web", 2, true));

            // Count drops to 0: same listener (the kept-alive connection
            // still works), now 503.
            let errs = rt.block_on(servers.sync(&[check("default", "web", 31000, 0)]));
            assert!(errs.is_empty(), "{errs:?}");
            let a = request(&mut conn, "/");
            assert_eq!(a.status, 503);
            assert_eq!(json(&a.body)["localEndpoints"], 0);

            // Proxy unhealthy: 503 even with endpoints.
            let errs = rt.block_on(servers.sync(&[check("default", "web", 31000, 1)]));
            assert!(errs.is_empty(), "{errs:?}");
            assert_eq!(request(&mut conn, "/").status, 200);
            let stuck = ProxyHealth::new(Duration::ZERO);
            stuck.updated();
            stuck.queued_update();
            let servers2 = ServiceHealthServers::new(stuck, vec![]);
            let errs = rt.block_on(servers2.sync(&[check("default", "db", 31002, 4)]));
            assert!(errs.is_empty(), "{errs:?}");
            let a = get_once(31002, "/");
            assert_eq!(a.status, 503);
            assert_eq!(json(&a.body)["serviceProxyHealthy"], false);
            assert_eq!(json(&a.body)["localEndpoints"], 4);
            drop(servers2);

            // A port that cannot be bound: error naming service and port;
            // the other port keeps working; retried on the next sync.
            let blocker = std::net::TcpListener::bind(("0.0.0.0", 31001)).expect("blocker");
            let errs = rt.block_on(servers.sync(&[
                check("default", "web", 31000, 1),
                check("prod", "api", 31001, 1),
            ]));
            assert_eq!(errs.len(), 1, "{errs:?}");
            let msg = errs[0].to_string();
            assert!(
                msg.contains("prod/api") && msg.contains("31001"),
                "error must name the service and port: {msg}"
            );
            assert!(matches!(
                &errs[0],
                HealthServerError::Bind { port: 31001, .. }
            ));
            assert_eq!(request(&mut conn, "/").status, 200);
            drop(blocker);
            let errs = rt.block_on(servers.sync(&[
                check("default", "web", 31000, 1),
                check("prod", "api", 31001, 3),
            ]));
            assert!(errs.is_empty(), "{errs:?}");
            let a = get_once(31001, "/healthz");
            assert_eq!(a.status, 200);
            assert_eq!(a.body, service_health_body("prod", "api", 3, true));

            // Two services claiming one port: the first keeps it.
            let errs = rt.block_on(servers.sync(&[
                check("a", "first", 31000, 1),
                check("b", "second", 31000, 1),
                check("prod", "api", 31001, 3),
            ]));
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(matches!(
                &errs[0],
                HealthServerError::PortConflict { port: 31000, name, .. } if name == "second"
            ));
            assert_eq!(
                json(&request(&mut conn, "/").body)["service"]["name"],
                "first"
            );

            // Policy back to Cluster (no check any more): the port is closed
            // when sync returns, open connections too.
            let errs = rt.block_on(servers.sync(&[check("prod", "api", 31001, 3)]));
            assert!(errs.is_empty(), "{errs:?}");
            assert_eq!(rt.block_on(servers.ports()), vec![31001]);
            assert_refused(31000);
            assert!(is_closed(&mut conn), "open connection must be closed");
            assert_eq!(get_once(31001, "/").status, 200);

            // Dropping the servers closes everything (asynchronously: the
            // runtime drops the aborted tasks).
            drop(servers);
            assert_refused(31001);
        },
    );
}

#[test]
fn h1_explicit_bind_address_in_netns() {
    in_private_netns("h1_explicit_bind_address_in_netns", || {
        let rt = runtime();
        let health = ProxyHealth::new(TIMEOUT);
        health.updated();
        let servers = ServiceHealthServers::new(health, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let errs = rt.block_on(servers.sync(&[check("default", "web", 32000, 1)]));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(get_once(32000, "/").status, 200);
        // Bound to 127.0.0.1 only: 127.0.0.2 (also lo) is refused.
        let r = TcpStream::connect(("127.0.0.2", 32000));
        assert!(r.is_err(), "must listen on the given address only");
    });
}

#[test]
fn a1_serve_health_and_metrics_in_netns() {
    // kube-proxy's default ports (lb-agent's defaults too).
    const DEFAULT_HEALTHZ_PORT: u16 = 10256;
    const DEFAULT_METRICS_PORT: u16 = 10249;
    in_private_netns("a1_serve_health_and_metrics_in_netns", || {
        let rt = runtime();
        let health = ProxyHealth::new(TIMEOUT);
        let metrics = crate::observe::metrics::Metrics::new();
        let (hl, ml) = rt.block_on(async {
            (
                TcpListener::bind(("0.0.0.0", DEFAULT_HEALTHZ_PORT))
                    .await
                    .expect("bind healthz"),
                TcpListener::bind(("127.0.0.1", DEFAULT_METRICS_PORT))
                    .await
                    .expect("bind metrics"),
            )
        });
        let hs = rt.spawn(serve_health(hl, health.clone()));
        let ms = rt.spawn(crate::observe::metrics::serve_metrics(ml, metrics.clone()));

        health.updated();
        let a = get_once(DEFAULT_HEALTHZ_PORT, "/healthz");
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(json(&a.body)["nodeEligible"], true);
        assert_eq!(get_once(DEFAULT_HEALTHZ_PORT, "/livez").status, 200);
        assert_eq!(get_once(DEFAULT_HEALTHZ_PORT, "/nope").status, 404);
        health.set_node_eligible(false);
        assert_eq!(get_once(DEFAULT_HEALTHZ_PORT, "/healthz").status, 503);
        assert_eq!(get_once(DEFAULT_HEALTHZ_PORT, "/livez").status, 200);
        health.set_node_eligible(true);

        // Garbage does not hurt the server.
        {
            let mut s = connect(DEFAULT_HEALTHZ_PORT).expect("connect");
            s.write_all(b"\x00\x01GARBAGE \xff\r\n\r\n").expect("write");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out);
            assert!(out.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
        }
        // A client that connects and sends nothing does not block others.
        let _idle = connect(DEFAULT_HEALTHZ_PORT).expect("idle connect");

        // Many concurrent clients (threads inherit the namespace).
        let clients: Vec<_> = (0..64)
            .map(|i| {
                std::thread::spawn(move || {
                    let path = if i % 2 == 0 { "/healthz" } else { "/livez" };
                    get_once(DEFAULT_HEALTHZ_PORT, path).status
                })
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().expect("client thread"), 200);
        }

        metrics.observe_sync(Duration::from_millis(3));
        let a = get_once(DEFAULT_METRICS_PORT, "/metrics");
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(a
            .body
            .contains("kubeproxy_sync_proxy_rules_duration_seconds_count 1\n"));
        let a = get_once(DEFAULT_METRICS_PORT, "/proxyMode");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "ebpf");

        // Dropping the serving futures closes the listeners.
        hs.abort();
        ms.abort();
        let _ = rt.block_on(hs);
        let _ = rt.block_on(ms);
        assert_refused(DEFAULT_HEALTHZ_PORT);
        assert_refused(DEFAULT_METRICS_PORT);
    });
}
