//! The end-to-end benchmark as a whole: settings, beds, interleaved rounds
//! (the beds themselves in [`super::beds`], the printout in [`super::report`]).
//!
//! One bed = one topology of [`lb_tests::topology`] (its own lan, two
//! kubeadm-like nodes, pods, external client), all alike:
//!
//! ```text
//!  node1: client (10.244.1.2), web1 (10.244.1.3), web2 (10.244.1.4)
//!  node2: web3 (10.244.2.2)
//!  web1..3: nginx on 8080 (one process, `return 200 "backend=webN"`), a UDP sink on 9000
//! ```
//!
//! and differs only in what translates Services:
//! - `lb`: the real `lb-agent` on both nodes, manifest mode;
//! - `iptables`: kube-proxy's iptables layout on both nodes (iptables-restore);
//! - `nftables`: kube-proxy's nftables layout on both nodes (nft -f);
//! - `direct`: nothing; the client connects to the backends' addresses.
//!
//! The service-proxy beds are built for every service count (1, 1,000,
//! 10,000 by default): N Services of 3 endpoints each, of which only one,
//! the middle one in kube-proxy's rule order, has the real backends (2 on
//! the client's node, 1 on the other) and is exercised; it is a NodePort
//! Service (TCP 80 -> 8080, NodePort 30080; UDP 9000 -> 9000, NodePort
//! 30090). The others' endpoints are addresses in the nodes' pod CIDRs.
//!
//! Every bed is measured in each round, in a rotating order (interleaved
//! rounds: drift of the machine hits every bed alike), and every ratio is
//! computed per round, then its median taken.
//!
//! Choices worth knowing when reading the numbers:
//! - The machine has 2 cores and every bed shares them; the connection
//!   test saturates them (32 connections in flight), so connections/s is
//!   the inverse of the whole path's CPU cost per connection: client,
//!   nginx, both nodes' kernels, the service proxy. A second pass per bed
//!   and round with one connection at a time gives the path's latency
//!   without queueing.
//! - kube-proxy's iptables layout is loaded with iptables-legacy by
//!   default (`--iptables nft` for iptables-nft): the classic kube-proxy
//!   baseline. The nodes' kubeadm-like INVALID drop rule (iptables-nft)
//!   stays in place in every bed, as does netfilter conntrack.
//! - kube-proxy iterates a Go map, so a Service's place in KUBE-SERVICES is
//!   random; the exercised one sits in the middle (the average walk).
//! - The rule sets go on both nodes (kube-proxy runs everywhere): a
//!   connection to the remote backend also walks node2's nat table.
//! - The client pod uses the ephemeral range 1024-65535 and the server
//!   closes first, so client ports are reused within seconds: every mode
//!   sees tuple reuse, as a busy client does.
//! - The NodePort packet test runs at the largest service count, 256 UDP
//!   flows from the external namespace; its generator and the whole path
//!   share the 2 cores (the generator is throttled by the path: packets
//!   are processed in its own softirq), so delivered pps is the inverse of
//!   the per-packet cost, generator included.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::beds::{
    agent_cpu_secs, build_bed, run_blast, run_client, Bed, LoadTime, PpsSample, Workloads,
};
use super::cpu::{CpuDelta, CpuTimes};
use super::loadgen::LoadReport;
use super::report::compact_stats;

pub const NODE1: &str = "node1";
pub const NODE2: &str = "node2";
pub const CLIENT: &str = "client";
/// The exercised Service's backends and their nodes.
pub const BACKENDS: [(&str, &str); 3] = [("web1", NODE1), ("web2", NODE1), ("web3", NODE2)];
pub(crate) const HTTP_PORT: u16 = 80;
pub(crate) const HTTP_TARGET_PORT: u16 = 8080;
pub(crate) const HTTP_NODE_PORT: u16 = 30080;
pub(crate) const UDP_PORT: u16 = 9000;
pub(crate) const UDP_NODE_PORT: u16 = 30090;
pub(crate) const NAMESPACE: &str = "bench";
pub(crate) const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub(crate) const SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-proxy's nftables transaction at 10,000 Services takes 15-60 s here.
pub(crate) const NFT_LOAD_TIMEOUT: Duration = Duration::from_secs(240);

/// Set by SIGINT/SIGTERM: stop at the next step, tear everything down.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub(crate) fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// THE XDP SLOT. lb's north-south fast path (XDP on the uplink) is not
/// implemented yet. When it is, put the agent flags that turn it on here
/// (e.g. `Some(&["--xdp"])`): `lb-bench-e2e --xdp` then builds one more lb
/// bed ([`Mode::LbXdp`]) at the largest service count with these flags,
/// measures it in the NodePort packet rounds, and the report fills in the
/// XDP targets (>= 3x iptables, >= 2x lb TC).
pub const XDP_AGENT_ARGS: Option<&[&str]> = None;

/// What translates Services in a bed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Lb,
    Iptables,
    Nftables,
    Direct,
    /// lb with its XDP fast path (see [`XDP_AGENT_ARGS`]); packet test only.
    LbXdp,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Lb, Mode::Iptables, Mode::Nftables, Mode::Direct];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Lb => "lb",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Direct => "direct",
            Mode::LbXdp => "lb-xdp",
        }
    }

    pub fn parse(s: &str) -> Result<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.label() == s)
            .ok_or_else(|| anyhow!("unknown mode {s} (lb, iptables, nftables, direct)"))
    }
}

/// Which iptables kube-proxy's iptables layout is loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-legacy-restore` (xtables): the classic kube-proxy baseline.
    Legacy,
    /// `iptables-nft-restore` (the same rules through nf_tables' xt compat).
    Nft,
}

impl IptablesBackend {
    pub fn restore(self) -> &'static str {
        match self {
            IptablesBackend::Legacy => "iptables-legacy-restore",
            IptablesBackend::Nft => "iptables-nft-restore",
        }
    }
}

/// Everything the benchmark can be told.
#[derive(Clone, Debug)]
pub struct Settings {
    pub counts: Vec<u32>,
    pub modes: Vec<Mode>,
    pub rounds: usize,
    pub round: Duration,
    pub warmup: Duration,
    pub concurrency: usize,
    pub client_threads: usize,
    /// The connection-rate rounds (off: only the packet test).
    pub conn: bool,
    /// Per bed and round, a pass with one connection at a time (0: none).
    pub latency_round: Duration,
    pub pps: bool,
    pub pps_round: Duration,
    pub pps_flows: u16,
    pub pps_threads: usize,
    pub iptables: IptablesBackend,
    /// Extra `lb-agent` flags (e.g. `--poll-interval 5s`).
    pub agent_args: Vec<String>,
    /// The XDP slot: lb's NodePort fast path, not implemented yet.
    pub xdp: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            counts: vec![1, 1_000, 10_000],
            modes: Mode::ALL.to_vec(),
            rounds: 5,
            round: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            concurrency: 32,
            client_threads: 1,
            conn: true,
            latency_round: Duration::from_secs(1),
            pps: true,
            pps_round: Duration::from_secs(2),
            pps_flows: 256,
            pps_threads: 2,
            iptables: IptablesBackend::Legacy,
            agent_args: Vec::new(),
            xdp: false,
        }
    }
}

/// A bed's configuration: mode and number of Services (0 for direct).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub mode: Mode,
    pub services: u32,
}

impl Key {
    pub fn label(&self) -> String {
        match self.mode {
            Mode::Direct => "direct".to_string(),
            m => format!("{} @{}", m.label(), thousands(u64::from(self.services))),
        }
    }
}

/// `12345` -> `12,345`
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Idle CPU of the machine with every bed up and nothing measured (the
/// agents' polling and GC, the other beds' processes).
fn background_cpu(over: Duration) -> Result<CpuDelta> {
    let a = CpuTimes::read()?;
    std::thread::sleep(over);
    Ok(a.until(&CpuTimes::read()?))
}

/// Everything measured, for the report.
pub struct Results {
    pub beds: Vec<(Key, Option<LoadTime>)>,
    pub failed: Vec<(Key, String)>,
    /// `conn[bed][round]`
    pub conn: Vec<Vec<LoadReport>>,
    /// `unloaded[bed][round]`: one connection at a time.
    pub unloaded: Vec<Vec<LoadReport>>,
    pub pps: Vec<(Key, Vec<PpsSample>)>,
    pub background: CpuDelta,
    pub background_secs: f64,
    /// Load average (1 min) when the rounds started and ended.
    pub loadavg: (String, String),
    pub notes: Vec<String>,
}

/// Builds the beds, measures them, tears them down.
pub fn run_bench(s: &Settings, exe: &str) -> Result<Results> {
    let mut keys = Vec::new();
    for &n in &s.counts {
        for m in [Mode::Lb, Mode::Iptables, Mode::Nftables] {
            if s.modes.contains(&m) {
                keys.push(Key {
                    mode: m,
                    services: n,
                });
            }
        }
    }
    if s.modes.contains(&Mode::Direct) {
        keys.push(Key {
            mode: Mode::Direct,
            services: 0,
        });
    }
    if s.xdp && s.pps {
        match XDP_AGENT_ARGS {
            Some(_) => keys.push(Key {
                mode: Mode::LbXdp,
                services: s.counts.iter().copied().max().unwrap_or(1),
            }),
            None => println!(
                "--xdp: lb's XDP path is not implemented yet (slot: XDP_AGENT_ARGS in tests/src/bench/e2e.rs); no XDP bed"
            ),
        }
    }

    let mut beds: Vec<Bed> = Vec::new();
    let mut failed = Vec::new();
    let mut workloads = Workloads::new();
    let setup_started = Instant::now();
    for key in &keys {
        check_stop()?;
        let t = Instant::now();
        print!("setting up {:<16} ", key.label());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        match build_bed(*key, &mut workloads, s, exe) {
            Ok(bed) => {
                let load = bed
                    .load
                    .as_ref()
                    .map(|l| {
                        let t: Vec<String> = l
                            .per_node
                            .iter()
                            .map(|d| format!("{:.2}s", d.as_secs_f64()))
                            .collect();
                        format!("; {}: {} ({})", l.what, t.join(" / "), l.note)
                    })
                    .unwrap_or_default();
                println!("ok in {:.1}s{load}", t.elapsed().as_secs_f64());
                beds.push(bed);
            }
            Err(e) => {
                if STOP.load(Ordering::SeqCst) {
                    return Err(e);
                }
                println!("FAILED in {:.1}s: {e:#}", t.elapsed().as_secs_f64());
                failed.push((*key, format!("{e:#}")));
            }
        }
    }
    // The manifests and rule texts are no longer needed.
    drop(workloads);
    println!(
        "setup: {} beds in {:.0}s",
        beds.len(),
        setup_started.elapsed().as_secs_f64()
    );
    let background_secs = 2.0;
    let background = background_cpu(Duration::from_secs_f64(background_secs))?;
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_default()
    };
    let load_start = loadavg();
    let agents_before: Vec<f64> = beds.iter().map(|b| agent_cpu_secs(&b.topo)).collect();
    let rounds_started = Instant::now();

    // Interleaved rounds of the connection test.
    let mut conn: Vec<Vec<LoadReport>> = vec![Vec::new(); beds.len()];
    let mut unloaded: Vec<Vec<LoadReport>> = vec![Vec::new(); beds.len()];
    for round in 0..if s.conn { s.rounds } else { 0 } {
        let t = Instant::now();
        for i in 0..beds.len() {
            let b = (i + round) % beds.len();
            if beds[b].key.mode == Mode::LbXdp {
                continue;
            }
            let r = run_client(&beds[b], s, exe, s.warmup, s.round, s.concurrency)
                .with_context(|| format!("round {}: {}", round + 1, beds[b].key.label()))?;
            conn[b].push(r);
            // Latency of the path itself: one connection at a time.
            if !s.latency_round.is_zero() {
                let r = run_client(
                    &beds[b],
                    s,
                    exe,
                    Duration::from_millis(200),
                    s.latency_round,
                    1,
                )
                .with_context(|| {
                    format!(
                        "round {}: {} (one at a time)",
                        round + 1,
                        beds[b].key.label()
                    )
                })?;
                unloaded[b].push(r);
            }
        }
        let summary: Vec<String> = beds
            .iter()
            .zip(&conn)
            .filter(|(b, _)| b.key.mode != Mode::LbXdp)
            .map(|(b, r)| {
                format!(
                    "{} {:.0}",
                    b.key.label(),
                    r.last().map(LoadReport::rate).unwrap_or(0.0)
                )
            })
            .collect();
        println!(
            "round {}/{} ({:.0}s): conn/s {}",
            round + 1,
            s.rounds,
            t.elapsed().as_secs_f64(),
            summary.join(", ")
        );
    }

    let rounds_secs = rounds_started.elapsed().as_secs_f64();
    let agent_cpu: Vec<f64> = beds
        .iter()
        .zip(&agents_before)
        .map(|(b, before)| agent_cpu_secs(&b.topo) - before)
        .collect();

    // Interleaved rounds of the NodePort packet test, at the largest count.
    let mut pps: Vec<(Key, Vec<PpsSample>)> = Vec::new();
    if s.pps {
        let n = s.counts.iter().copied().max().unwrap_or(0);
        let pps_beds: Vec<usize> = beds
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                matches!(b.key.mode, Mode::Direct | Mode::LbXdp) || b.key.services == n
            })
            .map(|(i, _)| i)
            .collect();
        pps = pps_beds
            .iter()
            .map(|&i| (beds[i].key, Vec::new()))
            .collect();
        for round in 0..s.rounds {
            for k in 0..pps_beds.len() {
                let j = (k + round) % pps_beds.len();
                let sample = run_blast(&beds[pps_beds[j]], s, exe).with_context(|| {
                    format!("pps round {}: {}", round + 1, beds[pps_beds[j]].key.label())
                })?;
                pps[j].1.push(sample);
            }
            let summary: Vec<String> = pps
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{} {:.0}",
                        k.label(),
                        v.last().map(|x| x.delivered_pps).unwrap_or(0.0)
                    )
                })
                .collect();
            println!(
                "pps round {}/{}: delivered pps {}",
                round + 1,
                s.rounds,
                summary.join(", ")
            );
        }
    }

    // What the beds say about themselves after the load.
    let mut notes = Vec::new();
    for (b, agent_cpu) in beds.iter().zip(&agent_cpu) {
        let ct = b
            .topo
            .exec(
                NODE1,
                &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
                Duration::from_secs(5),
            )
            .ok()
            .map(|o| o.stdout.trim().to_string())
            .unwrap_or_default();
        let mut line = format!("{}: node1 netfilter conntrack entries {ct}", b.key.label());
        if matches!(b.key.mode, Mode::Lb | Mode::LbXdp) {
            line.push_str(&format!(
                "; lb-agent CPU during the connection rounds (both nodes): {agent_cpu:.1}s in {rounds_secs:.0}s ({:.1}% of a core)",
                100.0 * agent_cpu / rounds_secs.max(1e-9)
            ));
            for node in [NODE1, NODE2] {
                if let Err(e) = b.topo.check_running(&format!("agent-{node}")) {
                    line.push_str(&format!("; AGENT OF {node} EXITED: {e:#}"));
                }
            }
            if let Ok(stats) = b.topo.lbctl_json(NODE1, "stats") {
                line.push_str(&format!("; lbctl stats node1: {}", compact_stats(&stats)));
            }
            let log = b.topo.log(&format!("agent-{NODE1}"));
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            if !bad.is_empty() {
                line.push_str(&format!(
                    "; agent log node1: {} warning/error lines, last: {}",
                    bad.len(),
                    bad.last().unwrap_or(&"").trim()
                ));
            }
        }
        notes.push(line);
    }

    let bed_list = beds.iter().map(|b| (b.key, b.load.clone())).collect();
    let t = Instant::now();
    drop(beds);
    println!("teardown: {:.1}s", t.elapsed().as_secs_f64());
    Ok(Results {
        beds: bed_list,
        failed,
        conn,
        unloaded,
        pps,
        background,
        background_secs,
        loadavg: (load_start, loadavg()),
        notes,
    })
}
