use super::*;
use crate::observe::test_support::{get, read_response};

use hyper::header::CONTENT_TYPE;

/// A sample line split into (name, labels as written, value).
fn parse_sample(line: &str) -> (String, Vec<(String, String)>, String) {
    let (head, value) = line.rsplit_once(' ').expect("value");
    let (name, labels) = match head.split_once('{') {
        None => (head.to_string(), Vec::new()),
        Some((name, rest)) => {
            let rest = rest.strip_suffix('}').expect("closing brace");
            // Parse k="v" pairs honouring escapes.
            let mut labels = Vec::new();
            let mut chars = rest.chars().peekable();
            while chars.peek().is_some() {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "{line}");
                let mut val = String::new();
                loop {
                    match chars.next().expect("unterminated label value") {
                        '\\' => match chars.next().expect("escape") {
                            'n' => val.push('\n'),
                            c @ ('\\' | '"') => val.push(c),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline in {line}"),
                        c => val.push(c),
                    }
                }
                labels.push((key, val));
                match chars.next() {
                    None => break,
                    Some(',') => {}
                    Some(c) => panic!("unexpected {c:?} in {line}"),
                }
            }
            (name.to_string(), labels)
        }
    };
    (name, labels, value.to_string())
}

/// Checks the whole exposition against the Prometheus text format 0.0.4:
/// every family has HELP then TYPE, every sample belongs to the last TYPE'd
/// family, values parse, no OpenMetrics-only lines.
fn validate(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut pending_help: Option<String> = None;
    assert!(text.ends_with('\n'));
    assert!(!text.contains("# EOF"), "OpenMetrics, not 0.0.4");
    assert!(!text.contains("# UNIT"), "OpenMetrics, not 0.0.4");
    assert!(!text.contains("_total_total"), "{text}");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("help text");
            pending_help = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("type");
            assert_eq!(
                pending_help.take().as_deref(),
                Some(name),
                "HELP before TYPE"
            );
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "family {name} twice"
            );
            current = Some((name.to_string(), kind.to_string()));
        } else {
            let (name, _, value) = parse_sample(line);
            let (fam, kind) = current.clone().expect("sample before TYPE");
            let ok = match kind.as_str() {
                "histogram" => [
                    format!("{fam}_bucket"),
                    format!("{fam}_sum"),
                    format!("{fam}_count"),
                ]
                .contains(&name),
                _ => name == fam,
            };
            assert!(ok, "sample {name} under family {fam}");
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value.as_str()),
                "{line}"
            );
        }
    }
    types
}

fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(parse_sample)
        .filter(|(n, _, _)| n == name)
        .map(|(_, l, v)| (l, v))
        .collect()
}

/// The value of the unlabelled series `name` as a number (the text of a
/// float is the encoder's business, e.g. `1` or `1.0`).
fn float(text: &str, name: &str) -> f64 {
    value(text, name, &[])
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .expect("float")
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<String> {
    samples(text, name)
        .into_iter()
        .find(|(l, _)| {
            l.len() == labels.len()
                && l.iter()
                    .zip(labels)
                    .all(|((k, v), (k2, v2))| k == k2 && v == v2)
        })
        .map(|(_, v)| v)
}

#[test]
fn a3_every_kube_proxy_metric_with_its_type() {
    let m = Metrics::new();
    let text = m.render();
    let types = validate(&text);
    for (name, kind) in [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
        ),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
        ),
        ("lb_agent_info", "gauge"),
        ("lb_apiserver_connected", "gauge"),
        ("lb_conntrack_entries", "gauge"),
        ("lb_conntrack_gc_deleted_total", "counter"),
        ("lb_conntrack_gc_duration_seconds", "gauge"),
        ("lb_conntrack_gc_last_timestamp_seconds", "gauge"),
        ("lb_datapath_packets_total", "counter"),
        ("lb_datapath_drops_total", "counter"),
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "{name}\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    // kube-proxy's help texts carry component-base's stability prefix.
    assert!(text.contains(
        "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n"
    ));
    // Zero values before anything happened.
    assert_eq!(
        value(
            &text,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            &[]
        )
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        value(
            &text,
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
            &[]
        )
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        value(
            &text,
            "lb_agent_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("mode", "ebpf"),
                ("source", "")
            ]
        )
        .as_deref(),
        Some("1")
    );
    // Vectors without series are left out, as client_golang does.
    assert!(!text.contains("lb_rejected_objects_total"));
    assert!(!text.contains("lb_map_entries"));
    assert!(!text.contains("lb_attached_interfaces"));
}

#[test]
fn a3_help_and_type_lines_are_kube_proxys() {
    // Exact HELP and TYPE lines: the help text as kube-proxy writes it (no
    // full stop added), counters described under their `_total` name.
    let text = Metrics::new().render();
    for lines in [
        "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n\
         # TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n",
        "# HELP kubeproxy_network_programming_duration_seconds [ALPHA] In Cluster Network Programming Latency in seconds\n\
         # TYPE kubeproxy_network_programming_duration_seconds histogram\n",
        "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds [ALPHA] The last time proxy rules were successfully synced\n\
         # TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\n",
        "# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds [ALPHA] The last time a sync of proxy rules was queued\n\
         # TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge\n",
        "# HELP kubeproxy_sync_proxy_rules_service_changes_total [ALPHA] Cumulative proxy rules Service changes\n\
         # TYPE kubeproxy_sync_proxy_rules_service_changes_total counter\n\
         kubeproxy_sync_proxy_rules_service_changes_total 0\n",
        "# HELP kubeproxy_sync_proxy_rules_endpoint_changes_total [ALPHA] Cumulative proxy rules Endpoint changes\n\
         # TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter\n\
         kubeproxy_sync_proxy_rules_endpoint_changes_total 0\n",
    ] {
        assert!(text.contains(lines), "missing:\n{lines}\nin:\n{text}");
    }
}

#[test]
fn a3_kube_proxy_bucket_layouts() {
    let b: Vec<f64> = sync_proxy_rules_buckets().collect();
    assert_eq!(b.len(), 15);
    assert_eq!(b[0], 0.001);
    // Go's ExponentialBuckets multiplies repeatedly; same values here.
    assert!(b.windows(2).all(|w| w[1] == w[0] * 2.0), "{b:?}");
    assert_eq!(b[14], 16.384);
    let n: Vec<f64> = network_programming_buckets().collect();
    assert_eq!(n.len(), 80);
    assert_eq!(&n[..4], &[0.25, 0.5, 1.0, 2.0]);
    assert_eq!(n[60], 59.0);
    assert_eq!(n[61], 60.0);
    assert_eq!(n[72], 115.0);
    assert_eq!(n[73], 120.0);
    assert_eq!(n[79], 300.0);
    assert!(n.windows(2).all(|w| w[0] < w[1]), "increasing");
}

#[test]
fn a3_sync_histogram_buckets_sum_count_and_timestamp() {
    let m = Metrics::new();
    let now = UNIX_EPOCH + Duration::from_millis(1_714_557_600_500);
    m.observe_sync_at(Duration::from_micros(500), now); // <= 0.001
    m.observe_sync_at(Duration::from_millis(1), now); // == 0.001: le is inclusive
    m.observe_sync_at(Duration::from_millis(3), now); // <= 0.004
    m.observe_sync_at(Duration::from_secs(20), now); // > 16.384: +Inf only
    let text = m.render();
    validate(&text);
    let name = "kubeproxy_sync_proxy_rules_duration_seconds";
    let buckets = samples(&text, &format!("{name}_bucket"));
    assert_eq!(buckets.len(), 16);
    let le: Vec<&str> = buckets.iter().map(|(l, _)| l[0].1.as_str()).collect();
    assert_eq!(
        le,
        [
            "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
            "0.512", "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf"
        ]
    );
    assert!(buckets.iter().all(|(l, _)| l.len() == 1 && l[0].0 == "le"));
    let counts: Vec<&str> = buckets.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        counts,
        ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3", "3", "3", "3", "3", "3", "4"]
    );
    assert_eq!(
        value(&text, &format!("{name}_count"), &[]).as_deref(),
        Some("4")
    );
    let sum: f64 = value(&text, &format!("{name}_sum"), &[])
        .expect("sum")
        .parse()
        .expect("float");
    assert!((sum - 20.0045).abs() < 1e-9, "{sum}");
    assert_eq!(
        float(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        1_714_557_600.5
    );

    m.observe_network_programming(Duration::from_millis(750));
    m.observe_network_programming(Duration::from_secs(1000));
    let text = m.render();
    let np = "kubeproxy_network_programming_duration_seconds";
    assert_eq!(samples(&text, &format!("{np}_bucket")).len(), 81);
    assert_eq!(
        value(&text, &format!("{np}_bucket"), &[("le", "0.5")]).as_deref(),
        Some("0")
    );
    assert_eq!(
        value(&text, &format!("{np}_bucket"), &[("le", "1")]).as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, &format!("{np}_bucket"), &[("le", "300")]).as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, &format!("{np}_bucket"), &[("le", "+Inf")]).as_deref(),
        Some("2")
    );
    assert_eq!(
        value(&text, &format!("{np}_count"), &[]).as_deref(),
        Some("2")
    );
}

#[test]
fn a3_change_counters_and_queued_timestamp() {
    let m = Metrics::new();
    m.add_service_changes(3);
    m.add_service_changes(2);
    m.add_endpoint_changes(7);
    m.set_last_queued(UNIX_EPOCH + Duration::from_secs(1_714_557_601));
    let text = m.render();
    validate(&text);
    assert_eq!(
        value(
            &text,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            &[]
        )
        .as_deref(),
        Some("5")
    );
    assert_eq!(
        value(
            &text,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            &[]
        )
        .as_deref(),
        Some("7")
    );
    assert_eq!(
        float(
            &text,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
        ),
        1_714_557_601.0
    );
}

#[test]
fn a3_lb_metrics_and_label_escaping() {
    let m = Metrics::new();
    m.set_map_fill("LB_SERVICES", 12, 65536);
    m.set_map_fill("LB_CONNTRACK", 3, 262144);
    m.set_map_fill("LB_SERVICES", 13, 65536);
    m.set_conntrack_entries(3);
    m.observe_conntrack_gc(7, 4, Duration::from_millis(250));
    m.observe_conntrack_gc(3, 2, Duration::from_millis(500));
    m.set_datapath_counters(&[
        (StatReason::Packets, 1000),
        (StatReason::NewFlow, 10),
        (StatReason::DropNoBackend, 4),
    ]);
    // Absolute values: a second read replaces, it does not add.
    m.set_datapath_counters(&[(StatReason::DropNoBackend, 5)]);
    m.inc_rejected_object("Service");
    m.inc_rejected_object("Service");
    m.inc_rejected_object("EndpointSlice");
    m.set_apiserver_connected(true);
    m.inc_rejected_object("we\"ird\\kind\nx");
    m.set_attached_interfaces("uplink", 1);
    m.set_attached_interfaces("pod", 7);
    m.set_agent_source("cluster");
    let text = m.render();
    assert!(
        text.contains(&format!(
            "lb_agent_info{{version=\"{}\",mode=\"ebpf\",source=\"cluster\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let types = validate(&text);
    for (name, kind) in [
        ("lb_map_entries", "gauge"),
        ("lb_map_capacity", "gauge"),
        ("lb_rejected_objects_total", "counter"),
        ("lb_attached_interfaces", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    assert_eq!(
        value(&text, "lb_map_entries", &[("map", "LB_SERVICES")]).as_deref(),
        Some("13")
    );
    assert_eq!(
        value(&text, "lb_map_capacity", &[("map", "LB_CONNTRACK")]).as_deref(),
        Some("262144")
    );
    assert_eq!(
        value(&text, "lb_conntrack_entries", &[]).as_deref(),
        Some("3")
    );
    assert_eq!(
        value(&text, "lb_conntrack_gc_deleted_total", &[]).as_deref(),
        Some("6")
    );
    assert_eq!(
        value(&text, "lb_conntrack_gc_duration_seconds", &[]).as_deref(),
        Some("0.5")
    );
    assert!(value(&text, "lb_conntrack_gc_last_timestamp_seconds", &[])
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|t| t > 1.0e9));
    assert_eq!(
        value(&text, "lb_datapath_packets_total", &[("reason", "packets")]).as_deref(),
        Some("1000")
    );
    assert_eq!(
        value(
            &text,
            "lb_datapath_packets_total",
            &[("reason", "drop_no_backend")]
        )
        .as_deref(),
        Some("5")
    );
    // Every reason has a series; drops only the drop reasons.
    assert_eq!(
        samples(&text, "lb_datapath_packets_total").len(),
        StatReason::ALL.len()
    );
    let drops = samples(&text, "lb_datapath_drops_total");
    assert_eq!(
        drops.len(),
        StatReason::ALL.iter().filter(|r| r.is_drop()).count()
    );
    assert!(drops.iter().all(|(l, _)| l[0].1.starts_with("drop_")));
    assert_eq!(
        value(
            &text,
            "lb_datapath_drops_total",
            &[("reason", "drop_no_backend")]
        )
        .as_deref(),
        Some("5")
    );
    assert_eq!(
        value(&text, "lb_datapath_drops_total", &[("reason", "new_flow")]),
        None
    );
    assert_eq!(
        value(&text, "lb_rejected_objects_total", &[("kind", "Service")]).as_deref(),
        Some("2")
    );
    assert_eq!(
        value(&text, "lb_apiserver_connected", &[]).as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, "lb_attached_interfaces", &[("role", "pod")]).as_deref(),
        Some("7")
    );
    assert_eq!(
        value(
            &text,
            "lb_agent_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("mode", "ebpf"),
                ("source", "cluster")
            ]
        )
        .as_deref(),
        Some("1")
    );
    // Series sorted by label value, whatever the order of the updates.
    let roles: Vec<String> = samples(&text, "lb_attached_interfaces")
        .into_iter()
        .map(|(l, _)| l[0].1.clone())
        .collect();
    assert_eq!(roles, ["pod", "uplink"]);
    // Escaping as written on the wire, and round-trip through the parser.
    assert!(
        text.contains("lb_rejected_objects_total{kind=\"we\\\"ird\\\\kind\\nx\"} 1\n"),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "lb_rejected_objects_total",
            &[("kind", "we\"ird\\kind\nx")]
        )
        .as_deref(),
        Some("1")
    );
    m.set_apiserver_connected(false);
    assert_eq!(
        value(&m.render(), "lb_apiserver_connected", &[]).as_deref(),
        Some("0")
    );
}

#[test]
fn a2_metrics_endpoint_content_type_and_body() {
    let m = Metrics::new();
    m.add_endpoint_changes(1);
    let (status, headers, body) = read_response(metrics_response(&m, &get("/metrics")));
    assert_eq!(status, StatusCode::OK);
    // The Prometheus text format 0.0.4, as kube-proxy serves it.
    assert_eq!(
        headers[CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(body, m.render());
}

#[test]
fn a2_proxy_mode_prints_ebpf() {
    let m = Metrics::new();
    let (status, headers, body) = read_response(metrics_response(&m, &get("/proxyMode")));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ebpf");
    assert_eq!(headers[CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let (status, _, body) = read_response(metrics_response(&m, &get("/healthz")));
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    for p in ["/", "/metrics/", "/proxymode", "/livez"] {
        let (status, _, body) = read_response(metrics_response(&m, &get(p)));
        assert_eq!(status, StatusCode::NOT_FOUND, "{p}");
        assert_eq!(body, "404 page not found\n");
    }
}

#[test]
fn a3_special_floats() {
    // `le` labels as Go's client writes them (`1`, not `1.0`: another
    // series for Prometheus), the overflow bucket as `+Inf`.
    let m = Metrics::new();
    m.observe_network_programming(Duration::from_secs(1));
    let text = m.render();
    let np = "kubeproxy_network_programming_duration_seconds_bucket";
    for le in [
        "0.25", "0.5", "1", "2", "59", "60", "115", "120", "300", "+Inf",
    ] {
        assert!(
            value(&text, np, &[("le", le)]).is_some(),
            "no le={le:?} in\n{text}"
        );
    }
    assert!(!text.contains("le=\"1.0\""), "{text}");
    assert_eq!(
        value(
            &text,
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            &[("le", "16.384")]
        )
        .as_deref(),
        Some("0")
    );
}
