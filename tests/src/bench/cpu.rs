//! CPU time of the whole machine, from the `cpu` line of /proc/stat (not
//! namespaced: every process, every softirq of every network namespace).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The aggregate `cpu` counters of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
}

impl CpuTimes {
    pub fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&text)
    }

    fn parse(text: &str) -> Result<Self> {
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no cpu line")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Ok(Self {
            user: at(0),
            nice: at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
        })
    }

    /// CPU time spent between `self` (earlier) and `later`.
    pub fn until(&self, later: &CpuTimes) -> CpuDelta {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64 / hz;
        let user = d(self.user + self.nice, later.user + later.nice);
        let system = d(self.system, later.system);
        let softirq = d(self.softirq + self.irq, later.softirq + later.irq);
        let idle = d(self.idle + self.iowait, later.idle + later.iowait);
        let steal = d(self.steal, later.steal);
        CpuDelta {
            busy_s: user + system + softirq + steal,
            user_s: user,
            system_s: system,
            softirq_s: softirq,
            idle_s: idle,
        }
    }
}

/// Busy CPU seconds of the machine over an interval (all cores summed).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuDelta {
    /// user + nice + system + irq + softirq + steal
    pub busy_s: f64,
    pub user_s: f64,
    pub system_s: f64,
    /// irq + softirq (the packet path of every namespace lands here).
    pub softirq_s: f64,
    pub idle_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_aggregate_line() {
        let a = CpuTimes::parse("cpu  10 0 20 1000 5 1 3 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = CpuTimes::parse("cpu  110 0 70 1100 5 1 53 0 0 0\n").unwrap();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let d = a.until(&b);
        assert!((d.busy_s - 200.0 / hz).abs() < 1e-9);
        assert!((d.softirq_s - 50.0 / hz).abs() < 1e-9);
        assert!((d.idle_s - 100.0 / hz).abs() < 1e-9);
    }
}
