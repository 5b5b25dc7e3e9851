//! lb-bench: cost per packet of the datapath as the number of services grows.
//!
//! For 1, 1,000, 10,000 and 100,000 ClusterIP services (3 backend slots
//! each) loaded into separate instances of the eBPF object, measures with
//! BPF_PROG_TEST_RUN the kernel-reported nanoseconds per packet of
//! `lb_pod_ingress` for these packets:
//!
//! - new flow: a TCP SYN to a ClusterIP from a source address:port never
//!   used before (every run creates a conntrack entry pair; checked through
//!   the NewFlow counter at the end). "one service": always the same
//!   ClusterIP, so only the table sizes differ between rows; "any service":
//!   a random ClusterIP of all N, which adds the cache and TLB misses of a
//!   working set that grows with N (worst case: uniform traffic to every
//!   service);
//! - established: a data segment of one of 1,024 established flows (full
//!   handshake through lb_pod_ingress and lb_pod_egress beforehand);
//! - not a service: a TCP segment to an address no service uses, the same
//!   one ("one address") or a random one of 65,536 ("any address"; a miss
//!   walks the hash bucket, whose chain grows with the table's fill).
//!
//! Every run is a single program execution (repeat = 1: a repeated run would
//! see its own rewritten packet). Each (instance, kind) cell is measured in
//! several interleaved rounds; the cell's value is the median over rounds
//! of the per-round median. The ratio cost(100,000)/cost(1) is reported per
//! kind against the target 1.2; being over is reported, not an error.
//!
//! Usage: lb-bench [--rounds N] [--runs N] [--counts 1,1000,10000,100000]
//! Needs root (BPF). Runs in a private network namespace.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lb_common::{program_names, DatapathConfig, StatReason, PROTO_TCP};
use lb_tests::datapath::{BackendEntry, Datapath, ServiceEntry};
use lb_tests::packet::{tcp, tuple, TCP_ACK, TCP_PSH, TCP_SYN};

const TARGET_RATIO: f64 = 1.2;
const SLOTS_PER_SERVICE: u32 = 3;
/// Distinct backends; services share them round-robin (as services selecting
/// the same pods do). Fits lb_common::MAX_BACKENDS.
const BACKEND_POOL: u32 = 200_000;
const ESTABLISHED_FLOWS: u32 = 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    NewFlowOne,
    NewFlowAny,
    Established,
    NotServiceOne,
    NotServiceAny,
}

const KINDS: [Kind; 5] = [
    Kind::NewFlowOne,
    Kind::NewFlowAny,
    Kind::Established,
    Kind::NotServiceOne,
    Kind::NotServiceAny,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::NewFlowOne => "new, one svc",
            Kind::NewFlowAny => "new, any svc",
            Kind::Established => "established",
            Kind::NotServiceOne => "no svc, one addr",
            Kind::NotServiceAny => "no svc, any addr",
        }
    }

    /// The packet kinds, which carry the 1.2 target: the same packet
    /// with more services in the maps, so the ratio isolates per-packet work.
    /// The "any" kinds spread traffic over every service and also measure the
    /// memory hierarchy (a working set that outgrows the caches); they are
    /// reported without a verdict.
    fn has_target(self) -> bool {
        matches!(
            self,
            Kind::NewFlowOne | Kind::Established | Kind::NotServiceOne
        )
    }
}

/// Deterministic randomness (the same packets every run), from `rand`.
struct Rng(rand::rngs::SmallRng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(rand::SeedableRng::seed_from_u64(seed))
    }

    fn below(&mut self, n: u32) -> u32 {
        rand::RngExt::random_range(&mut self.0, 0..n.max(1))
    }
}

/// ClusterIP of service `i` (0-based): 10.96.0.0/12 + i + 1.
fn vip(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1),
        80,
    )
}

/// Backend `b`: 10.128.0.0/9 + b + 1, port 8080.
fn backend(b: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + b + 1),
        8080,
    )
}

/// A client address:port that no earlier flow of this instance used.
fn client(n: u32) -> SocketAddrV4 {
    let host = u32::from(Ipv4Addr::new(10, 1, 0, 0)) + n / 50_000;
    SocketAddrV4::new(Ipv4Addr::from(host), 10_000 + (n % 50_000) as u16)
}

struct Instance {
    services: u32,
    dp: Datapath,
    next_client: u32,
    established: Vec<Vec<u8>>,
    new_flows: u64,
}

impl Instance {
    fn new(services: u32) -> Result<Self> {
        // Only the programs a pod's traffic goes through.
        let dp = Datapath::load_programs(
            DatapathConfig::DEFAULT,
            &[program_names::POD_INGRESS, program_names::POD_EGRESS],
        )?;
        let mut inst = Self {
            services,
            dp,
            next_client: 0,
            established: Vec::new(),
            new_flows: 0,
        };
        inst.fill();
        Ok(inst)
    }

    /// `services` ClusterIP service ports with `SLOTS_PER_SERVICE` backends
    /// each, taken round-robin from a pool of backends.
    fn fill(&mut self) {
        let pool = BACKEND_POOL.min(self.services * SLOTS_PER_SERVICE);
        for i in 0..self.services {
            let backends = (0..SLOTS_PER_SERVICE)
                .map(|s| {
                    let b = (i * SLOTS_PER_SERVICE + s) % pool;
                    BackendEntry::new(b + 1, backend(b))
                })
                .collect();
            self.dp.add_service(&ServiceEntry::cluster_ip(
                i + 1,
                vip(i),
                PROTO_TCP,
                backends,
            ));
        }
    }

    /// One run of lb_pod_ingress; returns (verdict, ns, output).
    fn run(&self, frame: &[u8]) -> Result<(u32, u64, Vec<u8>)> {
        self.run_prog(program_names::POD_INGRESS, frame)
    }

    fn run_prog(&self, prog: &str, frame: &[u8]) -> Result<(u32, u64, Vec<u8>)> {
        let r = self.dp.run(prog, frame);
        Ok((r.ret, r.duration.as_nanos() as u64, r.out))
    }

    fn new_client(&mut self) -> SocketAddrV4 {
        let c = client(self.next_client);
        self.next_client += 1;
        c
    }

    /// Opens `ESTABLISHED_FLOWS` flows to random services with a full
    /// handshake (SYN in, SYN-ACK back through lb_pod_egress, ACK in) and
    /// keeps a data segment of each for the measurement.
    fn open_flows(&mut self, rng: &mut Rng) -> Result<()> {
        for _ in 0..ESTABLISHED_FLOWS {
            let c = self.new_client();
            let v = vip(rng.below(self.services));
            let (ret, _, out) = self.run(&tcp(c, v, TCP_SYN).build())?;
            let t = tuple(&out);
            if !passes(ret) || t.dst == v {
                bail!("SYN to {v} was not translated (verdict {ret})");
            }
            self.new_flows += 1;
            let syn_ack = tcp(t.dst, c, TCP_SYN | TCP_ACK).build();
            let (_, _, out) = self.run_prog(program_names::POD_EGRESS, &syn_ack)?;
            if tuple(&out).src != v {
                bail!("SYN-ACK from {} was not reverse-translated", t.dst);
            }
            self.run(&tcp(c, v, TCP_ACK).build())?;
            self.established.push(tcp(c, v, TCP_ACK | TCP_PSH).build());
        }
        Ok(())
    }

    fn sample(&mut self, kind: Kind, rng: &mut Rng) -> Result<u64> {
        let frame = match kind {
            Kind::NewFlowOne | Kind::NewFlowAny => {
                let c = self.new_client();
                self.new_flows += 1;
                let target = if kind == Kind::NewFlowOne {
                    self.services / 2
                } else {
                    rng.below(self.services)
                };
                tcp(c, vip(target), TCP_SYN).build()
            }
            Kind::Established => {
                self.established[rng.below(self.established.len() as u32) as usize].clone()
            }
            Kind::NotServiceOne | Kind::NotServiceAny => {
                // 10.200.0.0/16, never a ClusterIP here.
                let host = if kind == Kind::NotServiceOne {
                    7
                } else {
                    rng.below(65_536)
                };
                let d = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + host);
                tcp(
                    client(rng.below(1 << 20)),
                    SocketAddrV4::new(d, 80),
                    TCP_ACK | TCP_PSH,
                )
                .build()
            }
        };
        let (ret, ns, _) = self.run(&frame)?;
        if !passes(ret) {
            bail!("{kind:?}: verdict {ret}");
        }
        Ok(ns)
    }

    fn counter(&self, r: StatReason) -> Result<u64> {
        Ok(self.dp.stat(r))
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn usage() -> ! {
    eprintln!("usage: lb-bench [--rounds N] [--runs N] [--counts 1,1000,10000,100000]");
    std::process::exit(2);
}

fn main() -> Result<()> {
    let started = Instant::now();
    let mut rounds = 7usize;
    let mut runs = 3000usize;
    let mut counts = vec![1u32, 1_000, 10_000, 100_000];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--rounds" => rounds = val().parse().unwrap_or_else(|_| usage()),
            "--runs" => runs = val().parse().unwrap_or_else(|_| usage()),
            "--counts" => {
                counts = val()
                    .split(',')
                    .map(|c| c.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            _ => usage(),
        }
    }
    if rounds == 0 || runs == 0 || counts.is_empty() || counts.contains(&0) {
        usage();
    }
    if !lb_tests::privilege::have_privileges() {
        eprintln!("lb-bench: needs root with BPF (BPF_PROG_TEST_RUN); not run");
        std::process::exit(2);
    }
    // Nothing here sends packets, but keep even the FIB out of reach.
    lb_tests::netns::in_private_netns(|| bench(started, rounds, runs, &counts))
}

fn bench(started: Instant, rounds: usize, runs: usize, counts: &[u32]) -> Result<()> {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut insts = Vec::new();
    for &n in counts {
        let t = Instant::now();
        let mut inst = Instance::new(n)?;
        inst.open_flows(&mut rng)?;
        println!(
            "instance with {n:>7} services: maps filled, {ESTABLISHED_FLOWS} flows opened in {:.2?}",
            t.elapsed()
        );
        insts.push(inst);
    }

    // per_round[inst][kind] = per-round medians
    let mut per_round = vec![vec![Vec::new(); KINDS.len()]; insts.len()];
    let mut buf = Vec::with_capacity(runs);
    for round in 0..rounds {
        // Rotate the order so no instance or kind always goes first.
        for i in 0..insts.len() {
            let ii = (i + round) % insts.len();
            for k in 0..KINDS.len() {
                let kk = (k + round) % KINDS.len();
                buf.clear();
                for _ in 0..runs {
                    buf.push(insts[ii].sample(KINDS[kk], &mut rng)?);
                }
                per_round[ii][kk].push(median(&mut buf));
            }
        }
    }
    let cost: Vec<Vec<u64>> = per_round
        .iter_mut()
        .map(|kinds| kinds.iter_mut().map(|r| median(r)).collect())
        .collect();

    // Honesty check: every new-flow run created a flow.
    for inst in &insts {
        let made = inst.counter(StatReason::NewFlow)?;
        if made != inst.new_flows {
            bail!(
                "{} services: {} new flows counted, {} expected",
                inst.services,
                made,
                inst.new_flows
            );
        }
    }

    println!();
    println!(
        "lb_pod_ingress, ns per packet (BPF_PROG_TEST_RUN, median of {rounds} rounds x {runs} runs)"
    );
    print!("{:>10}", "services");
    for k in KINDS {
        print!(" | {:>16}", k.label());
    }
    println!();
    println!("{}", "-".repeat(10 + KINDS.len() * 19));
    for (i, inst) in insts.iter().enumerate() {
        print!("{:>10}", inst.services);
        for c in &cost[i] {
            print!(" | {c:>16}");
        }
        println!();
    }
    println!();
    let (first, last) = (0, insts.len() - 1);
    println!(
        "cost({})/cost({}) per kind (target <= {TARGET_RATIO} for the same packet as services grow;",
        insts[last].services, insts[first].services
    );
    println!(
        "  the \"any\" kinds spread packets over all services: cache and TLB misses, no target):"
    );
    for (k, kind) in KINDS.iter().enumerate() {
        let ratio = cost[last][k] as f64 / cost[first][k].max(1) as f64;
        let mark = if !kind.has_target() {
            "info"
        } else if ratio <= TARGET_RATIO {
            "PASS"
        } else {
            "OVER"
        };
        println!(
            "  {:<16} {:>5} ns -> {:>5} ns  ratio {ratio:.2}  {mark}",
            kind.label(),
            cost[first][k],
            cost[last][k]
        );
    }
    let flows: u64 = insts.iter().map(|i| i.new_flows).sum();
    println!();
    println!("new flows created and verified through the NewFlow counter: {flows}");
    println!("total elapsed: {:.1?}", round_ms(started.elapsed()));
    Ok(())
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The datapath lets a packet continue with TCX_NEXT (-1, C5) on every path
/// that does not drop or redirect it; TC_ACT_OK (0) is accepted too.
fn passes(ret: u32) -> bool {
    ret == u32::MAX || ret == 0
}
