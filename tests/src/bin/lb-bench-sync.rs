//! lb-bench-sync: the agent's control plane at scale, in cluster mode.
//!
//! A fake API server holds N Services with E endpoints each (default 10,000 x
//! 10). The real `lb-agent` binary starts against it (its own network
//! namespace and pin directory) and we measure:
//! - initial programming: from the agent's start until every ClusterIP
//!   frontend is in the pinned LB_SERVICES map (target < 1 s);
//! - single endpoint changes under that load: an EndpointSlice loses or
//!   regains one endpoint on the API server; latency from the server emitting
//!   the watch event until the new backend count is visible in the map
//!   (p50 and p99; target p99 < 10 ms);
//! - the agent's resident memory (VmRSS and its peak VmHWM; target < 120 MiB);
//! - the agent's own kubeproxy_network_programming_duration_seconds.
//!
//! Targets are reported (PASS/OVER), never asserted: the machine is noisy.
//! Usage: lb-bench-sync [--services N] [--endpoints E] [--changes C]
//! Needs root and the release lb-agent (cargo xtask bench builds it).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_common::{ipv4_to_net, map_names, port_to_net, ServiceKey, ServiceValue, PROTO_TCP};
use lb_tests::artifacts;
use lb_tests::netns::{bind_in_netns, NamedNetns};
use lb_tests::objects::{endpoint_slice, service, Endpoint, Protocol, ServicePort};

const INITIAL_TARGET: Duration = Duration::from_secs(1);
const P99_TARGET: Duration = Duration::from_millis(10);
const RSS_TARGET_MIB: f64 = 120.0;

struct Opts {
    services: u32,
    endpoints: u32,
    changes: u32,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        services: 10_000,
        endpoints: 10,
        changes: 300,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args
            .get(i + 1)
            .with_context(|| format!("{} needs a value", args[i]))?;
        match args[i].as_str() {
            "--services" => o.services = v.parse()?,
            "--endpoints" => o.endpoints = v.parse()?,
            "--changes" => o.changes = v.parse()?,
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    if o.services == 0 || o.services > 60_000 || o.endpoints == 0 || o.endpoints > 100 {
        bail!("--services 1..=60000, --endpoints 1..=100");
    }
    Ok(o)
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1)
}

fn endpoint_ip(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 100 + e + 1)
}

/// The namespace of every benchmark object.
const NAMESPACE: &str = "bench";

fn service_name(i: u32) -> String {
    format!("svc-{i}")
}

fn bench_service(i: u32) -> Service {
    service(&service_name(i), cluster_ip(i))
        .namespace(NAMESPACE)
        .port(ServicePort::tcp("http", 80, 8080))
        .build()
}

/// The node of endpoint `e` of a Service: every other one is on the
/// benchmarked node.
fn endpoint_node(e: u32) -> &'static str {
    if e.is_multiple_of(2) {
        "bench-node"
    } else {
        "other-node"
    }
}

/// The EndpointSlice of Service `i` with `endpoints` endpoints.
fn bench_slice(i: u32, endpoints: u32) -> EndpointSlice {
    endpoint_slice(&service_name(i), &format!("svc-{i}-abcde"))
        .namespace(NAMESPACE)
        .port("http", Protocol::Tcp, 8080)
        .endpoints((0..endpoints).map(|e| Endpoint::new(endpoint_ip(i, e), endpoint_node(e))))
        .build()
}

fn key(i: u32) -> ServiceKey {
    ServiceKey {
        addr: ipv4_to_net(cluster_ip(i).octets()),
        port: port_to_net(80),
        proto: PROTO_TCP,
        scope: 0,
    }
}

/// Everything the bench creates, removed on drop (also on error): the
/// agent, its pinned state, the namespace and the temp directory.
struct Env {
    netns: NamedNetns,
    bpffs: PathBuf,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Env {
    fn new() -> Result<Self> {
        lb_tests::privilege::ensure_bpffs().context("mounting bpffs")?;
        let pid = std::process::id();
        let env = Env {
            netns: NamedNetns::create(&format!("lbbench{pid}"))?,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/lbbench{pid}")),
            dir: std::env::temp_dir().join(format!("lbbench{pid}")),
            agent: None,
        };
        std::fs::create_dir_all(&env.dir)?;
        Ok(env)
    }

    fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }
}

impl Drop for Env {
    /// The namespace goes after this, with the `netns` field.
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while a.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = Command::new(artifacts::lb_agent_bin())
            .args(["--cleanup", "--bpffs"])
            .arg(&self.bpffs)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn services_map(bpffs: &std::path::Path) -> Result<HashMap<MapData, ServiceKey, ServiceValue>> {
    let data = MapData::from_pin(bpffs.join(map_names::SERVICES))?;
    Ok(HashMap::try_from(Map::from_map_data(data)?)?)
}

fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "OVER"
    }
}

fn main() -> Result<()> {
    let o = parse_opts()?;
    if !lb_tests::privilege::have_privileges() {
        bail!("lb-bench-sync needs root (BPF, network namespaces)");
    }
    let agent_bin = artifacts::lb_agent_bin();
    if !agent_bin.exists() {
        bail!(
            "{} is missing: run `cargo xtask build` (cargo xtask bench does)",
            agent_bin.display()
        );
    }
    let mut env = Env::new()?;
    let listener = bind_in_netns(
        Some(env.netns.name()),
        SocketAddr::from(([127, 0, 0, 1], 6443)),
    );
    let server = FakeApiServer::start(listener);
    let kubeconfig = server.write_kubeconfig(&env.dir);

    let t = Instant::now();
    for i in 0..o.services {
        server.apply(&bench_service(i));
        server.apply(&bench_slice(i, o.endpoints));
    }
    server.compact();
    println!(
        "API server: {} Services x {} endpoints loaded in {:.1?}",
        o.services,
        o.endpoints,
        t.elapsed()
    );

    // Initial programming.
    let log = std::fs::File::create(env.dir.join("agent.log"))?;
    let net = format!("--net=/run/netns/{}", env.netns.name());
    let started = Instant::now();
    let child = Command::new("nsenter")
        .arg(&net)
        .arg("--")
        .arg(&agent_bin)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", "bench-node", "--bpffs"])
        .arg(&env.bpffs)
        .args([
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting lb-agent")?;
    env.agent = Some(child);
    let pid = env.agent_pid().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let initial = loop {
        if let Some(a) = env.agent.as_mut() {
            if let Some(st) = a.try_wait()? {
                let log = std::fs::read_to_string(env.dir.join("agent.log")).unwrap_or_default();
                bail!("lb-agent exited ({st}):\n{log}");
            }
        }
        if let Ok(m) = services_map(&env.bpffs) {
            // The last Service programmed means all of them are (one plan).
            if m.get(&key(o.services - 1), 0).is_ok() && m.keys().count() >= o.services as usize {
                break started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!("the agent did not program {} services in 120 s", o.services);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let rss_initial = status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0;

    // Single endpoint changes: drop the last endpoint of a Service, or give
    // it back; wait for the count in the map.
    let map = services_map(&env.bpffs)?;
    let mut latencies = Vec::with_capacity(o.changes as usize);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut shrunk = std::collections::BTreeSet::new();
    for _ in 0..o.changes {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = (rng % u64::from(o.services)) as u32;
        let want = if shrunk.remove(&i) {
            o.endpoints
        } else {
            shrunk.insert(i);
            o.endpoints - 1
        };
        let obj = bench_slice(i, want);
        let t0 = Instant::now();
        server.apply(&obj);
        loop {
            if map
                .get(&key(i), 0)
                .is_ok_and(|v| u32::from(v.backend_count) == want)
            {
                latencies.push(t0.elapsed());
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change of svc-{i} not programmed within 10 s");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        // Spread the changes a little, as real churn is.
        std::thread::sleep(Duration::from_millis(2));
    }
    latencies.sort();
    let rss = status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0;
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0.0) / 1024.0;
    let metrics = Command::new("ip")
        .args(["netns", "exec", env.netns.name(), "curl", "-s"])
        .arg("http://127.0.0.1:10249/metrics")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let metric = |name: &str| -> String {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("?")
            .to_string()
    };

    let agent_log = std::fs::read_to_string(env.dir.join("agent.log")).unwrap_or_default();
    if std::env::var_os("LB_BENCH_VERBOSE").is_some() {
        eprintln!("{agent_log}");
    }
    let initial_plan = agent_log
        .lines()
        .find(|l| l.contains("maps updated") && l.contains("scope=\"full\""))
        .unwrap_or("")
        .to_string();
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    println!();
    println!(
        "lb-agent, cluster mode, {} Services x {} endpoints (fake API server over HTTP)",
        o.services, o.endpoints
    );
    println!(
        "  initial programming (start -> all frontends in the maps): {:>8.0} ms  target < {} ms  {}",
        initial.as_secs_f64() * 1e3,
        INITIAL_TARGET.as_millis(),
        verdict(initial < INITIAL_TARGET)
    );
    if let Some(i) = initial_plan.find("map_writes") {
        println!("    agent: {}", &initial_plan[i..]);
    }
    println!(
        "  single endpoint change, watch event -> map write ({} changes):",
        latencies.len()
    );
    println!(
        "    p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>6.2} ms   target p99 < {} ms  {}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        P99_TARGET.as_millis(),
        verdict(p99 < P99_TARGET)
    );
    println!(
        "  agent resident memory: {rss:.0} MiB now, {rss_initial:.0} MiB after the initial list, peak {hwm:.0} MiB  target < {RSS_TARGET_MIB:.0} MiB  {}",
        verdict(hwm < RSS_TARGET_MIB)
    );
    println!(
        "  agent's kubeproxy_network_programming_duration_seconds: count {} sum {} s",
        metric("kubeproxy_network_programming_duration_seconds_count"),
        metric("kubeproxy_network_programming_duration_seconds_sum")
    );
    Ok(())
}
