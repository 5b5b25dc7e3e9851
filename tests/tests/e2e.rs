//! End to end: two emulated kubeadm-like nodes (network namespaces), pods on
//! cni0 bridges, an external client on the lan, one `lb-agent` per node with
//! its own pin directory, real servers (python, dnsmasq) and clients (curl,
//! dig, socat). Test names carry the SEMANTICS.md ids they prove.
//!
//! Every test builds its own topology; dropping it removes everything, also
//! when the test fails. Run serially (`cargo xtask test` passes
//! `--test-threads=1`).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lb_tests::objects::{endpoint_slice, manifest, service, Endpoint, ServicePort, ServiceType};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const WARMUP: Duration = Duration::from_secs(10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// node1: client1, web1 (+ extra pods); node2: web2 (+ extra pods); an external client.
fn two_nodes(node1_pods: &[&str], node2_pods: &[&str]) -> Topology {
    Topology::builder()
        .node("node1", node1_pods)
        .node("node2", node2_pods)
        .build()
        .expect("building the topology")
}

/// The topology alone, without lb: pods reach pods on the other node (host-gw
/// routes, br_netfilter and the INVALID drop rule in place), the external
/// client reaches the nodes and nothing else.
#[test]
fn topology_connectivity_without_lb() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let client_ip = t.pod("client1").ip;

    // Same node, bridged on cni0.
    let r = t
        .request("client1", &format!("http://{}:8080/", t.pod("web1").ip))
        .unwrap();
    assert_eq!((r.backend.as_str(), *r.client.ip()), ("web1", client_ip));
    // Other node, routed over the lan.
    let r = t
        .request("client1", &format!("http://{}:8080/", t.pod("web2").ip))
        .unwrap();
    assert_eq!((r.backend.as_str(), *r.client.ip()), ("web2", client_ip));
    // The node setup is kubeadm's.
    let rules = t.sh("node1", "iptables -S FORWARD").unwrap();
    assert!(
        rules.contains("-A FORWARD -m conntrack --ctstate INVALID -j DROP"),
        "{rules}"
    );
    let brnf = t
        .sh("node1", "cat /proc/sys/net/bridge/bridge-nf-call-iptables")
        .unwrap();
    assert_eq!(brnf.trim(), "1");
    // The external client reaches the nodes, not the pods (no route).
    for n in t.nodes() {
        t.exec(
            "ext",
            &["ping", "-c1", "-W2", &n.address.to_string()],
            Duration::from_secs(5),
        )
        .unwrap()
        .ok()
        .unwrap();
    }
    let out = t
        .exec(
            "ext",
            &["ping", "-c1", "-W1", &t.pod("web1").ip.to_string()],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        !out.success(),
        "the external client must not reach pod addresses"
    );
    // No namespace but the pods has a default route.
    for who in ["node1", "node2", "ext", "lan"] {
        let routes = t.sh(who, "ip route show default").unwrap();
        assert!(
            routes.trim().is_empty(),
            "{who} has a default route: {routes}"
        );
    }
}

/// F1: pod -> ClusterIP, DNAT to a backend on the same node and on the other
/// node; the backend sees the client pod's own address (no SNAT). F3: with
/// both backends, 20 requests see both.
#[test]
fn f1_f3_cluster_ip_from_pod_keeps_pod_source_ip() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (web1, web2) = (t.pod("web1"), t.pod("web2"));
    let local_ip = Ipv4Addr::new(10, 96, 0, 11);
    let remote_ip = Ipv4Addr::new(10, 96, 0, 12);
    let both_ip = Ipv4Addr::new(10, 96, 0, 13);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let m = manifest(&[
        service("local", local_ip).ports(&http).into(),
        endpoint_slice("local", "local-1")
            .ports_of(&http)
            .endpoint(Endpoint::of(web1))
            .into(),
        service("remote", remote_ip).ports(&http).into(),
        endpoint_slice("remote", "remote-1")
            .ports_of(&http)
            .endpoint(Endpoint::of(web2))
            .into(),
        service("both", both_ip).ports(&http).into(),
        endpoint_slice("both", "both-1")
            .ports_of(&http)
            .endpoints([Endpoint::of(web1), Endpoint::of(web2)])
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(local_ip, 80), &[sa(web1.ip, 8080)])
        .unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(remote_ip, 80), &[sa(web2.ip, 8080)])
        .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(both_ip, 80),
        &[sa(web1.ip, 8080), sa(web2.ip, 8080)],
    )
    .unwrap();

    let client_ip = t.pod("client1").ip;
    for (ip, want) in [(local_ip, "web1"), (remote_ip, "web2")] {
        let url = format!("http://{ip}/");
        t.request_eventually("client1", &url, WARMUP).unwrap();
        for _ in 0..3 {
            let r = t.request("client1", &url).unwrap();
            assert_eq!(r.backend, want, "{url}: {}", r.raw);
            assert_eq!(
                *r.client.ip(),
                client_ip,
                "F1: the backend must see the client pod's IP: {}",
                r.raw
            );
        }
    }

    let url = format!("http://{both_ip}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = t.request("client1", &url).unwrap();
        assert_eq!(*r.client.ip(), client_ip, "{}", r.raw);
        seen.insert(r.backend);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web1".to_string(), "web2".to_string()]),
        "F3: 20 new flows must reach both backends"
    );
}

/// F4: external client -> NodePort on node1 (externalTrafficPolicy Cluster).
/// M2: the flow is SNATed to node1's address whether the backend is on node1
/// or on node2, as kube-proxy masquerades it, and answers. Nothing listens on
/// the NodePort.
#[test]
fn f4_m2_node_port_from_external_client() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (web1, web2) = (t.pod("web1"), t.pod("web2"));
    let local_port = ServicePort::tcp("http", 80, 8080).node_port(30081);
    let remote_port = ServicePort::tcp("http", 80, 8080).node_port(30082);
    let m = manifest(&[
        service("np-local", Ipv4Addr::new(10, 96, 0, 21))
            .service_type(ServiceType::NodePort)
            .port(local_port.clone())
            .into(),
        endpoint_slice("np-local", "np-local-1")
            .ports_of(&[local_port])
            .endpoint(Endpoint::of(web1))
            .into(),
        service("np-remote", Ipv4Addr::new(10, 96, 0, 22))
            .service_type(ServiceType::NodePort)
            .port(remote_port.clone())
            .into(),
        endpoint_slice("np-remote", "np-remote-1")
            .ports_of(&[remote_port])
            .endpoint(Endpoint::of(web2))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30081, "TCP"),
        &[sa(web1.ip, 8080)],
    )
    .unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::node_port(30082, "TCP"),
        &[sa(web2.ip, 8080)],
    )
    .unwrap();

    let node1 = t.node("node1").address;
    let url = format!("http://{node1}:30081/");
    t.request_eventually("ext", &url, WARMUP).unwrap();
    for _ in 0..3 {
        let r = t.request("ext", &url).unwrap();
        assert_eq!(r.backend, "web1", "{}", r.raw);
        assert_eq!(
            *r.client.ip(),
            node1,
            "M2: with externalTrafficPolicy Cluster even a local backend sees the node's address (kube-proxy masquerades everything that enters KUBE-EXT-*): {}",
            r.raw
        );
    }

    let url = format!("http://{node1}:30082/");
    t.request_eventually("ext", &url, WARMUP).unwrap();
    for _ in 0..3 {
        let r = t.request("ext", &url).unwrap();
        assert_eq!(r.backend, "web2", "{}", r.raw);
        assert_eq!(
            *r.client.ip(),
            node1,
            "M2: a backend on another node sees the NodePort node's address: {}",
            r.raw
        );
    }

    // F4: no socket listens on the NodePorts.
    let listening = t.sh("node1", "ss -Hltn").unwrap();
    assert!(
        !listening.contains(":30081") && !listening.contains(":30082"),
        "F4: nothing may listen on a NodePort:\n{listening}"
    );
}

/// F3 over UDP: dig through a ClusterIP to two dnsmasq backends, one per node;
/// every query answered, both backends seen in 20 queries.
#[test]
fn f3_udp_dns_through_cluster_ip() {
    require_privileges!();
    let t = two_nodes(&["client1", "dns1"], &["dns2"]);
    t.spawn_dns("dns1", 53).unwrap();
    t.spawn_dns("dns2", 53).unwrap();
    let (dns1, dns2) = (t.pod("dns1"), t.pod("dns2"));
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let dns = [
        ServicePort::udp("dns", 53, 53),
        ServicePort::tcp("dns-tcp", 53, 53),
    ];
    let m = manifest(&[
        service("kube-dns", vip).ports(&dns).into(),
        endpoint_slice("kube-dns", "kube-dns-1")
            .ports_of(&dns)
            .endpoints([Endpoint::of(dns1), Endpoint::of(dns2)])
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    let backends = [sa(dns1.ip, 53), sa(dns2.ip, 53)];
    t.wait_for_backends("node1", &Frontend::udp(vip, 53), &backends)
        .unwrap();

    // Warm up: the first answer may race the attachment of the programs.
    let deadline = std::time::Instant::now() + WARMUP;
    while t.dig_whoami("client1", vip, 53, false).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no DNS answer through {vip}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let who = t
            .dig_whoami("client1", vip, 53, false)
            .unwrap_or_else(|e| panic!("query {i}: {e:#}"));
        seen.insert(who);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["dns1".to_string(), "dns2".to_string()]),
        "F3: 20 UDP flows must reach both backends"
    );
    // The TCP port of the same Service works too.
    let who = t.dig_whoami("client1", vip, 53, true).unwrap();
    assert!(who == "dns1" || who == "dns2", "{who}");
}

/// F9: TCP and UDP on the same port number are independent frontends: the TCP
/// port's endpoints (web1) and the UDP port's endpoints (web2) come from two
/// EndpointSlices of one Service.
#[test]
fn f9_tcp_and_udp_on_the_same_port() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["tcp:7000", "udp:7000"]).unwrap();
    t.spawn_backend("web2", &["tcp:7000", "udp:7000"]).unwrap();
    let (web1, web2) = (t.pod("web1"), t.pod("web2"));
    let vip = Ipv4Addr::new(10, 96, 0, 30);
    let (tcp, udp) = (
        ServicePort::tcp("echo-tcp", 7000, 7000),
        ServicePort::udp("echo-udp", 7000, 7000),
    );
    let m = manifest(&[
        service("echo", vip)
            .ports(&[tcp.clone(), udp.clone()])
            .into(),
        // One slice per port, with different endpoints.
        endpoint_slice("echo", "echo-tcp")
            .ports_of(&[tcp])
            .endpoint(Endpoint::of(web1))
            .into(),
        endpoint_slice("echo", "echo-udp")
            .ports_of(&[udp])
            .endpoint(Endpoint::of(web2))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(vip, 7000), &[sa(web1.ip, 7000)])
        .unwrap();
    t.wait_for_backends("node1", &Frontend::udp(vip, 7000), &[sa(web2.ip, 7000)])
        .unwrap();

    let target = sa(vip, 7000);
    let client_ip = t.pod("client1").ip;
    let deadline = std::time::Instant::now() + WARMUP;
    while t.socat_line("client1", "tcp", target, "warmup").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no TCP answer through {target}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..3 {
        let r = t
            .socat_line("client1", "tcp", target, &format!("tcp{i}"))
            .unwrap();
        assert_eq!(
            (r.backend.as_str(), r.proto.as_str()),
            ("web1", "tcp"),
            "{}",
            r.raw
        );
        assert_eq!(*r.client.ip(), client_ip);
        let r = t
            .socat_line("client1", "udp", target, &format!("udp{i}"))
            .unwrap();
        assert_eq!(
            (r.backend.as_str(), r.proto.as_str()),
            ("web2", "udp"),
            "{}",
            r.raw
        );
        assert_eq!(*r.client.ip(), client_ip);
    }
}

/// The agent applies a manifest edit (one endpoint removed, one added) without
/// a restart, and an established TCP connection to a surviving backend keeps
/// working across the edit.
#[test]
fn manifest_edit_applies_live_and_keeps_open_connections() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2", "web3"]);
    for w in ["web1", "web2", "web3"] {
        t.spawn_backend(w, &["http:8080", "tcp:9000"]).unwrap();
    }
    let vip = Ipv4Addr::new(10, 96, 0, 40);
    let ports = [
        ServicePort::tcp("http", 80, 8080),
        ServicePort::tcp("line", 9000, 9000),
    ];
    let with = |pods: &[&str]| {
        manifest(&[
            service("web", vip).ports(&ports).into(),
            endpoint_slice("web", "web-1")
                .ports_of(&ports)
                .endpoints(pods.iter().map(|p| Endpoint::of(t.pod(p))))
                .into(),
        ])
    };
    let addrs = |pods: &[&str], port: u16| -> Vec<SocketAddrV4> {
        pods.iter().map(|p| sa(t.pod(p).ip, port)).collect()
    };
    t.start_agents(&with(&["web1", "web2"])).unwrap();
    t.wait_for_backends_everywhere(&Frontend::tcp(vip, 9000), &addrs(&["web1", "web2"], 9000))
        .unwrap();
    t.request_eventually("client1", &format!("http://{vip}/"), WARMUP)
        .unwrap();

    // A long-lived connection; whichever backend it reached survives the edit.
    let mut conn = t.connect("client1", sa(vip, 9000)).unwrap();
    let before = conn.send("before").unwrap();
    let keep = before.backend.clone();
    let gone = if keep == "web1" { "web2" } else { "web1" };
    let after_set = [keep.as_str(), "web3"];

    t.write_manifests(&with(&after_set)).unwrap();
    t.wait_for_backends_everywhere(&Frontend::tcp(vip, 9000), &addrs(&after_set, 9000))
        .unwrap();
    t.wait_for_backends_everywhere(&Frontend::tcp(vip, 80), &addrs(&after_set, 8080))
        .unwrap();

    let after = conn.send("after").unwrap();
    assert_eq!(
        after.backend, keep,
        "the open connection moved: {}",
        after.raw
    );
    assert_eq!(
        after.client, before.client,
        "the open connection is a different flow now"
    );
    t.check_running("agent-node1").unwrap();

    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = t.request("client1", &format!("http://{vip}/")).unwrap();
        assert_ne!(r.backend, gone, "a removed endpoint still gets new flows");
        seen.insert(r.backend);
    }
    assert!(
        seen.contains("web3"),
        "the added endpoint gets no flows: {seen:?}"
    );
    let r = conn.send("still").unwrap();
    assert_eq!(r.backend, keep);
}

/// F5: an externalIP that no node owns works from a pod (the DNAT happens at
/// the pod's interface; client pod IP kept) and from the external client
/// routed to node1 when the backend is on node1 (client IP kept).
#[test]
fn f5_external_ip_from_pod_and_external_client() {
    require_privileges!();
    let t = two_nodes(&["client1", "web1"], &["web2"]);
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (web1, web2) = (t.pod("web1"), t.pod("web2"));
    let both_ip = Ipv4Addr::new(203, 0, 113, 10);
    let local_ip = Ipv4Addr::new(203, 0, 113, 11);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let m = manifest(&[
        service("ext-both", Ipv4Addr::new(10, 96, 0, 50))
            .ports(&http)
            .external_ip(both_ip)
            .into(),
        endpoint_slice("ext-both", "ext-both-1")
            .ports_of(&http)
            .endpoints([Endpoint::of(web1), Endpoint::of(web2)])
            .into(),
        service("ext-local", Ipv4Addr::new(10, 96, 0, 51))
            .ports(&http)
            .external_ip(local_ip)
            .into(),
        endpoint_slice("ext-local", "ext-local-1")
            .ports_of(&http)
            .endpoint(Endpoint::of(web1))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(both_ip, 80),
        &[sa(web1.ip, 8080), sa(web2.ip, 8080)],
    )
    .unwrap();
    t.wait_for_backends("node1", &Frontend::tcp(local_ip, 80), &[sa(web1.ip, 8080)])
        .unwrap();

    let client_ip = t.pod("client1").ip;
    let url = format!("http://{both_ip}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let r = t.request("client1", &url).unwrap();
        assert_eq!(*r.client.ip(), client_ip, "{}", r.raw);
        seen.insert(r.backend);
    }
    assert!(seen.iter().all(|b| b == "web1" || b == "web2"), "{seen:?}");

    // The external client's route to the external IP points at node1 (as a
    // router in front of the cluster would); it stays inside the topology.
    t.add_route("ext", &format!("{local_ip}/32"), t.node("node1").address)
        .unwrap();
    let url = format!("http://{local_ip}/");
    t.request_eventually("ext", &url, WARMUP).unwrap();
    for _ in 0..3 {
        let r = t.request("ext", &url).unwrap();
        assert_eq!(r.backend, "web1", "{}", r.raw);
        // M2: externalTrafficPolicy Cluster: SNAT to the uplink's address,
        // also to a local backend.
        assert_eq!(*r.client.ip(), t.node("node1").address, "{}", r.raw);
    }
}

/// M2 for externalIPs: external client -> externalIP routed to node1, the only
/// backend on node2: the flow is SNATed to node1's address, so the reply comes
/// back through node1.
#[test]
fn m2_external_ip_remote_backend_snat_to_node() {
    require_privileges!();
    let t = two_nodes(&["web1"], &["web2"]);
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let web2 = t.pod("web2");
    let external_ip = Ipv4Addr::new(203, 0, 113, 12);
    let http = [ServicePort::tcp("http", 80, 8080)];
    let m = manifest(&[
        service("ext-remote", Ipv4Addr::new(10, 96, 0, 52))
            .ports(&http)
            .external_ip(external_ip)
            .into(),
        endpoint_slice("ext-remote", "ext-remote-1")
            .ports_of(&http)
            .endpoint(Endpoint::of(web2))
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    t.wait_for_backends(
        "node1",
        &Frontend::tcp(external_ip, 80),
        &[sa(web2.ip, 8080)],
    )
    .unwrap();
    let node1 = t.node("node1").address;
    t.add_route("ext", &format!("{external_ip}/32"), node1)
        .unwrap();
    let url = format!("http://{external_ip}/");
    t.request_eventually("ext", &url, WARMUP).unwrap();
    for _ in 0..3 {
        let r = t.request("ext", &url).unwrap();
        assert_eq!(r.backend, "web2", "{}", r.raw);
        assert_eq!(*r.client.ip(), node1, "M2: SNAT to the node: {}", r.raw);
    }
}
