//! lbctl: reads lb's pinned maps and prints what the datapath is doing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::dataplane::{self, AgentMaps, DatapathMaps};
use lb_userspace::observe::views as inspect;

#[derive(Parser, Debug)]
#[command(name = "lbctl", version, about = "Inspect lb's BPF maps")]
struct Args {
    /// bpffs directory the agent pins into.
    #[arg(long, global = true, default_value = dataplane::DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Frontends (ClusterIP, NodePort, external and LoadBalancer addresses) and their backends.
    Services,
    /// Every backend (endpoint) the maps hold.
    Backends,
    /// Translated flows, both directions, with each flow's state and how
    /// long it may stay idle. The remaining lifetime uses the agent's
    /// default lifetimes; give the agent's values when it was started with
    /// others (the datapath's configuration is not readable from the maps).
    Conntrack {
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        conntrack_tcp_timeout_established: std::time::Duration,
        /// Every TCP state but established, as the agent's shorthand.
        #[arg(long, value_parser = humantime::parse_duration)]
        conntrack_tcp_transient_timeout: Option<std::time::Duration>,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        conntrack_udp_timeout: std::time::Duration,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        conntrack_udp_timeout_stream: std::time::Duration,
    },
    /// Datapath counters by verdict and drop reason, summed over CPUs.
    Stats,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = &args.bpffs;
    let json = args.output == Output::Json;
    match args.command {
        Command::Services => {
            let c = AgentMaps::open_pinned(dir)?
                .read_contents()
                .context("reading maps")?;
            let rows = inspect::services(&c);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<28} {:<12} {:<36} {:>3}  BACKENDS",
                    "FRONTEND", "KIND", "SERVICE", "ID"
                );
                for r in rows {
                    let backends: Vec<String> = r
                        .backends
                        .iter()
                        .map(|b| match (b.address, b.port) {
                            (Some(a), Some(p)) => {
                                format!("{a}:{p}{}", if b.local { "(local)" } else { "" })
                            }
                            _ => format!("<missing backend {}>", b.id),
                        })
                        .collect();
                    let mut extra = String::new();
                    if !r.flags.is_empty() {
                        extra = format!("  [{}]", r.flags.join(","));
                    }
                    println!(
                        "{:<28} {:<12} {:<36} {:>3}  {}{}",
                        r.frontend,
                        r.kind,
                        r.service,
                        r.service_id,
                        if backends.is_empty() {
                            "<none>".to_string()
                        } else {
                            backends.join(" ")
                        },
                        extra
                    );
                }
            }
        }
        Command::Backends => {
            let c = AgentMaps::open_pinned(dir)?
                .read_contents()
                .context("reading maps")?;
            let rows = inspect::backends(&c);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>5}  {:<22} {:<5} {:<6} TERMINATING",
                    "ID", "ADDRESS", "PROTO", "LOCAL"
                );
                for r in rows {
                    println!(
                        "{:>5}  {:<22} {:<5} {:<6} {}",
                        r.id,
                        format!("{}:{}", r.address, r.port),
                        r.protocol,
                        r.local,
                        r.terminating
                    );
                }
            }
        }
        Command::Conntrack {
            conntrack_tcp_timeout_established,
            conntrack_tcp_transient_timeout,
            conntrack_udp_timeout,
            conntrack_udp_timeout_stream,
        } => {
            let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            let mut lifetimes = lb_common::DatapathConfig::DEFAULT;
            if let Some(t) = conntrack_tcp_transient_timeout {
                lifetimes = lifetimes.with_tcp_transient_ns(ns(t));
            }
            lifetimes.ct_tcp_established_ns = ns(conntrack_tcp_timeout_established);
            lifetimes.ct_udp_ns = ns(conntrack_udp_timeout);
            lifetimes.ct_udp_stream_ns = ns(conntrack_udp_timeout_stream);
            let maps = DatapathMaps::open_pinned(dir)?;
            let entries = maps.conntrack_entries()?;
            let rows = inspect::conntrack(&entries, &lifetimes, inspect::boottime_ns());
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<8} {:<5} {:<22} {:<22} {:<22} {:<22} {:<11} {:>8} {:>9}  FLAGS",
                    "DIR",
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
                    "NAT",
                    "SNAT",
                    "STATE",
                    "AGE(s)",
                    "LEFT(s)"
                );
                for r in rows {
                    println!(
                        "{:<8} {:<5} {:<22} {:<22} {:<22} {:<22} {:<11} {:>8.1} {:>9.1}  {}",
                        r.direction,
                        r.protocol,
                        r.source,
                        r.destination,
                        r.nat,
                        r.snat.as_deref().unwrap_or("-"),
                        r.state,
                        r.age_seconds,
                        r.remaining_seconds,
                        r.flags.join(",")
                    );
                }
            }
        }
        Command::Stats => {
            let maps = DatapathMaps::open_pinned(dir)?;
            let stats = maps.stats()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&inspect::stats_json(&stats))?
                );
            } else {
                for (r, v) in stats {
                    println!("{:<24} {v}", r.name());
                }
            }
        }
    }
    Ok(())
}
