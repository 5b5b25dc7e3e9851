//! `cargo xtask demo`: an emulated two-node cluster in network namespaces, one
//! lb-agent per node running the bundled examples/demo.yaml, real HTTP requests
//! from a pod to the ClusterIP and from an external client to the NodePort, and
//! a table of which backend answered and which source address it saw.
//!
//! Everything lives in network namespaces, a temp directory and a pin
//! directory under /sys/fs/bpf, and is removed at the end (also on failure).
//! Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lb_tests::topology::{Frontend, Reply, Topology, EXTERNAL_IP};

/// The bundled manifest; its pod addresses match the topology built below.
const DEMO_YAML: &str = include_str!("../../../examples/demo.yaml");
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const REQUESTS_PER_PATH: usize = 5;

fn main() -> ExitCode {
    if !lb_tests::privilege::have_privileges() {
        eprintln!("lb-demo needs root (BPF, network namespaces) and /sys/kernel/btf/vmlinux");
        return ExitCode::FAILURE;
    }
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    println!(
        "building the topology: node1 (client, web-a), node2 (web-b, web-c), an external client"
    );
    let t = Topology::builder()
        .node("node1", &["client", "web-a"])
        .node("node2", &["web-b", "web-c"])
        .build()?;
    let result = run(&t);
    if result.is_err() {
        eprintln!("{}", t.diagnostics());
    }
    println!("\nremoving the topology");
    drop(t);
    result
}

struct Row {
    path: String,
    result: Result<Reply>,
}

fn run(t: &Topology) -> Result<()> {
    // The manifest's addresses must be the topology's.
    for pod in ["web-a", "web-b", "web-c"] {
        let ip = t.pod(pod).ip.to_string();
        if !DEMO_YAML.contains(&format!("- {ip}\n")) {
            bail!("examples/demo.yaml has no endpoint {ip} for {pod}");
        }
    }
    for pod in ["web-a", "web-b", "web-c"] {
        t.spawn_backend(pod, &["http:8080"])?;
    }
    println!("backends: web-a {}, web-b {}, web-c {} (python http servers on :8080 that name themselves and the peer they see)",
        t.pod("web-a").ip, t.pod("web-b").ip, t.pod("web-c").ip);

    t.start_agents(DEMO_YAML)?;
    let backends: Vec<SocketAddrV4> = ["web-a", "web-b", "web-c"]
        .iter()
        .map(|p| SocketAddrV4::new(t.pod(p).ip, 8080))
        .collect();
    t.wait_for_backends_everywhere(&Frontend::tcp(CLUSTER_IP, 80), &backends)
        .context("waiting for the agents")?;
    t.wait_for_backends_everywhere(&Frontend::node_port(NODE_PORT, "TCP"), &backends)
        .context("waiting for the agents")?;
    println!("agents running on node1 and node2 (manifest examples/demo.yaml)");

    let node1 = t.node("node1").address;
    let paths = [
        (
            "client",
            format!("client pod -> ClusterIP {CLUSTER_IP}:80"),
            format!("http://{CLUSTER_IP}/"),
        ),
        (
            "ext",
            format!("external -> NodePort {node1}:{NODE_PORT}"),
            format!("http://{node1}:{NODE_PORT}/"),
        ),
    ];
    let mut rows = Vec::new();
    for (who, path, url) in &paths {
        // The first flow may race the attachment of the programs: retry it.
        let first = t.request_eventually(who, url, Duration::from_secs(10));
        rows.push(Row {
            path: path.clone(),
            result: first,
        });
        for _ in 1..REQUESTS_PER_PATH {
            rows.push(Row {
                path: path.clone(),
                result: t.request(who, url),
            });
        }
    }

    let client = t.pod("client").ip;
    println!();
    println!(
        "{:>3}  {:<40}  {:<7}  {:<21}  note",
        "#", "path", "backend", "source seen by backend"
    );
    let mut failed = 0;
    for (i, row) in rows.iter().enumerate() {
        match &row.result {
            Ok(r) => {
                let seen = *r.client.ip();
                let note = if seen == client {
                    "client pod IP kept (no SNAT)".to_string()
                } else if seen == EXTERNAL_IP {
                    "external client IP kept (externalTrafficPolicy: Local)".to_string()
                } else if let Some(n) = t.nodes().iter().find(|n| n.address == seen) {
                    format!("SNAT to {} (externalTrafficPolicy: Cluster)", n.name)
                } else {
                    String::new()
                };
                println!(
                    "{:>3}  {:<40}  {:<7}  {:<21}  {note}",
                    i + 1,
                    row.path,
                    r.backend,
                    r.client.to_string()
                );
            }
            Err(e) => {
                failed += 1;
                println!("{:>3}  {:<40}  FAILED: {e:#}", i + 1, row.path);
            }
        }
    }

    for n in ["node1", "node2"] {
        println!("\n$ lbctl services   # on {n}");
        print!("{}", t.lbctl(n, &["services"])?);
    }
    if failed > 0 {
        bail!("{failed} of {} requests failed", rows.len());
    }
    println!("\n{} requests answered", rows.len());
    Ok(())
}
