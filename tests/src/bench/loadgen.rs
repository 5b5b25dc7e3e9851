//! The connection-rate load generator: one new TCP connection per HTTP
//! request (`Connection: close`, the server closes first, so the client
//! keeps no TIME_WAIT), `concurrency` requests in flight on a small tokio
//! runtime, for a warm-up and then a measured window.
//!
//! Runs as `lb-bench-e2e client ...` inside the client pod's namespace and
//! prints one JSON [`LoadReport`]: completed connections and errors in the
//! window, latency percentiles of each connection (connect, request,
//! response, close seen), which backend answered, and the whole machine's
//! CPU time over the window (/proc/stat).

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::cpu::{CpuDelta, CpuTimes};

/// What the client is asked to do.
#[derive(Clone, Debug)]
pub struct LoadOpts {
    /// Round-robin over these (one for a Service, the backends for "direct").
    pub targets: Vec<SocketAddrV4>,
    pub concurrency: usize,
    /// Runtime worker threads.
    pub threads: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Per connection, from connect to the server's close.
    pub timeout: Duration,
}

/// What one run measured (only connections that ended inside the window).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub connections: u64,
    pub errors: u64,
    pub window_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub cpu: CpuDelta,
    /// Answers per backend name (`backend=NAME` in the body).
    pub backends: BTreeMap<String, u64>,
    pub error_kinds: BTreeMap<String, u64>,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.window_s.max(1e-9)
    }

    /// Whole-machine CPU microseconds per completed connection.
    pub fn cpu_us_per_conn(&self) -> f64 {
        self.cpu.busy_s * 1e6 / (self.connections.max(1) as f64)
    }
}

const REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: lb-bench-e2e\r\nConnection: close\r\n\r\n";

#[derive(Default)]
struct TaskResult {
    latencies_us: Vec<u32>,
    errors: u64,
    backends: BTreeMap<String, u64>,
    error_kinds: BTreeMap<String, u64>,
}

/// One connection: connect, send the request, read until the server
/// closes; the backend's name from the body.
async fn one(target: SocketAddrV4, buf: &mut Vec<u8>) -> Result<String, &'static str> {
    let mut s = TcpStream::connect(target)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connect: refused",
            std::io::ErrorKind::ConnectionReset => "connect: reset",
            std::io::ErrorKind::TimedOut => "connect: timed out",
            std::io::ErrorKind::AddrNotAvailable => "connect: no local port",
            _ => "connect: other",
        })?;
    s.write_all(REQUEST).await.map_err(|_| "write")?;
    buf.clear();
    s.read_to_end(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionReset => "read: reset",
        _ => "read: other",
    })?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err("bad response");
    }
    let text = String::from_utf8_lossy(buf);
    let name = text
        .split("backend=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or("no backend= in body")?;
    Ok(name.to_string())
}

async fn task(
    index: usize,
    opts: LoadOpts,
    window_start: Instant,
    window_end: Instant,
) -> TaskResult {
    let mut r = TaskResult::default();
    let mut buf = Vec::with_capacity(512);
    let mut i = index;
    while Instant::now() < window_end {
        let target = opts.targets[i % opts.targets.len()];
        i += 1;
        let started = Instant::now();
        let res = timeout(opts.timeout, one(target, &mut buf)).await;
        let ended = Instant::now();
        if ended < window_start || ended > window_end {
            continue;
        }
        match res {
            Ok(Ok(name)) => {
                let us = (ended - started).as_micros().min(u128::from(u32::MAX)) as u32;
                r.latencies_us.push(us);
                *r.backends.entry(name).or_default() += 1;
            }
            Ok(Err(kind)) => {
                r.errors += 1;
                *r.error_kinds.entry(kind.to_string()).or_default() += 1;
            }
            Err(_) => {
                r.errors += 1;
                *r.error_kinds.entry("timeout".to_string()).or_default() += 1;
            }
        }
    }
    r
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

/// Runs the load and measures it.
pub fn run(opts: &LoadOpts) -> Result<LoadReport> {
    anyhow::ensure!(
        !opts.targets.is_empty() && opts.concurrency > 0,
        "nothing to do"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let start = Instant::now();
        let window_start = start + opts.warmup;
        let window_end = window_start + opts.duration;
        // The machine's CPU over exactly the window.
        let sampler = tokio::spawn(async move {
            tokio::time::sleep_until(window_start).await;
            let a = CpuTimes::read()?;
            let t0 = std::time::Instant::now();
            tokio::time::sleep_until(window_end).await;
            let b = CpuTimes::read()?;
            anyhow::Ok((a.until(&b), t0.elapsed().as_secs_f64()))
        });
        let tasks: Vec<_> = (0..opts.concurrency)
            .map(|i| tokio::spawn(task(i, opts.clone(), window_start, window_end)))
            .collect();
        let mut all = TaskResult::default();
        for t in tasks {
            let r = t.await?;
            all.latencies_us.extend(r.latencies_us);
            all.errors += r.errors;
            for (k, v) in r.backends {
                *all.backends.entry(k).or_default() += v;
            }
            for (k, v) in r.error_kinds {
                *all.error_kinds.entry(k).or_default() += v;
            }
        }
        let (cpu, window_s) = sampler.await??;
        all.latencies_us.sort_unstable();
        let l = &all.latencies_us;
        Ok(LoadReport {
            connections: l.len() as u64,
            errors: all.errors,
            window_s,
            p50_us: percentile(l, 0.50),
            p90_us: percentile(l, 0.90),
            p99_us: percentile(l, 0.99),
            max_us: l.last().copied().map(f64::from).unwrap_or(0.0),
            cpu,
            backends: all.backends,
            error_kinds: all.error_kinds,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_samples() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    /// Against a tiny HTTP server on loopback, in a private network
    /// namespace (no test traffic in the machine's own): every connection
    /// completes and names its backend.
    #[test]
    fn measures_a_local_server() {
        lb_tests::require_privileges!();
        lb_tests::netns::in_private_netns(measure_a_local_server);
    }

    fn measure_a_local_server() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { break };
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nbackend=local\n",
                );
            }
        });
        let r = run(&LoadOpts {
            targets: vec![addr],
            concurrency: 2,
            threads: 1,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            timeout: Duration::from_secs(2),
        })
        .unwrap();
        assert!(r.connections > 10, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.backends.get("local"), Some(&r.connections));
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us);
    }
}
