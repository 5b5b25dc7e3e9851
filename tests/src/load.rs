//! The load that proves a restart hitless: long-lived TCP connections that
//! each exchange a line every 0.5 s, and a loop of new connections, run by a
//! python script inside a topology's namespaces; then the counts.
//!
//! ```no_run
//! # use lb_tests::{load::Load, topology::Topology};
//! # fn f(t: &Topology) {
//! let load = Load::start(t, 30, &[("client1", "load-pods", &["long:10.96.0.10:9000:200", "new:10.96.0.10:9000:10"])]);
//! // ... restart the agent ...
//! load.finish(t).assert_nothing_broke();
//! # }
//! ```

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::objects::{endpoint_slice, service, Endpoint, Object, ServicePort, ServiceType};
use crate::topology::Topology;

/// `load.py SECONDS TARGET...`, TARGET = `long:IP:PORT:N` (N connections
/// that each send a line every 0.5 s and wait for its echo; one that errs,
/// times out or closes counts as broken and is not reopened) or
/// `new:IP:PORT:RATE` (RATE connections per second, each one line and its
/// echo). The long-lived connections are opened first, 5 ms apart (the
/// python backends listen with a backlog of 5: a burst of hundreds of
/// connects would overflow it and stall some handshakes for seconds, which
/// is not what the test is about), and each exchanges one line; then it
/// prints `started` and runs for SECONDS, then prints one JSON summary
/// line.
pub const LOAD_PY: &str = r#"
import asyncio, json, sys, time

async def exchange(reader, writer, line):
    writer.write(line.encode())
    await writer.drain()
    reply = await asyncio.wait_for(reader.readline(), 3)
    if not reply:
        raise ConnectionError("closed")

async def open_long(ip, port, stats, i):
    await asyncio.sleep(i * 0.005)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 3)
    except Exception as e:
        stats["open_failed"] += 1
        stats["errors"].append(f"open {i}: {e!r}")
        return None
    try:
        await exchange(reader, writer, f"long {i} open\n")
        stats["exchanges"] += 1
    except Exception as e:
        stats["open_failed"] += 1
        stats["errors"].append(f"first exchange {i}: {e!r}")
        writer.close()
        return None
    return reader, writer

async def long_lived(conn, until, stats, i):
    if conn is None:
        return
    reader, writer = conn
    n = 1
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
    targets, summary = [], {}
    for t in sys.argv[2:]:
        kind, ip, port, n = t.split(":")
        port, n = int(port), int(n)
        if kind == "long":
            s = {"connections": n, "exchanges": 0, "broken": 0, "open_failed": 0, "errors": []}
            conns = await asyncio.gather(*[open_long(ip, port, s, i) for i in range(n)])
        else:
            s = {"attempts_per_s": n, "ok": 0, "failed": 0, "errors": []}
            conns = None
        targets.append((kind, ip, port, n, s, conns))
        summary[t] = s
    until = time.monotonic() + seconds
    jobs = []
    for kind, ip, port, n, s, conns in targets:
        if kind == "long":
            jobs += [long_lived(c, until, s, i) for i, c in enumerate(conns)]
        else:
            jobs.append(new_loop(ip, port, n, until, s))
    print("started", flush=True)
    await asyncio.gather(*jobs)
    for s in summary.values():
        s["errors"] = s["errors"][:10]
    print(json.dumps(summary), flush=True)

asyncio.run(main())
"#;

/// A running load: one `load.py` process per (host, name).
pub struct Load {
    seconds: u32,
    names: Vec<String>,
}

/// What the load processes counted, per process and target.
pub struct Summary {
    seconds: u32,
    /// (process name, its JSON summary).
    pub runs: Vec<(String, serde_json::Value)>,
}

impl Load {
    /// Starts `load.py` for `seconds` as each (host, process name, targets)
    /// and waits until every one has started.
    pub fn start(t: &Topology, seconds: u32, runs: &[(&str, &str, &[&str])]) -> Load {
        let script = t.dir().join("load.py");
        std::fs::write(&script, LOAD_PY).expect("writing load.py");
        let script = script.to_string_lossy().into_owned();
        let secs = seconds.to_string();
        for (who, name, targets) in runs {
            let mut argv = vec!["python3", script.as_str(), secs.as_str()];
            argv.extend_from_slice(targets);
            t.spawn(who, name, &argv)
                .unwrap_or_else(|e| panic!("starting {name}: {e:#}"));
        }
        for (_, name, _) in runs {
            wait_for_log(t, name, "started", 0, Duration::from_secs(20));
        }
        Load {
            seconds,
            names: runs.iter().map(|(_, n, _)| n.to_string()).collect(),
        }
    }

    /// Waits for the load to end; its counts.
    pub fn finish(self, t: &Topology) -> Summary {
        let deadline = Instant::now() + Duration::from_secs(u64::from(self.seconds) + 60);
        let mut runs = Vec::new();
        for name in &self.names {
            let line = loop {
                let log = t.log(name);
                if let Some(l) = log.lines().find(|l| l.starts_with('{')) {
                    break l.to_string();
                }
                assert!(Instant::now() < deadline, "{name} never finished:\n{log}");
                std::thread::sleep(Duration::from_millis(200));
            };
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{name} printed {line:?}: {e}"));
            runs.push((name.clone(), v));
        }
        Summary {
            seconds: self.seconds,
            runs,
        }
    }
}

impl Summary {
    /// One line per target, for the test's output.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for (name, v) in &self.runs {
            let _ = writeln!(s, "{name}: {v}");
        }
        s
    }

    /// Not one long-lived connection broke or failed to open, not one new
    /// connection failed; and the load really ran (long-lived connections
    /// exchanged for most of the run, new connections kept coming).
    pub fn assert_nothing_broke(&self) {
        let seconds = u64::from(self.seconds);
        for (name, v) in &self.runs {
            println!("{name}: {v}");
            let targets = v
                .as_object()
                .unwrap_or_else(|| panic!("{name}: not an object: {v}"));
            for (target, s) in targets {
                let count = |k: &str| s.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                if target.starts_with("long") {
                    assert_eq!(
                        (count("broken"), count("open_failed")),
                        (0, 0),
                        "{name} {target}: long-lived connections broke: {s}"
                    );
                    // Two exchanges a second each, for most of the run.
                    assert!(
                        count("exchanges") > count("connections") * seconds * 3 / 2,
                        "{name} {target}: too few exchanges: {s}"
                    );
                } else {
                    assert_eq!(
                        count("failed"),
                        0,
                        "{name} {target}: new connections failed: {s}"
                    );
                    assert!(
                        count("ok") > count("attempts_per_s") * seconds * 3 / 4,
                        "{name} {target}: too few new connections: {s}"
                    );
                }
            }
        }
    }
}

/// Waits until the log of process `name` holds `needle` more than `after`
/// times; the log.
pub fn wait_for_log(
    t: &Topology,
    name: &str,
    needle: &str,
    after: usize,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
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

/// The echo fixture of the attach and cleanup tests: node1 with client1 and
/// web1, node2 with web2; web1 and web2 echo lines on TCP 9000.
pub fn echo_topology() -> Topology {
    let t = Topology::builder()
        .node("node1", &["client1", "web1"])
        .node("node2", &["web2"])
        .build()
        .expect("building the topology");
    for w in ["web1", "web2"] {
        t.spawn_backend(w, &["tcp:9000"])
            .expect("starting the echo backend");
    }
    t
}

/// The echo Service of [`echo_topology`]: ClusterIP `vip` and NodePort
/// `node_port`, TCP 9000, backed by web1 and web2.
pub fn echo_objects(t: &Topology, vip: Ipv4Addr, node_port: u16) -> Vec<Object> {
    let port = ServicePort::tcp("line", 9000, 9000).node_port(node_port);
    vec![
        service("echo", vip)
            .service_type(ServiceType::NodePort)
            .port(port.clone())
            .into(),
        endpoint_slice("echo", "echo-1")
            .ports_of(std::slice::from_ref(&port))
            .endpoints(["web1", "web2"].iter().map(|p| Endpoint::of(t.pod(p))))
            .into(),
    ]
}
