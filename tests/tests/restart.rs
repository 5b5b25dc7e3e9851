//! Restart and upgrade under load: 200 long-lived TCP connections through a
//! ClusterIP and 50 through a NodePort, each exchanging a line every 0.5 s,
//! and a loop of new connections (10/s to each). The agent of the node
//! they go through is killed with SIGKILL, stopped with SIGTERM, and stopped
//! while the Services change, and started again each time: not one new
//! connection may fail and not one long-lived connection may break.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::objects::{
    endpoint_slice, manifest, service, Endpoint, Object, ServicePort, ServiceType,
};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);
const NEW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 11);
const NODE_PORT: u16 = 30907;

/// The load: `load.py SECONDS TARGET...`, TARGET = `long:IP:PORT:N` (N
/// connections that each send a line every 0.5 s and wait for its echo;
/// one that errs, times out or closes counts as broken and is not
/// reopened) or `new:IP:PORT:RATE` (RATE connections per second, each one
/// line and its echo). Prints one JSON summary line at the end.
const LOAD_PY: &str = r#"
import asyncio, json, sys, time

async def exchange(reader, writer, line):
    writer.write(line.encode())
    await writer.drain()
    reply = await asyncio.wait_for(reader.readline(), 3)
    if not reply:
        raise ConnectionError("closed")

async def long_lived(ip, port, until, stats, i):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 3)
    except Exception as e:
        stats["open_failed"] += 1
        stats["errors"].append(f"open {i}: {e!r}")
        return
    n = 0
    try:
        while time.monotonic() < until:
            await exchange(reader, writer, f"long {i} {n}\n")
            stats["exchanges"] += 1
            n += 1
            await asyncio.sleep(0.5)
    except Exception as e:
        stats["broken"] += 1
        stats["errors"].append(f"long {i} after {n}: {e!r}")
    finally:
        writer.close()

async def one_new(ip, port, stats, i):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 3)
        await exchange(reader, writer, f"new {i}\n")
        writer.close()
        stats["ok"] += 1
    except Exception as e:
        stats["failed"] += 1
        stats["errors"].append(f"new {i}: {e!r}")

async def new_loop(ip, port, rate, until, stats):
    tasks, i = [], 0
    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one_new(ip, port, stats, i)))
        i += 1
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)

async def main():
    seconds = float(sys.argv[1])
    until = time.monotonic() + seconds
    jobs, summary = [], {}
    for t in sys.argv[2:]:
        kind, ip, port, n = t.split(":")
        port, n = int(port), int(n)
        if kind == "long":
            s = {"connections": n, "exchanges": 0, "broken": 0, "open_failed": 0, "errors": []}
            jobs += [long_lived(ip, port, until, s, i) for i in range(n)]
        else:
            s = {"attempts_per_s": n, "ok": 0, "failed": 0, "errors": []}
            jobs.append(new_loop(ip, port, n, until, s))
        summary[t] = s
    print("started", flush=True)
    await asyncio.gather(*jobs)
    for s in summary.values():
        s["errors"] = s["errors"][:10]
    print(json.dumps(summary), flush=True)

asyncio.run(main())
"#;

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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = t.log(name);
        if log.matches(needle).count() > after {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never logged {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

    let script = t.dir().join("load.py");
    std::fs::write(&script, LOAD_PY).unwrap();
    let script = script.to_string_lossy().into_owned();
    let seconds = "40";
    let vip = format!("{VIP}:9000");
    let np = format!("{node1}:{NODE_PORT}");
    t.spawn(
        "client1",
        "load-pods",
        &[
            "python3",
            &script,
            seconds,
            &format!("long:{vip}:200"),
            &format!("new:{vip}:10"),
        ],
    )
    .unwrap();
    t.spawn(
        "ext",
        "load-ext",
        &[
            "python3",
            &script,
            seconds,
            &format!("long:{np}:50"),
            &format!("new:{np}:10"),
        ],
    )
    .unwrap();
    for name in ["load-pods", "load-ext"] {
        wait_for_log(&t, name, "started", 0);
    }
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut summaries = Vec::new();
    for name in ["load-pods", "load-ext"] {
        let line = loop {
            let log = t.log(name);
            if let Some(l) = log.lines().find(|l| l.starts_with('{')) {
                break l.to_string();
            }
            assert!(Instant::now() < deadline, "{name} never finished:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        summaries.push((name, v));
    }
    for (name, v) in &summaries {
        println!("{name}: {v}");
        for (target, s) in v.as_object().unwrap() {
            let count = |k: &str| s.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            if target.starts_with("long") {
                assert_eq!(
                    (count("broken"), count("open_failed")),
                    (0, 0),
                    "{name} {target}: long-lived connections broke: {s}"
                );
                // Two exchanges a second each, for most of the run.
                assert!(
                    count("exchanges") > count("connections") * 60,
                    "{name} {target}: {s}"
                );
            } else {
                assert_eq!(
                    count("failed"),
                    0,
                    "{name} {target}: new connections failed: {s}"
                );
                assert!(count("ok") > 300, "{name} {target}: {s}");
            }
        }
    }
}
