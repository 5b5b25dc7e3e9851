//! lbctl: reads lb's pinned maps and prints what the datapath is doing.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_core::desired::ServicePortName;
use lb_userspace::dataplane::{self, AgentMaps, DatapathMaps};
use lb_userspace::observe::monitor;
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
    /// long it may stay idle (the agent's lifetimes, from LB_SETTINGS).
    Conntrack,
    /// Datapath counters by verdict and drop reason, summed over CPUs.
    Stats,
    /// Stream datapath events (drops with their reason, rejects, new
    /// translations, conntrack evictions) until interrupted. Needs the
    /// agent's --monitor; one reader per node (the kernel's ring buffer has
    /// a single consumer: two readers would each see part of the events).
    Monitor(MonitorArgs),
}

#[derive(clap::Args, Debug)]
struct MonitorArgs {
    /// Only events of this kind (repeatable): drop, reject, translate, evict.
    #[arg(long = "type", value_name = "KIND", value_parser = monitor::parse_kind)]
    kinds: Vec<u8>,
    /// Only events of this Service, or of one of its ports (by port name,
    /// or by the frontend port number).
    #[arg(long, value_name = "NS/NAME[:PORT]", value_parser = monitor::ServiceMatch::parse)]
    service: Option<monitor::ServiceMatch>,
    /// Only events whose source or destination, before or after
    /// translation, is this address.
    #[arg(long, value_name = "IP")]
    addr: Option<std::net::Ipv4Addr>,
    /// Only events for this reason (a counter name of `lbctl stats`, e.g.
    /// drop_no_backend, reject_no_endpoint).
    #[arg(long, value_name = "NAME", value_parser = monitor::parse_reason)]
    reason: Option<lb_common::StatReason>,
    /// One JSON object per line (same as -o json).
    #[arg(long)]
    json: bool,
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
        Command::Conntrack => {
            let maps = DatapathMaps::open_pinned(dir)?;
            let entries = maps.conntrack_entries()?;
            let lifetimes = agent_settings(dir);
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
        Command::Monitor(m) => {
            let filter = monitor::Filter {
                kinds: m.kinds,
                service: m.service,
                addr: m.addr,
                reason: m.reason,
            };
            return run_monitor(dir, &filter, json || m.json);
        }
    }
    Ok(())
}

/// The agent's configuration (its conntrack lifetimes), from the pinned
/// LB_SETTINGS. Without it (an agent from before LB_SETTINGS) or when it
/// cannot be read: the defaults, said once on stderr.
fn agent_settings(dir: &Path) -> lb_common::DatapathConfig {
    let why = match dataplane::layout::read_settings(dir) {
        Ok(Some(config)) => return config,
        Ok(None) => format!(
            "{} is missing or empty (an agent from before it)",
            dir.join(lb_common::map_names::SETTINGS).display()
        ),
        Err(e) => e,
    };
    eprintln!("lbctl: {why}; time left uses the default lifetimes (24h established TCP, 30s UDP, ...), which may not be the agent's");
    lb_common::DatapathConfig::DEFAULT
}

/// Set by SIGINT/SIGTERM: `lbctl monitor` stops after the event at hand.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Service id -> name, from the pinned LB_SERVICE_NAMES (empty when it
/// cannot be read: events then show ids).
fn service_names(dir: &Path) -> BTreeMap<u32, ServicePortName> {
    AgentMaps::open_pinned(dir)
        .and_then(|m| m.read_contents())
        .map(|c| c.names)
        .unwrap_or_default()
}

/// CLOCK_REALTIME - CLOCK_BOOTTIME in ns: turns an event's
/// bpf_ktime_get_boot_ns() into wall-clock time.
fn boot_to_wall_ns() -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    wall.saturating_sub(inspect::boottime_ns())
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex-{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn run_monitor(dir: &Path, filter: &monitor::Filter, json: bool) -> Result<()> {
    let mut reader = monitor::Reader::open(dir)?;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    let handler: extern "C" fn(libc::c_int) = on_signal;
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let mut names = service_names(dir);
    let mut names_read = Instant::now();
    let offset = boot_to_wall_ns();
    let mut ifnames: HashMap<u32, String> = HashMap::new();
    eprintln!("lbctl monitor: reading {} (Ctrl-C stops)", dir.display());
    let mut out = std::io::stdout().lock();
    while !STOP.load(Ordering::Relaxed) {
        while let Some(ev) = reader.next_event() {
            let ev = ev?;
            // A service programmed after the names were read: read them
            // again, at most once a second.
            if ev.service_id != 0
                && !names.contains_key(&ev.service_id)
                && names_read.elapsed() > Duration::from_secs(1)
            {
                names = service_names(dir);
                names_read = Instant::now();
            }
            if !filter.matches(&ev, &names) {
                continue;
            }
            let iface = ifnames
                .entry(ev.ifindex)
                .or_insert_with(|| ifname(ev.ifindex))
                .clone();
            let row = monitor::row(&ev, &names, ev.ts_ns + offset, &|_| iface.clone());
            let text = if json {
                serde_json::to_string(&row)?
            } else {
                monitor::line(&row)
            };
            writeln!(out, "{text}")?;
            out.flush()?;
        }
        if !reader.wait(500)? && !reader.still_on() {
            anyhow::bail!(
                "the agent turned monitoring off (its ring buffer pin is gone): restart it with --monitor"
            );
        }
    }
    Ok(())
}
