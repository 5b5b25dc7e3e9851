//! Table-driven tests of the model, named after the SEMANTICS.md ids.
//! Fixtures are small YAML documents (flow style) parsed by the manifest
//! source, so they read like what a user would write.

use std::collections::BTreeMap;

use lb_common::service_flags as sf;

use super::*;
use crate::desired::{Endpoint, Frontend, FrontendKind, Protocol};
use crate::test_fixtures::{parse_fixture, Fixture};

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

fn ctx() -> NodeContext {
    NodeContext::new("node-a", Some("zone-a".into()))
}

fn run(yaml: &str) -> ModelOutput {
    run_ctx(&ctx(), yaml)
}

fn run_ctx(ctx: &NodeContext, yaml: &str) -> ModelOutput {
    let o: Fixture = parse_fixture(yaml);
    desired_state(ctx, &o.services, &o.endpoint_slices)
}

/// A Service document. `meta` and `spec` are YAML flow-mapping bodies.
fn svc_full(name: &str, meta: &str, spec: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default{meta}}}\nspec: {{{spec}}}\nstatus: {{{status}}}\n"
    )
}

fn svc(name: &str, spec: &str) -> String {
    svc_full(name, "", spec, "")
}

/// An IPv4 EndpointSlice document. `ports`/`endpoints` are flow sequences.
fn slice_full(
    name: &str,
    service: &str,
    extra_meta: &str,
    address_type: &str,
    ports: &str,
    endpoints: &str,
) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}{extra_meta}}}}}\naddressType: {address_type}\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

fn slice(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
    slice_full(name, service, "", "IPv4", ports, endpoints)
}

/// An endpoint (flow mapping). `extra` is appended inside the braces.
fn ep(addr: &str, node: &str, extra: &str) -> String {
    format!("{{addresses: [{addr}], nodeName: {node}{extra}}}")
}

fn spn(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port_name: port.into(),
        protocol,
    }
}

fn get<'a>(
    out: &'a ModelOutput,
    name: &str,
    port: &str,
    protocol: Protocol,
) -> &'a DesiredServicePort {
    out.state
        .services
        .get(&spn(name, port, protocol))
        .unwrap_or_else(|| {
            panic!(
                "no {name}:{port}/{protocol} in {:#?}\nerrors: {:?}",
                out.state,
                errors(out)
            )
        })
}

/// `addr:port` plus `L` (local) and `T` (terminating) markers.
fn eps(set: &[Endpoint]) -> Vec<String> {
    set.iter()
        .map(|e| {
            format!(
                "{}:{}{}{}",
                e.addr,
                e.port,
                if e.local { " L" } else { "" },
                if e.terminating { " T" } else { "" }
            )
        })
        .collect()
}

fn fes(p: &DesiredServicePort) -> Vec<String> {
    p.frontends
        .iter()
        .map(|f| {
            let kind = match f.kind {
                FrontendKind::ClusterIp => "cip",
                FrontendKind::NodePort => "np",
                FrontendKind::ExternalIp => "ext",
                FrontendKind::LoadBalancer => "lb",
            };
            match f.addr {
                Some(a) => format!("{kind} {a}:{}/{}", f.port, f.protocol),
                None => format!("{kind} *:{}/{}", f.port, f.protocol),
            }
        })
        .collect()
}

/// Per service port: frontends, cluster set, local set, flags.
type Summary<'a> = BTreeMap<String, (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, u16)>;

fn errors(out: &ModelOutput) -> Vec<String> {
    out.errors.iter().map(ToString::to_string).collect()
}

const WEB: &str = "clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]";
const HTTP_8080: &str = "[{name: http, port: 8080, protocol: TCP}]";

// ---- W: which objects ------------------------------------------------------

#[test]
fn w1_ignores_objects_with_service_proxy_name_or_headless_label() {
    let cases = [
        (
            ", labels: {service.kubernetes.io/service-proxy-name: other}",
            "",
            false,
        ),
        (", labels: {service.kubernetes.io/headless: ''}", "", false),
        (
            "",
            ", service.kubernetes.io/service-proxy-name: other",
            true,
        ),
        ("", ", service.kubernetes.io/headless: ''", true),
        ("", "", true),
    ];
    for (svc_meta, slice_meta, want_service) in cases {
        let yaml = svc_full("web", svc_meta, WEB, "")
            + &slice_full(
                "web-1",
                "web",
                slice_meta,
                "IPv4",
                HTTP_8080,
                &format!("[{}]", ep("10.1.0.1", "node-b", "")),
            );
        let out = run(&yaml);
        assert!(out.errors.is_empty(), "{:?}", errors(&out));
        assert_eq!(
            out.state.services.len(),
            usize::from(want_service),
            "{svc_meta}{slice_meta}"
        );
        if want_service {
            let want_eps = if slice_meta.is_empty() { 1 } else { 0 };
            assert_eq!(
                get(&out, "web", "http", TCP).backends.len(),
                want_eps,
                "{slice_meta}"
            );
        }
    }
}

#[test]
fn w2_skips_headless_and_external_name() {
    let yaml = svc("none", "clusterIP: None, ports: [{port: 80}]")
        + &svc("empty", "clusterIP: '', ports: [{port: 80}]")
        + &svc("unset", "ports: [{port: 80}]")
        + &svc(
            "ext",
            "type: ExternalName, externalName: example.com, ports: [{port: 80}]",
        )
        + &svc(
            "v6only",
            "clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]",
        )
        + &svc("ok", "clusterIP: 10.96.0.1, ports: [{port: 80}]");
    let out = run(&yaml);
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(
        out.state.services.keys().cloned().collect::<Vec<_>>(),
        vec![spn("ok", "", TCP)]
    );
}

#[test]
fn w3_merges_slices_and_drops_duplicates() {
    let yaml = svc("web", WEB)
        + &slice("web-a", "web", HTTP_8080, &format!("[{}, {}]", ep("10.1.0.2", "node-b", ""), ep("10.1.0.1", "node-b", "")))
        + &slice("web-b", "web", HTTP_8080, &format!("[{}, {}]", ep("10.1.0.1", "node-b", ""), ep("10.1.0.3", "node-c", "")))
        // Same address, a different port number: a different endpoint.
        + &slice("web-c", "web", "[{name: http, port: 9090}]", &format!("[{}]", ep("10.1.0.1", "node-b", "")));
    let out = run(&yaml);
    let p = get(&out, "web", "http", TCP);
    assert_eq!(
        eps(&p.backends),
        vec![
            "10.1.0.1:8080",
            "10.1.0.1:9090",
            "10.1.0.2:8080",
            "10.1.0.3:8080"
        ]
    );
}

#[test]
fn w3_duplicate_endpoint_prefers_the_local_copy() {
    let yaml = svc("web", WEB)
        + &slice(
            "web-a",
            "web",
            HTTP_8080,
            &format!("[{}]", ep("10.1.0.1", "node-b", "")),
        )
        + &slice(
            "web-b",
            "web",
            HTTP_8080,
            &format!("[{}]", ep("10.1.0.1", "node-a", "")),
        );
    let p = get(&run(&yaml), "web", "http", TCP).clone();
    assert_eq!(eps(&p.backends), vec!["10.1.0.1:8080 L"]);
    assert_eq!(eps(&p.local_backends), vec!["10.1.0.1:8080 L"]);
}

#[test]
fn w3_uses_first_address_and_skips_other_families() {
    let yaml = svc("web", WEB)
        + &slice(
            "web-a",
            "web",
            HTTP_8080,
            "[{addresses: [10.1.0.1, 10.1.0.99]}, {addresses: ['fd00::1']}]",
        )
        + &slice_full(
            "web-v6",
            "web",
            "",
            "IPv6",
            HTTP_8080,
            "[{addresses: ['fd00::2']}]",
        )
        + &slice_full(
            "web-fqdn",
            "web",
            "",
            "FQDN",
            HTTP_8080,
            "[{addresses: [example.com]}]",
        );
    let out = run(&yaml);
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(
        eps(&get(&out, "web", "http", TCP).backends),
        vec!["10.1.0.1:8080"]
    );
}

#[test]
fn w3_bad_slices_and_endpoints_are_reported_and_skipped_alone() {
    let unlabeled = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: stray, namespace: default}\naddressType: IPv4\nendpoints: [{addresses: [10.1.0.7]}]\n";
    let yaml = svc("web", WEB)
        + &slice("web-a", "web", HTTP_8080, "[{addresses: [10.1.0.300]}, {addresses: []}, {addresses: [10.1.0.1]}]")
        + &slice_full("web-b", "web", "", "IPv5", HTTP_8080, "[{addresses: [10.1.0.2]}]")
        // Another namespace's slice with the same service name does not match.
        + &slice("web-c", "web", HTTP_8080, "[{addresses: [10.1.0.3]}]").replace("namespace: default", "namespace: other")
        + unlabeled;
    let out = run(&yaml);
    assert_eq!(
        eps(&get(&out, "web", "http", TCP).backends),
        vec!["10.1.0.1:8080"]
    );
    assert_eq!(
        errors(&out),
        vec![
            "EndpointSlice default/stray: metadata.labels[\"kubernetes.io/service-name\"]: missing: the slice belongs to no Service; ignored",
            "EndpointSlice default/web-a: endpoints[0].addresses[0] \"10.1.0.300\": not an IPv4 address; endpoint ignored",
            "EndpointSlice default/web-a: endpoints[1].addresses: empty; endpoint ignored",
            "EndpointSlice default/web-b: addressType \"IPv5\": unknown address type (expected IPv4, IPv6 or FQDN)",
        ]
    );
}

#[test]
fn w4_matches_ports_by_name_and_protocol_taking_the_number_from_each_slice() {
    let yaml = svc("dns", "clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}, {name: metrics, port: 9153}]")
        // Named targetPort resolved to different numbers in different slices.
        + &slice("dns-a", "dns", "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}]", "[{addresses: [10.1.0.1]}]")
        + &slice("dns-b", "dns", "[{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]", "[{addresses: [10.1.0.2]}]")
        // Right name, wrong protocol: no match.
        + &slice("dns-c", "dns", "[{name: dns, port: 53, protocol: TCP}]", "[{addresses: [10.1.0.3]}]");
    let out = run(&yaml);
    assert_eq!(
        eps(&get(&out, "dns", "dns", UDP).backends),
        vec!["10.1.0.1:5353", "10.1.0.2:53"]
    );
    assert_eq!(
        eps(&get(&out, "dns", "dns-tcp", TCP).backends),
        vec!["10.1.0.1:5353", "10.1.0.2:53"]
    );
    assert!(get(&out, "dns", "metrics", TCP).backends.is_empty());
}

#[test]
fn w4_unnamed_port_matches_unnamed_slice_port() {
    let yaml = svc("one", "clusterIP: 10.96.0.1, ports: [{port: 80}]")
        + &slice(
            "one-a",
            "one",
            "[{port: 8080}]",
            "[{addresses: [10.1.0.1]}]",
        );
    assert_eq!(
        eps(&get(&run(&yaml), "one", "", TCP).backends),
        vec!["10.1.0.1:8080"]
    );
}

#[test]
fn w5_nil_conditions_mean_ready_serving_not_terminating() {
    // (conditions, in the cluster set, terminating fallback marker)
    let cases = [
        ("", Some(false)),
        (", conditions: {}", Some(false)),
        (", conditions: {ready: true}", Some(false)),
        (", conditions: {ready: false}", None),
        // Not ready, serving nil = true, terminating: fallback.
        (
            ", conditions: {ready: false, terminating: true}",
            Some(true),
        ),
        (
            ", conditions: {ready: false, serving: false, terminating: true}",
            None,
        ),
    ];
    for (cond, want) in cases {
        let yaml = svc("web", WEB)
            + &slice(
                "web-a",
                "web",
                HTTP_8080,
                &format!("[{}]", ep("10.1.0.1", "node-b", cond)),
            );
        let out = run(&yaml);
        let got = get(&out, "web", "http", TCP)
            .backends
            .first()
            .map(|e| e.terminating);
        assert_eq!(got, want, "{cond}");
    }
}

#[test]
fn w6_local_is_decided_by_node_name() {
    let yaml = svc("web", WEB)
        + &slice(
            "web-a",
            "web",
            HTTP_8080,
            &format!(
                "[{}, {}, {{addresses: [10.1.0.3]}}]",
                ep("10.1.0.1", "node-a", ""),
                ep("10.1.0.2", "node-b", "")
            ),
        );
    let out = run(&yaml);
    let p = get(&out, "web", "http", TCP);
    assert_eq!(
        eps(&p.backends),
        vec!["10.1.0.1:8080 L", "10.1.0.2:8080", "10.1.0.3:8080"]
    );
    assert_eq!(eps(&p.local_backends), vec!["10.1.0.1:8080 L"]);
    // Another node sees the same slice differently.
    let out = run_ctx(&NodeContext::new("node-b", None), &yaml);
    assert_eq!(
        eps(&get(&out, "web", "http", TCP).local_backends),
        vec!["10.1.0.2:8080 L"]
    );
}

// ---- F: forwarding ------------------------------------------------------------

#[test]
fn f1_cluster_ip_and_the_ipv4_entries_of_cluster_ips() {
    let cases = [
        ("clusterIP: 10.96.0.1", vec!["cip 10.96.0.1:80/TCP"]),
        (
            "clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1']",
            vec!["cip 10.96.0.1:80/TCP"],
        ),
        // IPv6-primary dual-stack: the IPv4 address is the second entry.
        (
            "clusterIP: 'fd00::1', clusterIPs: ['fd00::1', 10.96.0.2]",
            vec!["cip 10.96.0.2:80/TCP"],
        ),
        ("clusterIPs: [10.96.0.3]", vec!["cip 10.96.0.3:80/TCP"]),
    ];
    for (spec, want) in cases {
        let out = run(&svc("web", &format!("{spec}, ports: [{{port: 80}}]")));
        assert!(out.errors.is_empty(), "{:?}", errors(&out));
        assert_eq!(fes(get(&out, "web", "", TCP)), want, "{spec}");
        assert_eq!(get(&out, "web", "", TCP).flags, 0);
    }
}

#[test]
fn f1_bad_cluster_ip_skips_only_that_service() {
    let yaml = svc("web", "clusterIP: 10.0.0.300, ports: [{port: 80}]")
        + &svc("ok", "clusterIP: 10.96.0.1, ports: [{port: 80}]");
    let out = run(&yaml);
    assert_eq!(
        errors(&out),
        vec!["Service default/web: spec.clusterIP \"10.0.0.300\": not an IPv4 address"]
    );
    assert_eq!(
        out.state.services.keys().cloned().collect::<Vec<_>>(),
        vec![spn("ok", "", TCP)]
    );
}

#[test]
fn f3_is_datapath_behaviour() {
    // F3 (random choice per flow) is the datapath's; the model's part is to
    // hand it every usable endpoint, in a stable order.
    let yaml = svc("web", WEB)
        + &slice(
            "web-a",
            "web",
            HTTP_8080,
            "[{addresses: [10.1.0.3]}, {addresses: [10.1.0.1]}, {addresses: [10.1.0.2]}]",
        );
    assert_eq!(
        eps(&get(&run(&yaml), "web", "http", TCP).backends),
        vec!["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
    );
}

#[test]
fn f4_node_port_frontends() {
    let cases: [(&str, &str, Vec<&str>); 6] = [
        (
            "NodePort",
            "",
            vec!["cip 10.96.0.10:80/TCP", "np *:30080/TCP"],
        ),
        (
            "LoadBalancer",
            "",
            vec!["cip 10.96.0.10:80/TCP", "np *:30080/TCP"],
        ),
        // An explicitly requested nodePort is honoured even when automatic
        // allocation is off (kube-proxy programs whatever nodePort is set).
        (
            "LoadBalancer",
            ", allocateLoadBalancerNodePorts: false",
            vec!["cip 10.96.0.10:80/TCP", "np *:30080/TCP"],
        ),
        // A ClusterIP Service has no node port even if the field is set.
        ("ClusterIP", "", vec!["cip 10.96.0.10:80/TCP"]),
        (
            "NodePort",
            ", nodePortMissing: true",
            vec!["cip 10.96.0.10:80/TCP"],
        ),
        (
            "LoadBalancer",
            ", allocateLoadBalancerNodePorts: false, nodePortMissing: true",
            vec!["cip 10.96.0.10:80/TCP"],
        ),
    ];
    for (type_, extra, want) in cases {
        let port = if extra.contains("nodePortMissing") {
            "{port: 80}"
        } else {
            "{port: 80, nodePort: 30080}"
        };
        let spec = format!(
            "type: {type_}, clusterIP: 10.96.0.10, ports: [{port}]{}",
            extra.replace(", nodePortMissing: true", "")
        );
        let out = run(&svc("web", &spec));
        assert!(out.errors.is_empty(), "{:?}", errors(&out));
        assert_eq!(fes(get(&out, "web", "", TCP)), want, "{spec}");
    }
}

#[test]
fn f5_external_ips() {
    let yaml = svc("web", "clusterIP: 10.96.0.10, externalIPs: [203.0.113.7, 'fd00::7', 203.0.113.999, 203.0.113.8], ports: [{port: 80}, {name: dns, port: 53, protocol: UDP}]");
    let out = run(&yaml);
    assert_eq!(
        errors(&out),
        vec!["Service default/web: spec.externalIPs[2] \"203.0.113.999\": not an IPv4 address; skipped"]
    );
    assert_eq!(
        fes(get(&out, "web", "", TCP)),
        vec![
            "cip 10.96.0.10:80/TCP",
            "ext 203.0.113.7:80/TCP",
            "ext 203.0.113.8:80/TCP"
        ]
    );
    assert_eq!(
        fes(get(&out, "web", "dns", UDP)),
        vec![
            "cip 10.96.0.10:53/UDP",
            "ext 203.0.113.7:53/UDP",
            "ext 203.0.113.8:53/UDP"
        ]
    );
}

#[test]
fn f6_load_balancer_ingress_ips_unless_proxy_mode() {
    let status = "loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: VIP}, {ip: 198.51.100.3, ipMode: Proxy}, {hostname: lb.example.com}, {ip: 'fd00::9'}]}";
    let out = run(&svc_full(
        "web",
        "",
        "type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]",
        status,
    ));
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(
        fes(get(&out, "web", "", TCP)),
        vec![
            "cip 10.96.0.10:80/TCP",
            "np *:30080/TCP",
            "lb 198.51.100.1:80/TCP",
            "lb 198.51.100.2:80/TCP"
        ]
    );
    // Status left over on a non-LoadBalancer Service is not used.
    let out = run(&svc_full(
        "web",
        "",
        "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        status,
    ));
    assert_eq!(
        fes(get(&out, "web", "", TCP)),
        vec!["cip 10.96.0.10:80/TCP"]
    );
}

#[test]
fn f7_source_ranges_set_the_flag_and_are_kept() {
    let lb = "type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}]";
    let out = run(&svc(
        "web",
        &format!("{lb}, loadBalancerSourceRanges: [10.0.0.0/8, ' 192.168.1.7/24', 'fd00::/8']"),
    ));
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(get(&out, "web", "", TCP).flags, sf::SOURCE_RANGES);
    let ranges: Vec<String> = get(&out, "web", "", TCP)
        .source_ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ranges, vec!["10.0.0.0/8", "192.168.1.0/24"]);
    // Only IPv6 ranges: nothing to enforce for IPv4 (as kube-proxy).
    let out = run(&svc(
        "web",
        &format!("{lb}, loadBalancerSourceRanges: ['fd00::/8']"),
    ));
    assert_eq!(get(&out, "web", "", TCP).flags, 0);
    // A bad range skips the Service rather than opening it to everyone.
    let out = run(&svc(
        "web",
        &format!("{lb}, loadBalancerSourceRanges: [10.0.0.0/33]"),
    ));
    assert!(out.state.services.is_empty());
    assert_eq!(
        errors(&out),
        vec!["Service default/web: spec.loadBalancerSourceRanges[0] \"10.0.0.0/33\": not a CIDR"]
    );
}

#[test]
fn f8_session_affinity_client_ip_and_timeout() {
    type Case<'a> = (&'a str, Option<(u16, u32)>, Option<&'a str>);
    let cases: [Case; 7] = [
        ("", Some((0, 0)), None),
        ("sessionAffinity: None", Some((0, 0)), None),
        ("sessionAffinity: ClientIP", Some((sf::AFFINITY, 10_800)), None),
        ("sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}", Some((sf::AFFINITY, 60)), None),
        ("sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}", Some((sf::AFFINITY, 86_400)), None),
        (
            "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
            None,
            Some("Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds 86401: out of range 1-86400"),
        ),
        ("sessionAffinity: Sticky", None, Some("Service default/web: spec.sessionAffinity \"Sticky\": unknown value (expected None or ClientIP)")),
    ];
    for (extra, want, err) in cases {
        let sep = if extra.is_empty() { "" } else { ", " };
        let out = run(&svc(
            "web",
            &format!("clusterIP: 10.96.0.10, ports: [{{port: 80}}]{sep}{extra}"),
        ));
        assert_eq!(
            errors(&out),
            err.into_iter().map(String::from).collect::<Vec<_>>(),
            "{extra}"
        );
        let got = out
            .state
            .services
            .values()
            .next()
            .map(|p| (p.flags, p.affinity_timeout_sec));
        assert_eq!(got, want, "{extra}");
    }
}

#[test]
fn f9_tcp_and_udp_on_the_same_port_are_independent() {
    let yaml = svc("dns", "clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns, port: 53, protocol: TCP}]")
        + &slice("dns-a", "dns", "[{name: dns, port: 53, protocol: UDP}]", "[{addresses: [10.1.0.1]}]")
        + &slice("dns-b", "dns", "[{name: dns, port: 5353, protocol: TCP}]", "[{addresses: [10.1.0.2]}]");
    let out = run(&yaml);
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(
        fes(get(&out, "dns", "dns", UDP)),
        vec!["cip 10.96.0.10:53/UDP"]
    );
    assert_eq!(
        fes(get(&out, "dns", "dns", TCP)),
        vec!["cip 10.96.0.10:53/TCP"]
    );
    assert_eq!(
        eps(&get(&out, "dns", "dns", UDP).backends),
        vec!["10.1.0.1:53"]
    );
    assert_eq!(
        eps(&get(&out, "dns", "dns", TCP).backends),
        vec!["10.1.0.2:5353"]
    );
}

#[test]
fn f9_sctp_and_unknown_protocols_are_errors_for_that_port_only() {
    let yaml = svc("web", "clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP}, {name: c, port: 7, protocol: ICMP}, {name: d, port: 53, protocol: UDP}]")
        + &slice("web-a", "web", "[{name: b, port: 9, protocol: SCTP}]", "[{addresses: [10.1.0.1]}]");
    let out = run(&yaml);
    assert_eq!(
        errors(&out),
        vec![
            "Service default/web: spec.ports[1].protocol \"SCTP\": SCTP is not supported yet (TCP and UDP are)",
            "Service default/web: spec.ports[2].protocol \"ICMP\": unknown protocol (expected TCP or UDP)",
        ]
    );
    assert_eq!(
        out.state.services.keys().cloned().collect::<Vec<_>>(),
        vec![spn("web", "a", TCP), spn("web", "d", UDP)]
    );
}

#[test]
fn ports_out_of_range_are_errors_naming_the_field() {
    let yaml = svc(
        "web",
        "type: NodePort, clusterIP: 10.96.0.10, ports: [{name: a, port: 0}, {name: b, port: 80, nodePort: 70000}, {name: c, port: 81, targetPort: 0}, {name: d, port: 82, targetPort: http, nodePort: 30082}, {name: d, port: 83}]",
    ) + &slice("web-a", "web", "[{name: d, port: 0}, {name: d}, {name: d, port: 8082}]", "[{addresses: [10.1.0.1]}]");
    let out = run(&yaml);
    assert_eq!(
        errors(&out),
        vec![
            "Service default/web: spec.ports[0].port 0: out of range 1-65535",
            "Service default/web: spec.ports[1].nodePort 70000: out of range 1-65535",
            "Service default/web: spec.ports[2].targetPort 0: out of range 1-65535",
            "Service default/web: spec.ports[4].name \"d\": duplicate of spec.ports[3] (same name and protocol TCP); skipped",
            "EndpointSlice default/web-a: ports[0].port 0: out of range 1-65535; port ignored",
            "EndpointSlice default/web-a: ports[1].port: missing (\"all ports\" is not supported); port ignored",
        ]
    );
    let p = get(&out, "web", "d", TCP);
    assert_eq!(fes(p), vec!["cip 10.96.0.10:82/TCP", "np *:30082/TCP"]);
    assert_eq!(eps(&p.backends), vec!["10.1.0.1:8082"]);
    assert_eq!(out.state.services.len(), 1);
}

#[test]
fn one_address_listed_twice_by_one_port_is_one_frontend() {
    // An address that is both an externalIP and an LB IP of one port is one
    // frontend, of the first kind. (Conflicts between service ports are
    // the planner's: plan/tests.rs, C7.)
    let out = run(&svc_full(
        "web",
        "",
        "type: LoadBalancer, clusterIP: 10.96.0.3, externalIPs: [198.51.100.1], ports: [{port: 80}]",
        "loadBalancer: {ingress: [{ip: 198.51.100.1}]}",
    ));
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(
        fes(get(&out, "web", "", TCP)),
        vec!["cip 10.96.0.3:80/TCP", "ext 198.51.100.1:80/TCP"]
    );
    // Two Services asking for one address both keep asking: the model
    // does not decide.
    let older = svc_full(
        "b-old",
        ", creationTimestamp: '2024-01-01T00:00:00Z'",
        "clusterIP: 10.96.0.2, externalIPs: [203.0.113.7], ports: [{port: 80}]",
        "",
    );
    let newer = svc_full(
        "a-new",
        ", creationTimestamp: '2025-01-01T00:00:00Z'",
        "clusterIP: 10.96.0.1, externalIPs: [203.0.113.7], ports: [{port: 80}]",
        "",
    );
    let out = run(&(newer + &older));
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    assert_eq!(
        fes(get(&out, "a-new", "", TCP)),
        vec!["cip 10.96.0.1:80/TCP", "ext 203.0.113.7:80/TCP"]
    );
    assert_eq!(
        get(&out, "b-old", "", TCP).created,
        Some("2024-01-01T00:00:00Z".parse().unwrap())
    );
}

#[test]
fn a_service_too_big_for_its_share_of_the_maps_is_rejected_alone() {
    // 5,000 externalIPs on one port: 5,001 frontends.
    let ips: Vec<String> = (0..5000)
        .map(|i| format!("203.0.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let big = svc(
        "big",
        &format!(
            "clusterIP: 10.96.0.20, externalIPs: [{}], ports: [{{port: 80}}]",
            ips.join(", ")
        ),
    );
    // 5,000 ports.
    let ports: Vec<String> = (1..=5000)
        .map(|p| format!("{{name: p{p}, port: {p}}}"))
        .collect();
    let wide = svc(
        "wide",
        &format!("clusterIP: 10.96.0.21, ports: [{}]", ports.join(", ")),
    );
    let out = run(&(big + &wide + &svc("web", WEB)));
    assert_eq!(
        errors(&out),
        vec![
            "Service default/big: spec: 1 ports x 5001 addresses (cluster IPs, externalIPs, LoadBalancer IPs) = 5001 frontends, more than the 4096 one Service may have; not programmed",
            "Service default/wide: spec: 5000 ports x 1 addresses (cluster IPs, externalIPs, LoadBalancer IPs) = 5000 frontends, more than the 4096 one Service may have; not programmed",
        ]
    );
    assert_eq!(out.state.services.len(), 1);
    get(&out, "web", "http", TCP);
}

#[test]
fn names_longer_than_kubernetes_allows_are_rejected() {
    let long = "x".repeat(64);
    let out = run(&(svc(&long, WEB)
        + &svc("web", "clusterIP: 10.96.0.11, ports: [{name: a-very-long-port-name, port: 80}, {name: ok, port: 81}]")));
    assert_eq!(
        errors(&out),
        vec![
            "Service default/web: spec.ports[0].name \"a-very-long-port-name\": longer than 15 characters".to_string(),
            format!("Service default/{long}: metadata.name \"{long}\": longer than 63 characters"),
        ]
    );
    assert_eq!(out.state.services.len(), 1);
    get(&out, "web", "ok", TCP);
}

// ---- E: endpoints missing or going away -------------------------------------

#[test]
fn e1_no_endpoints_still_programs_the_frontends() {
    // E1 (reject) is the datapath's: it needs the frontend with zero backends.
    let out = run(&svc("web", WEB));
    let p = get(&out, "web", "http", TCP);
    assert_eq!(fes(p), vec!["cip 10.96.0.10:80/TCP"]);
    assert!(p.backends.is_empty() && p.local_backends.is_empty());
}

#[test]
fn e3_terminating_fallback_is_decided_separately_for_cluster_and_local() {
    let ready = ", conditions: {ready: true}";
    let term = ", conditions: {ready: false, serving: true, terminating: true}";
    let term_not_serving = ", conditions: {ready: false, serving: false, terminating: true}";
    // (endpoints, cluster set, local set)
    let cases: [(Vec<String>, Vec<&str>, Vec<&str>); 4] = [
        // Ready remote + terminating local: cluster = ready; local falls back.
        (
            vec![
                ep("10.1.0.1", "node-b", ready),
                ep("10.1.0.2", "node-a", term),
            ],
            vec!["10.1.0.1:8080"],
            vec!["10.1.0.2:8080 L T"],
        ),
        // Nothing ready anywhere: both fall back.
        (
            vec![
                ep("10.1.0.1", "node-b", term),
                ep("10.1.0.2", "node-a", term),
                ep("10.1.0.3", "node-a", term_not_serving),
            ],
            vec!["10.1.0.1:8080 T", "10.1.0.2:8080 L T"],
            vec!["10.1.0.2:8080 L T"],
        ),
        // Ready local: terminating ones are not used.
        (
            vec![
                ep("10.1.0.1", "node-a", ready),
                ep("10.1.0.2", "node-a", term),
            ],
            vec!["10.1.0.1:8080 L"],
            vec!["10.1.0.1:8080 L"],
        ),
        // Only a not-serving terminating endpoint: nothing usable.
        (
            vec![ep("10.1.0.3", "node-a", term_not_serving)],
            vec![],
            vec![],
        ),
    ];
    for (endpoints, cluster, local) in cases {
        let yaml = svc("web", WEB)
            + &slice(
                "web-a",
                "web",
                HTTP_8080,
                &format!("[{}]", endpoints.join(", ")),
            );
        let out = run(&yaml);
        let p = get(&out, "web", "http", TCP);
        assert_eq!(eps(&p.backends), cluster, "{endpoints:?}");
        assert_eq!(eps(&p.local_backends), local, "{endpoints:?}");
    }
}

#[test]
fn e5_traffic_policies_set_flags() {
    let cases: [(&str, u16); 7] = [
        ("clusterIP: 10.96.0.10", 0),
        ("clusterIP: 10.96.0.10, internalTrafficPolicy: Local", sf::INTERNAL_LOCAL),
        ("type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local", sf::EXTERNAL_LOCAL),
        ("type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, internalTrafficPolicy: Local", sf::EXTERNAL_LOCAL | sf::INTERNAL_LOCAL),
        ("type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Cluster", 0),
        // externalIPs make a ClusterIP Service externally accessible.
        ("clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], externalTrafficPolicy: Local", sf::EXTERNAL_LOCAL),
        // Otherwise ETP has no meaning for a ClusterIP Service.
        ("clusterIP: 10.96.0.10, externalTrafficPolicy: Local", 0),
    ];
    for (spec, flags) in cases {
        let out = run(&svc("web", &format!("{spec}, ports: [{{port: 80}}]")));
        assert!(out.errors.is_empty(), "{:?}", errors(&out));
        assert_eq!(get(&out, "web", "", TCP).flags, flags, "{spec}");
    }
    let out = run(&svc(
        "web",
        "clusterIP: 10.96.0.10, internalTrafficPolicy: Nearby, ports: [{port: 80}]",
    ));
    assert!(out.state.services.is_empty());
    assert_eq!(
        errors(&out),
        vec!["Service default/web: spec.internalTrafficPolicy \"Nearby\": unknown value (expected Cluster or Local)"]
    );
}

#[test]
fn e6_topology_hints() {
    // kube-proxy today: hints are used whenever every ready endpoint has
    // one, no annotation needed; node hints (PreferSameNode) before zone
    // hints; only for the cluster-wide set. This node is node-a in zone-a.
    let zone = |z: &str| format!(", hints: {{forZones: [{{name: {z}}}]}}");
    let node = |n: &str| format!(", hints: {{forNodes: [{{name: {n}}}]}}");
    let both = |n: &str, z: &str| {
        format!(", hints: {{forNodes: [{{name: {n}}}], forZones: [{{name: {z}}}]}}")
    };
    let (za, zb) = (zone("zone-a"), zone("zone-b"));
    let disabled = ", annotations: {service.kubernetes.io/topology-mode: Disabled}";
    let not_ready_unhinted = ", conditions: {ready: false}";
    let all = vec!["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"];
    // (service meta, endpoint extras for .1 (node-b) .2 (node-a) .3 (node-c), node zone, want cluster set)
    type Case<'a> = (&'a str, [String; 3], Option<&'a str>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        // All zone-hinted, one for our zone: filtered, without any annotation.
        (
            "",
            [za.clone(), zb.clone(), zb.clone()],
            Some("zone-a"),
            vec!["10.1.0.1:8080"],
        ),
        (
            "",
            [za.clone(), za.clone(), zb.clone()],
            Some("zone-a"),
            vec!["10.1.0.1:8080", "10.1.0.2:8080"],
        ),
        // The annotation does not gate it on the proxy side, either way.
        (
            disabled,
            [za.clone(), zb.clone(), zb.clone()],
            Some("zone-a"),
            vec!["10.1.0.1:8080"],
        ),
        // Not-ready endpoints need no hint.
        (
            "",
            [za.clone(), zb.clone(), not_ready_unhinted.into()],
            Some("zone-a"),
            vec!["10.1.0.1:8080"],
        ),
        // One ready endpoint without a hint: all endpoints.
        (
            "",
            [za.clone(), zb.clone(), String::new()],
            Some("zone-a"),
            all.clone(),
        ),
        // None hinted for our zone: all.
        (
            "",
            [zb.clone(), zb.clone(), zb.clone()],
            Some("zone-a"),
            all.clone(),
        ),
        // Node without a zone label: all.
        ("", [za.clone(), zb.clone(), zb.clone()], None, all.clone()),
        // Node hints: all hinted, one for this node: PreferSameNode.
        (
            "",
            [node("node-b"), node("node-a"), node("node-c")],
            Some("zone-a"),
            vec!["10.1.0.2:8080"],
        ),
        // Node hints win over zone hints.
        (
            "",
            [
                both("node-b", "zone-a"),
                both("node-a", "zone-b"),
                both("node-c", "zone-a"),
            ],
            Some("zone-a"),
            vec!["10.1.0.2:8080"],
        ),
        // Node hints, none for this node: zone hints decide.
        (
            "",
            [
                both("node-b", "zone-a"),
                both("node-x", "zone-b"),
                both("node-c", "zone-b"),
            ],
            Some("zone-a"),
            vec!["10.1.0.1:8080"],
        ),
        // Not every ready endpoint node-hinted: zone hints decide.
        (
            "",
            [
                both("node-b", "zone-a"),
                za.clone(),
                both("node-a", "zone-b"),
            ],
            Some("zone-a"),
            vec!["10.1.0.1:8080", "10.1.0.2:8080"],
        ),
        // Node hints for this node work without a zone label.
        (
            "",
            [node("node-b"), node("node-a"), node("node-a")],
            None,
            vec!["10.1.0.2:8080", "10.1.0.3:8080"],
        ),
    ];
    for (meta, extras, zone, want) in cases {
        let endpoints = format!(
            "[{}, {}, {}]",
            ep("10.1.0.1", "node-b", &extras[0]),
            ep("10.1.0.2", "node-a", &extras[1]),
            ep("10.1.0.3", "node-c", &extras[2])
        );
        let yaml = svc_full("web", meta, WEB, "") + &slice("web-a", "web", HTTP_8080, &endpoints);
        let out = run_ctx(&NodeContext::new("node-a", zone.map(String::from)), &yaml);
        let p = get(&out, "web", "http", TCP);
        assert_eq!(
            eps(&p.backends)
                .iter()
                .map(|s| s.trim_end_matches(" L"))
                .collect::<Vec<_>>(),
            want,
            "{meta} {extras:?} {zone:?}"
        );
        // The local set ignores topology.
        assert_eq!(
            eps(&p.local_backends),
            vec!["10.1.0.2:8080 L"],
            "{meta} {extras:?}"
        );
    }
}

// ---- H: health check node port --------------------------------------------------

#[test]
fn h1_health_check_node_port_counts_local_ready_endpoints() {
    let spec = "type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{name: http, port: 80, nodePort: 30080}]";
    let endpoints = format!(
        "[{}, {}, {}]",
        ep("10.1.0.1", "node-a", ""),
        ep(
            "10.1.0.2",
            "node-a",
            ", conditions: {ready: false, terminating: true}"
        ),
        ep("10.1.0.3", "node-b", "")
    );
    let out = run(&(svc("web", spec) + &slice("web-a", "web", HTTP_8080, &endpoints)));
    assert_eq!(
        out.health_checks,
        vec![HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            node_port: 32000,
            local_endpoints: 1,
        }]
    );
    // Cluster policy: no health check.
    let out = run(&svc("web", &spec.replace("Local", "Cluster")));
    assert!(out.health_checks.is_empty());
}

// ---- general ----------------------------------------------------------------------

#[test]
fn object_error_display_is_one_actionable_line() {
    let e = ObjectError {
        kind: ObjectKind::Service,
        namespace: Some("default".into()),
        name: "web".into(),
        field: "spec.clusterIP".into(),
        value: Some("\"10.0.0.300\"".into()),
        message: "not an IPv4 address".into(),
    };
    assert_eq!(
        e.to_string(),
        "Service default/web: spec.clusterIP \"10.0.0.300\": not an IPv4 address"
    );
}

#[test]
fn unknown_type_and_duplicate_objects_are_errors() {
    let yaml = svc(
        "web",
        "type: Magic, clusterIP: 10.96.0.10, ports: [{port: 80}]",
    ) + &svc("dup", "clusterIP: 10.96.0.11, ports: [{port: 80}]")
        + &svc("dup", "clusterIP: 10.96.0.12, ports: [{port: 80}]");
    let out = run(&yaml);
    assert_eq!(
        errors(&out),
        vec![
            "Service default/dup: metadata.name: the same Service appears twice; the second one is ignored",
            "Service default/web: spec.type \"Magic\": unknown type (expected ClusterIP, NodePort, LoadBalancer or ExternalName)",
        ]
    );
    assert_eq!(
        fes(get(&out, "dup", "", TCP)),
        vec!["cip 10.96.0.11:80/TCP"]
    );
}

#[test]
fn output_does_not_depend_on_input_order() {
    let docs = [
        svc("web", "type: NodePort, clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], ports: [{name: http, port: 80, nodePort: 30080}]"),
        svc("api", "clusterIP: 10.96.0.11, externalIPs: [203.0.113.7], ports: [{name: http, port: 80}]"),
        slice("web-a", "web", HTTP_8080, "[{addresses: [10.1.0.2]}, {addresses: [10.1.0.1], nodeName: node-a}]"),
        slice("web-b", "web", HTTP_8080, "[{addresses: [10.1.0.1]}, {addresses: [10.1.0.300]}]"),
        slice("api-a", "api", HTTP_8080, "[{addresses: [10.1.0.9]}]"),
    ];
    let base = run(&docs.concat());
    assert!(!base.errors.is_empty());
    let mut order: Vec<usize> = (0..docs.len()).collect();
    for _ in 0..10 {
        order.rotate_left(2);
        order.swap(0, 3);
        let yaml: String = order.iter().map(|i| docs[*i].as_str()).collect();
        assert_eq!(run(&yaml), base);
    }
}

#[test]
fn node_context_from_node() {
    let o = parse_fixture("apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n---\napiVersion: v1\nkind: Node\nmetadata: {}\n");
    assert_eq!(NodeContext::from_node(&o.nodes[0]), Ok(ctx()));
    assert_eq!(
        NodeContext::from_node(&o.nodes[1]),
        Ok(NodeContext::new("node-b", None))
    );
    assert_eq!(NodeContext::with_node("node-a", o.node("node-a")), ctx());
    assert_eq!(
        NodeContext::with_node("node-x", None),
        NodeContext::new("node-x", None)
    );
    assert_eq!(
        NodeContext::from_node(&o.nodes[2]).unwrap_err().to_string(),
        "Node : metadata.name: missing"
    );
}

#[test]
fn fixture_manifest_end_to_end() {
    let text = include_str!("../../../tests/fixtures/cluster.yaml");
    let o = parse_fixture(text);
    let node = o.node("node-a").unwrap();
    let ctx = NodeContext::from_node(node).unwrap();
    let out = desired_state(&ctx, &o.services, &o.endpoint_slices);
    assert!(out.errors.is_empty(), "{:?}", errors(&out));
    let mut summary = BTreeMap::new();
    for (name, p) in &out.state.services {
        summary.insert(
            name.to_string(),
            (fes(p), eps(&p.backends), eps(&p.local_backends), p.flags),
        );
    }
    let want: Summary<'_> = [
        (
            "default/web:http/TCP",
            (
                vec![
                    "cip 10.96.0.10:80/TCP",
                    "np *:30080/TCP",
                    "lb 198.51.100.10:80/TCP",
                ],
                vec!["10.244.1.5:8080 L", "10.244.2.7:8080"],
                vec!["10.244.1.5:8080 L"],
                sf::EXTERNAL_LOCAL | sf::AFFINITY,
            ),
        ),
        (
            "kube-system/kube-dns:dns/UDP",
            (
                vec!["cip 10.96.0.53:53/UDP"],
                vec!["10.244.2.3:53"],
                vec![],
                0,
            ),
        ),
        (
            "kube-system/kube-dns:dns-tcp/TCP",
            (
                vec!["cip 10.96.0.53:53/TCP"],
                vec!["10.244.2.3:53"],
                vec![],
                0,
            ),
        ),
    ]
    .into_iter()
    .map(|(k, (a, b, c, f))| (k.to_string(), (a, b, c, f)))
    .collect();
    let summary: Summary<'_> = summary
        .iter()
        .map(|(k, (a, b, c, f))| {
            (
                k.clone(),
                (
                    a.iter().map(String::as_str).collect(),
                    b.iter().map(String::as_str).collect(),
                    c.iter().map(String::as_str).collect(),
                    *f,
                ),
            )
        })
        .collect();
    assert_eq!(summary, want);
    assert_eq!(out.health_checks.len(), 1);
    assert_eq!(out.health_checks[0].local_endpoints, 1);
    // And it programs cleanly.
    let mut planner = crate::plan::Planner::default();
    let plan = planner
        .plan(&out.state, &Default::default(), crate::plan::Scope::Full)
        .unwrap();
    assert!(plan.errors.is_empty());
    assert_eq!(plan.service_changes, 3);
    let web = &out.state.services[&spn("web", "http", TCP)];
    assert!(web.frontends.contains(&Frontend {
        kind: FrontendKind::LoadBalancer,
        addr: Some("198.51.100.10".parse().unwrap()),
        port: 80,
        protocol: TCP,
    }));
}
