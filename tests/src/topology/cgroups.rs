//! One cgroup v2 directory per emulated node, for socket-level load
//! balancing (F2): each node's agent attaches its cgroup hooks there
//! (`--cgroup-path`), and "host processes" of a node run in the node's
//! network namespace *and* that cgroup (`<node>:host` as a host name of
//! [`Topology::exec`] and friends).
//!
//! Every agent of a topology gets its node's cgroup, so no test agent ever
//! attaches to the machine's own cgroup root. The cgroups live under
//! `<cgroup2 mount>/lbt<pid>-<n>/<node>` (the mount found in
//! /proc/self/mountinfo, never assumed) and are removed with the topology:
//! their processes killed (`cgroup.kill`), then the directories. Leftovers of
//! a crashed run are removed by [`cleanup_stale_cgroups`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::processes::stale_owner;

/// The root of the cgroup v2 hierarchy: the first cgroup2 mount point in
/// /proc/self/mountinfo whose directory is the hierarchy's root (the kernel
/// gives every cgroup but the root a `cgroup.events` file). `None` when
/// there is none (socket LB is then off in tests).
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup2")).then_some(())?;
            Some(PathBuf::from(left.split(' ').nth(4)?.replace("\\040", " ")))
        })
        .find(|p| p.is_dir() && !p.join("cgroup.events").exists())
}

/// Creates the cgroup `dir` (and its parents).
pub(super) fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the cgroup {}", dir.display()))
}

/// The pids in a cgroup (empty when it is gone).
fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process of the cgroup `dir` and of its children, then
/// removes them all, deepest first.
pub(super) fn remove(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove(&e.path())?;
            }
        }
    }
    // cgroup.kill (5.14+) kills the whole subtree at once; SIGKILL each pid
    // as a fallback.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in pids(dir) {
            // SAFETY: kill(2) on a pid read from the cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "removing the cgroup {}: {e} (pids left: {:?})",
                    dir.display(),
                    pids(dir)
                )
            }
            // EBUSY until the killed processes are reaped.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes the topology cgroups of runs whose process is gone.
pub fn cleanup_stale_cgroups() {
    let Some(root) = cgroup2_root() else { return };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if stale_owner(&name).is_some() && e.path().is_dir() {
            eprintln!("removing stale cgroup {}", e.path().display());
            if let Err(err) = remove(&e.path()) {
                eprintln!("warning: {err:#}");
            }
        }
    }
}

/// The shell script that puts itself into a cgroup and then runs a command
/// in a network namespace: `sh -c SCRIPT sh <cgroup.procs> <netns path>
/// argv...`. Writing `$$` before `exec` makes every process of the command
/// a member from its first instruction on (children inherit the cgroup).
pub(super) const ENTER_SCRIPT: &str =
    r#"procs=$1; net=$2; shift 2; echo $$ > "$procs" && exec nsenter --net="$net" -- "$@""#;
