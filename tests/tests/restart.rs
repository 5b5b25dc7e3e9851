//! Restart and upgrade under load: 200 long-lived TCP connections through a
//! ClusterIP and 50 through a NodePort, each exchanging a line every 0.5 s,
//! and a loop of new connections (10/s to each). The agent of the node
//! they go through is killed with SIGKILL, stopped with SIGTERM, and stopped
//! while the Services change, and started again each time: not one new
//! connection may fail and not one long-lived connection may break.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use lb_tests::load::{self, Load};
use lb_tests::objects::{
    endpoint_slice, manifest, service, Endpoint, Object, ServicePort, ServiceType,
};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);
const NEW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 11);
const NODE_PORT: u16 = 30907;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn objects(t: &Topology, backends: &[&str], with_new: bool) -> Vec<Object> {
    let port = ServicePort::tcp("line", 9000, 9000).node_port(NODE_PORT);
    let mut o: Vec<Object> = vec![
        service("echo", VIP)
            .service_type(ServiceType::NodePort)
            .port(port.clone())
            .into(),
        endpoint_slice("echo", "echo-1")
            .ports_of(std::slice::from_ref(&port))
            .endpoints(backends.iter().map(|p| Endpoint::of(t.pod(p))))
            .into(),
    ];
    if with_new {
        let p = ServicePort::tcp("line", 9000, 9000);
        o.push(service("later", NEW_VIP).port(p.clone()).into());
        o.push(
            endpoint_slice("later", "later-1")
                .ports_of(&[p])
                .endpoint(Endpoint::of(t.pod("web1")))
                .into(),
        );
    }
    o
}

/// SIGKILL for the agent of `node` (found by its pin directory).
fn kill_agent(t: &Topology, node: &str) {
    let dir = t.node(node).bpffs.to_string_lossy().into_owned();
    let out = Command::new("pkill")
        .args(["-KILL", "-f", &format!("lb-agent.*--bpffs {dir}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "no agent of {node} to kill");
}

fn wait_for_log(t: &Topology, name: &str, needle: &str, after: usize) -> String {
    load::wait_for_log(t, name, needle, after, Duration::from_secs(20))
}

#[test]
fn restart_under_load_kill_term_and_changes_while_down() {
    require_privileges!();
    let t = Topology::builder()
        .node("node1", &["client1", "web1", "web2"])
        .node("node2", &["web3"])
        .build()
        .expect("building the topology");
    for w in ["web1", "web2", "web3"] {
        t.spawn_backend(w, &["tcp:9000"]).unwrap();
    }
    t.start_agents(&manifest(&objects(&t, &["web1", "web2", "web3"], false)))
        .unwrap();
    let all = [
        sa(t.pod("web1").ip, 9000),
        sa(t.pod("web2").ip, 9000),
        sa(t.pod("web3").ip, 9000),
    ];
    t.wait_for_backends_everywhere(&Frontend::tcp(VIP, 9000), &all)
        .unwrap();
    t.wait_for_backends_everywhere(&Frontend::node_port(NODE_PORT, "TCP"), &all)
        .unwrap();
    let node1 = t.node("node1").address;
    // Warm up both paths once.
    t.socat_line("client1", "tcp", sa(VIP, 9000), "hello")
        .unwrap();
    t.socat_line("ext", "tcp", sa(node1, NODE_PORT), "hello")
        .unwrap();

    let vip = format!("long:{VIP}:9000:200");
    let vip_new = format!("new:{VIP}:9000:10");
    let np = format!("long:{node1}:{NODE_PORT}:50");
    let np_new = format!("new:{node1}:{NODE_PORT}:10");
    let load = Load::start(
        &t,
        40,
        &[
            ("client1", "load-pods", &[&vip, &vip_new]),
            ("ext", "load-ext", &[&np, &np_new]),
        ],
    );
    std::thread::sleep(Duration::from_secs(4));

    // 1. SIGKILL, 3 s without an agent, start again.
    kill_agent(&t, "node1");
    std::thread::sleep(Duration::from_secs(3));
    t.start_agent("node1", &[]).unwrap();
    wait_for_log(&t, "agent-node1", "lb-agent ready", 0);
    std::thread::sleep(Duration::from_secs(4));

    // 2. SIGTERM, 3 s without an agent, start again.
    t.stop_agent("node1").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    t.start_agent("node1", &[]).unwrap();
    wait_for_log(&t, "agent-node1", "lb-agent ready", 0);
    std::thread::sleep(Duration::from_secs(4));

    // 3. Stopped while a Service is added: the next agent writes exactly
    // the difference (the new Service's frontend, backend, slot and name).
    t.stop_agent("node1").unwrap();
    t.write_manifests(&manifest(&objects(&t, &["web1", "web2", "web3"], true)))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    t.start_agent("node1", &[]).unwrap();
    let log = wait_for_log(&t, "agent-node1", "lb-agent ready", 0);
    let first = log
        .lines()
        .find(|l| l.contains("maps updated") && l.contains("scope=\"full\""))
        .unwrap_or_default()
        .to_string();
    let writes: usize = first
        .split("map_writes=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    // Frontend, backend, one slot per set, name.
    assert!(
        writes <= 5,
        "the restarted agent must write only the new Service: {first}\n{log}"
    );
    t.wait_for_backends("node1", &Frontend::tcp(NEW_VIP, 9000), &all[..1])
        .unwrap();

    // The load runs to its end; then count.
    load.finish(&t).assert_nothing_broke();
}
