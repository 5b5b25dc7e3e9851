//! The report of the end-to-end bench: tables per bed, the targets as
//! per-round ratios with PASS/OVER (a report, never an assertion), the
//! programming times, the packet test, and what the beds said afterwards.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::beds::PpsSample;
use super::e2e::{thousands, Mode, Results, Settings, BACKENDS, UDP_NODE_PORT};
use super::loadgen::LoadReport;

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// lbctl's stats JSON as `name=value` for the non-zero counters.
pub(crate) fn compact_stats(v: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    let mut walk = |k: &str, val: &serde_json::Value| {
        if let Some(n) = val.as_u64().filter(|n| *n > 0) {
            parts.push(format!("{k}={n}"));
        }
    };
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                walk(k, val);
            }
        }
        serde_json::Value::Array(a) => {
            for e in a {
                let k = e["reason"]
                    .as_str()
                    .or_else(|| e["name"].as_str())
                    .unwrap_or("?")
                    .to_string();
                let val = if e["count"].is_null() {
                    &e["value"]
                } else {
                    &e["count"]
                };
                walk(&k, val);
            }
        }
        _ => {}
    }
    parts.join(" ")
}

/// A target of the report: a ratio that must be at least `min`.
struct Target {
    name: String,
    min: f64,
    values: Vec<f64>,
}

fn verdict(value: f64, min: f64) -> &'static str {
    if value.is_nan() {
        "n/a"
    } else if value >= min {
        "PASS"
    } else {
        "OVER"
    }
}

/// The connection-rate part of the report.
fn report_conn(s: &Settings, r: &Results, o: &mut String) {
    let rate = |i: usize| -> Vec<f64> { r.conn[i].iter().map(LoadReport::rate).collect() };
    let find = |mode: Mode, n: u32| -> Option<usize> {
        r.beds
            .iter()
            .position(|(k, _)| k.mode == mode && (mode == Mode::Direct || k.services == n))
    };
    let _ = writeln!(
        o,
        "\n== end to end: new TCP connection per HTTP GET, client pod -> ClusterIP:80"
    );
    let _ = writeln!(
        o,
        "   3 nginx backends (2 on the client's node, 1 remote); {} rounds x {:.1}s (+{:.1}s warm-up), {} connections in flight, beds interleaved",
        s.rounds,
        s.round.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.concurrency
    );
    let _ = writeln!(
        o,
        "   CPU = whole machine (/proc/stat, {} cores) over the window / connections; idle background with every bed up: {:.1}% of one core;\n   load average (1 min) at the start/end of the rounds: {} / {} (other work on the machine shows here)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        100.0 * r.background.busy_s / r.background_secs,
        r.loadavg.0,
        r.loadavg.1
    );
    let _ = writeln!(
        o,
        "   latency: under that load (queueing included), and one connection at a time ({:.1}s per bed and round: the path itself)",
        s.latency_round.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "\n{:<16} {:>8} {:>11} {:>16} {:>16}",
        "", "", "", "loaded", "one at a time"
    );
    let _ = writeln!(
        o,
        "{:<16} {:>8} {:>11} {:>16} {:>16} {:>7} {:>7}  backends web1/web2/web3",
        "mode", "conn/s", "CPU us/conn", "p50/p99 us", "p50/p99 us", "max ms", "errors",
    );
    for (i, (key, _)) in r.beds.iter().enumerate() {
        if key.mode == Mode::LbXdp {
            continue;
        }
        let reps = &r.conn[i];
        let one = &r.unloaded[i];
        let med = |v: &[LoadReport], f: &dyn Fn(&LoadReport) -> f64| {
            median(&v.iter().map(f).collect::<Vec<_>>())
        };
        let errors: u64 = reps.iter().chain(one).map(|x| x.errors).sum();
        let total: u64 = reps.iter().map(|x| x.connections).sum();
        let share: Vec<String> = BACKENDS
            .iter()
            .map(|(p, _)| {
                let n: u64 = reps
                    .iter()
                    .map(|x| x.backends.get(*p).copied().unwrap_or(0))
                    .sum();
                format!("{:.0}%", 100.0 * n as f64 / total.max(1) as f64)
            })
            .collect();
        let pair = |v: &[LoadReport]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}/{:.0}", med(v, &|x| x.p50_us), med(v, &|x| x.p99_us))
            }
        };
        let _ = writeln!(
            o,
            "{:<16} {:>8.0} {:>11.1} {:>16} {:>16} {:>7.1} {:>7}  {}",
            key.label(),
            med(reps, &LoadReport::rate),
            med(reps, &LoadReport::cpu_us_per_conn),
            pair(reps),
            pair(one),
            reps.iter().chain(one).map(|x| x.max_us).fold(0.0, f64::max) / 1000.0,
            errors,
            share.join("/")
        );
    }
    for (key, e) in &r.failed {
        let _ = writeln!(o, "{:<16} setup failed: {e}", key.label());
    }
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for reps in r.conn.iter().chain(&r.unloaded) {
        for x in reps {
            for (k, v) in &x.error_kinds {
                *kinds.entry(k.clone()).or_default() += v;
            }
        }
    }
    if !kinds.is_empty() {
        let _ = writeln!(o, "errors by kind (all beds): {kinds:?}");
    }

    let _ = writeln!(o, "\nconn/s per round:");
    for (i, (key, _)) in r.beds.iter().enumerate() {
        if key.mode == Mode::LbXdp {
            continue;
        }
        let v: Vec<String> = rate(i).iter().map(|x| format!("{x:>7.0}")).collect();
        let _ = writeln!(o, "  {:<16} {}", key.label(), v.join(" "));
    }

    // Targets, as per-round ratios.
    let big = s.counts.iter().copied().max().unwrap_or(0);
    let small = s.counts.iter().copied().min().unwrap_or(0);
    let per_round = |a: Option<usize>, b: Option<usize>| -> Vec<f64> {
        match (a, b) {
            (Some(a), Some(b)) => rate(a).iter().zip(rate(b)).map(|(x, y)| x / y).collect(),
            _ => Vec::new(),
        }
    };
    let big_s = thousands(u64::from(big));
    let mut targets = [
        Target {
            name: format!("lb / iptables   @{big_s}"),
            min: 1.4,
            values: per_round(find(Mode::Lb, big), find(Mode::Iptables, big)),
        },
        Target {
            name: format!("lb / nftables   @{big_s}"),
            min: 1.1,
            values: per_round(find(Mode::Lb, big), find(Mode::Nftables, big)),
        },
        Target {
            name: format!("lb @{big_s} / direct"),
            min: 0.9,
            values: per_round(find(Mode::Lb, big), find(Mode::Direct, 0)),
        },
        Target {
            name: format!("lb @{big_s} / lb @{}", thousands(u64::from(small))),
            min: 0.95,
            values: if big == small {
                Vec::new()
            } else {
                per_round(find(Mode::Lb, big), find(Mode::Lb, small))
            },
        },
    ];
    let _ = writeln!(o, "\ntargets (conn/s ratios computed per round; median [min..max]; PASS = target met, OVER = missed; a report, not an assertion):");
    for t in targets.iter_mut() {
        let m = median(&t.values);
        let (lo, hi) = min_max(&t.values);
        let range = if t.values.is_empty() {
            String::new()
        } else {
            format!("[{lo:.2}..{hi:.2}]")
        };
        let _ = writeln!(
            o,
            "  {:<32} {:>6.2} {:<13} target >= {:<5} {}",
            t.name,
            m,
            range,
            t.min,
            verdict(m, t.min)
        );
    }
    let _ = writeln!(o, "info (no target):");
    for &n in s.counts.iter().filter(|n| **n != big) {
        let ns = thousands(u64::from(n));
        for (name, a, b) in [
            (
                format!("lb / iptables   @{ns}"),
                find(Mode::Lb, n),
                find(Mode::Iptables, n),
            ),
            (
                format!("lb / nftables   @{ns}"),
                find(Mode::Lb, n),
                find(Mode::Nftables, n),
            ),
            (
                format!("lb @{ns} / direct"),
                find(Mode::Lb, n),
                find(Mode::Direct, 0),
            ),
        ] {
            let v = per_round(a, b);
            if !v.is_empty() {
                let _ = writeln!(o, "  {:<32} {:>6.2}", name, median(&v));
            }
        }
    }
    for m in [Mode::Iptables, Mode::Nftables] {
        if big == small {
            break;
        }
        let v = per_round(find(m, big), find(m, small));
        if !v.is_empty() {
            let _ = writeln!(
                o,
                "  {:<32} {:>6.2}",
                format!("{} @{big_s} / @{}", m.label(), thousands(u64::from(small))),
                median(&v)
            );
        }
    }
    let cpu_ratio = |a: Option<usize>, b: Option<usize>| -> Option<f64> {
        let (a, b) = (a?, b?);
        let c = |i: usize| {
            median(
                &r.conn[i]
                    .iter()
                    .map(LoadReport::cpu_us_per_conn)
                    .collect::<Vec<_>>(),
            )
        };
        Some(c(a) / c(b))
    };
    for m in [Mode::Iptables, Mode::Nftables, Mode::Direct] {
        if let Some(x) = cpu_ratio(find(Mode::Lb, big), find(m, big)) {
            let _ = writeln!(
                o,
                "  {:<32} {:>6.2}",
                format!("CPU/conn lb / {} @{big_s}", m.label()),
                x
            );
        }
    }
}

/// The report.
pub fn report(s: &Settings, r: &Results) -> String {
    let mut o = String::new();
    if s.conn {
        report_conn(s, r, &mut o);
    }
    let _ = writeln!(o, "\nprogramming time (per node, both nodes at once):");
    for (key, load) in &r.beds {
        if let Some(l) = load {
            let t: Vec<String> = l
                .per_node
                .iter()
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .collect();
            let _ = writeln!(
                o,
                "  {:<16} {:<52} {:<17} {}",
                key.label(),
                l.what,
                t.join(" / "),
                l.note
            );
        }
    }

    if s.pps {
        let _ = writeln!(
            o,
            "\n== NodePort packet rate: UDP from the external namespace to node1:{UDP_NODE_PORT} (externalTrafficPolicy Cluster: DNAT + SNAT, 2 local + 1 remote backend)"
        );
        let _ = writeln!(
            o,
            "   AF_PACKET sendmmsg, {} flows, {} sender threads, {} rounds x {:.1}s; delivered = rx packets of the backends' eth0;\n   CPU ns/pkt = whole machine (the generator's busy loop included) / delivered packets",
            s.pps_flows,
            s.pps_threads,
            s.rounds,
            s.pps_round.as_secs_f64()
        );
        let _ = writeln!(
            o,
            "\n{:<16} {:>12} {:>14} {:>12}  delivered web1/web2/web3",
            "mode", "sent pps", "delivered pps", "CPU ns/pkt"
        );
        let mut delivered: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
        for (key, samples) in &r.pps {
            let med =
                |f: &dyn Fn(&PpsSample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
            let tot: Vec<u64> = (0..BACKENDS.len())
                .map(|i| samples.iter().map(|x| x.per_backend[i]).sum())
                .collect();
            let all: u64 = tot.iter().sum::<u64>().max(1);
            let share: Vec<String> = tot
                .iter()
                .map(|t| format!("{:.0}%", 100.0 * *t as f64 / all as f64))
                .collect();
            let label = match key.mode {
                Mode::Lb => format!("{} (TC)", key.label()),
                Mode::LbXdp => format!("lb @{} (XDP)", thousands(u64::from(key.services))),
                _ => key.label(),
            };
            let _ = writeln!(
                o,
                "{:<16} {:>12.0} {:>14.0} {:>12.0}  {}",
                label,
                med(&|x| x.sent_pps),
                med(&|x| x.delivered_pps),
                med(&|x| x.cpu_ns_per_pkt),
                share.join("/")
            );
            delivered.insert(key.mode, samples.iter().map(|x| x.delivered_pps).collect());
        }
        if !delivered.contains_key(&Mode::LbXdp) {
            let _ = writeln!(
                o,
                "{:<16} {:>12} {:>14}  (slot: XDP on the uplink is not implemented yet; XDP_AGENT_ARGS in tests/src/bench/e2e.rs, then --xdp{})",
                "lb (XDP)",
                "-",
                "n/a",
                if s.xdp { "; --xdp was given" } else { "" }
            );
        }
        let ratio = |a: Mode, b: Mode| -> Vec<f64> {
            match (delivered.get(&a), delivered.get(&b)) {
                (Some(x), Some(y)) => x.iter().zip(y).map(|(x, y)| x / y).collect(),
                _ => Vec::new(),
            }
        };
        let _ = writeln!(
            o,
            "\ntargets (delivered pps ratios computed per round; median [min..max]):"
        );
        for (name, a, b, min) in [
            ("lb XDP / iptables", Mode::LbXdp, Mode::Iptables, 3.0),
            ("lb XDP / lb TC", Mode::LbXdp, Mode::Lb, 2.0),
        ] {
            let v = ratio(a, b);
            if v.is_empty() {
                let _ = writeln!(
                    o,
                    "  {:<32} {:>6} {:<13} target >= {:<5} n/a (XDP not implemented)",
                    name, "-", "", min
                );
            } else {
                let (lo, hi) = min_max(&v);
                let m = median(&v);
                let _ = writeln!(
                    o,
                    "  {:<32} {:>6.2} {:<13} target >= {:<5} {}",
                    name,
                    m,
                    format!("[{lo:.2}..{hi:.2}]"),
                    min,
                    verdict(m, min)
                );
            }
        }
        let _ = writeln!(o, "info (no target):");
        for (name, a, b) in [
            ("lb TC / iptables", Mode::Lb, Mode::Iptables),
            ("lb TC / nftables", Mode::Lb, Mode::Nftables),
            ("lb TC / direct", Mode::Lb, Mode::Direct),
        ] {
            let v = ratio(a, b);
            if !v.is_empty() {
                let (lo, hi) = min_max(&v);
                let _ = writeln!(o, "  {:<32} {:>6.2} [{lo:.2}..{hi:.2}]", name, median(&v));
            }
        }
    }

    let _ = writeln!(o, "\nafter the load:");
    for n in &r.notes {
        let _ = writeln!(o, "  {n}");
    }
    o
}
