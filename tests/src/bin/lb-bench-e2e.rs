//! lb-bench-e2e: lb end to end against kube-proxy's iptables and nftables
//! layouts and against no service proxy, side by side in the netns
//! topology, in one run.
//!
//! Beds (one topology each, built side by side): `lb` (the real agent in
//! manifest mode), `iptables` and `nftables` (kube-proxy's layouts,
//! generated from the same Service list and loaded with iptables-restore /
//! nft -f), each with 1, 1,000 and 10,000 Services, and `direct` (the
//! client connects to the backends: the limit of the topology). See
//! `tests/src/bench/e2e.rs` for the layout.
//!
//! 1. Connection rate: a client pod opens one new TCP connection per HTTP
//!    GET to a ClusterIP backed by 3 nginx pods (2 on its node, 1 on the
//!    other); per bed the median connections/s, p50/p99 latency and the
//!    whole machine's CPU time per connection, measured in interleaved
//!    rounds; per-round ratios lb/iptables, lb/nftables, lb/direct and
//!    lb(10,000)/lb(1) against their targets.
//! 2. NodePort packet rate: UDP from the external namespace to a NodePort
//!    (AF_PACKET generator), delivered packets counted on the backends'
//!    interfaces: lb's TC path against the iptables layout (nftables and
//!    direct for information; lb's XDP path has a slot, not implemented).
//!
//! Targets are reported (PASS/OVER), never asserted. Everything runs in
//! namespaces the bench creates and removes (also on failure or Ctrl-C).
//!
//! Usage: lb-bench-e2e [--rounds N] [--round-secs S] [--warmup-ms MS]
//!          [--counts 1,1000,10000] [--modes lb,iptables,nftables,direct]
//!          [--concurrency C] [--client-threads T] [--latency-secs S] [--no-conn]
//!          [--no-pps] [--pps-secs S]
//!          [--pps-flows F] [--pps-threads T] [--iptables legacy|nft]
//!          [--agent-arg ARG]... [--xdp]
//! Needs root and the release lb-agent/lbctl (LB_AGENT_BIN, LBCTL_BIN,
//! LB_EBPF_OBJECT; `cargo xtask bench` builds and exports them).
//! Internal subcommands (run inside the namespaces): `client`, `blast`, `sink`.

#[path = "../bench/mod.rs"]
mod bench;

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::blast::{self, BlastOpts};
use bench::e2e::{self, IptablesBackend, Mode, Settings};
use bench::loadgen::{self, LoadOpts};
use bench::report;

fn usage() -> ! {
    eprintln!(
        "usage: lb-bench-e2e [--rounds N] [--round-secs S] [--warmup-ms MS] [--counts 1,1000,10000]\n\
         \x20                   [--modes lb,iptables,nftables,direct] [--concurrency C] [--client-threads T]\n\
         \x20                   [--latency-secs S] [--no-conn]\n\
         \x20                   [--no-pps] [--pps-secs S] [--pps-flows F] [--pps-threads T]\n\
         \x20                   [--iptables legacy|nft] [--agent-arg ARG]... [--xdp]"
    );
    std::process::exit(2);
}

/// `--flag value` pairs of the internal subcommands.
fn flags(args: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut m = std::collections::BTreeMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let Some(k) = k.strip_prefix("--") else {
            bail!("unexpected argument {k}");
        };
        let v = it.next().with_context(|| format!("--{k} needs a value"))?;
        m.insert(k.to_string(), v.clone());
    }
    Ok(m)
}

fn get<T: std::str::FromStr>(m: &std::collections::BTreeMap<String, String>, k: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let v = m.get(k).with_context(|| format!("--{k} is required"))?;
    v.parse().map_err(|e| anyhow::anyhow!("--{k} {v}: {e}"))
}

fn addrs(s: &str) -> Result<Vec<SocketAddrV4>> {
    s.split(',')
        .map(|a| a.parse().with_context(|| format!("bad address {a}")))
        .collect()
}

fn client(args: &[String]) -> Result<()> {
    let m = flags(args)?;
    let opts = LoadOpts {
        targets: addrs(&get::<String>(&m, "targets")?)?,
        concurrency: get(&m, "concurrency")?,
        threads: get(&m, "threads")?,
        warmup: Duration::from_millis(get(&m, "warmup-ms")?),
        duration: Duration::from_millis(get(&m, "duration-ms")?),
        timeout: Duration::from_secs(3),
    };
    let report = loadgen::run(&opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn blast_cmd(args: &[String]) -> Result<()> {
    let m = flags(args)?;
    let opts = BlastOpts {
        iface: get(&m, "iface")?,
        src_mac: blast::parse_mac(&get::<String>(&m, "src-mac")?)?,
        dst_mac: blast::parse_mac(&get::<String>(&m, "dst-mac")?)?,
        src: get(&m, "src")?,
        dsts: addrs(&get::<String>(&m, "dsts")?)?,
        flows: get(&m, "flows")?,
        threads: get(&m, "threads")?,
        duration: Duration::from_millis(get(&m, "duration-ms")?),
    };
    let report = blast::run(&opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn parse_settings(args: &[String]) -> Settings {
    let mut s = Settings::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        let num = |v: String| -> f64 { v.parse().unwrap_or_else(|_| usage()) };
        match a.as_str() {
            "--rounds" => s.rounds = num(val()) as usize,
            "--round-secs" => s.round = Duration::from_secs_f64(num(val())),
            "--warmup-ms" => s.warmup = Duration::from_millis(num(val()) as u64),
            "--counts" => {
                s.counts = val()
                    .split(',')
                    .map(|c| c.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--modes" => {
                s.modes = val()
                    .split(',')
                    .map(|m| {
                        Mode::parse(m).unwrap_or_else(|e| {
                            eprintln!("{e}");
                            usage()
                        })
                    })
                    .collect()
            }
            "--concurrency" => s.concurrency = num(val()) as usize,
            "--client-threads" => s.client_threads = num(val()) as usize,
            "--no-pps" => s.pps = false,
            "--no-conn" => s.conn = false,
            "--latency-secs" => s.latency_round = Duration::from_secs_f64(num(val())),
            "--pps-secs" => s.pps_round = Duration::from_secs_f64(num(val())),
            "--pps-flows" => s.pps_flows = num(val()) as u16,
            "--pps-threads" => s.pps_threads = num(val()) as usize,
            "--iptables" => {
                s.iptables = match val().as_str() {
                    "legacy" => IptablesBackend::Legacy,
                    "nft" => IptablesBackend::Nft,
                    _ => usage(),
                }
            }
            "--agent-arg" => s.agent_args.push(val()),
            "--xdp" => s.xdp = true,
            _ => usage(),
        }
    }
    if s.rounds == 0
        || s.counts.is_empty()
        || s.counts.contains(&0)
        || s.counts.iter().any(|c| *c > 60_000)
        || s.modes.is_empty()
        || s.concurrency == 0
        || s.pps_flows == 0
    {
        usage();
    }
    s.counts.sort_unstable();
    s.counts.dedup();
    s
}

extern "C" fn on_signal(_: libc::c_int) {
    e2e::STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("client") => return client(&args[1..]),
        Some("blast") => return blast_cmd(&args[1..]),
        Some("sink") => {
            let m = flags(&args[1..])?;
            return blast::sink(get(&m, "port")?);
        }
        _ => {}
    }
    let settings = parse_settings(&args);
    if !lb_tests::privilege::have_privileges() {
        eprintln!("lb-bench-e2e: needs root with BPF and network namespaces; not run");
        std::process::exit(2);
    }
    let mut tools = vec!["nginx", "iptables"];
    if settings.modes.contains(&Mode::Nftables) {
        tools.push("nft");
    }
    if settings.modes.contains(&Mode::Iptables) {
        tools.push(settings.iptables.restore());
    }
    for tool in tools {
        if lb_tests::topology::run(
            &["sh", "-c", &format!("command -v {tool}")],
            Duration::from_secs(5),
        )
        .map(|o| !o.success())
        .unwrap_or(true)
        {
            bail!("{tool} is not installed (cargo xtask bench installs nginx-light, nftables, iptables)");
        }
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let started = Instant::now();
    println!("machine: {}", machine());
    println!(
        "agent: {}\nebpf object: {}",
        lb_tests::artifacts::lb_agent_bin().display(),
        lb_tests::artifacts::ebpf_object().display()
    );
    let results = e2e::run_bench(&settings, &exe)?;
    print!("{}", report::report(&settings, &results));
    println!("\ntotal elapsed: {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}
