//! Processes of a topology: commands run to completion with a timeout,
//! background processes with their logs (killed with the topology, and when
//! the thread that spawned them dies), and the cleanup of what crashed runs
//! left behind.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::cgroups::{cleanup_stale_cgroups, ENTER_SCRIPT};
use super::{Topology, BPFFS_ROOT, HOST_SUFFIX, NAME_PREFIX};
use crate::artifacts;
use crate::netns::kill_processes_in;

/// The result of a command run with a timeout.
#[derive(Debug)]
pub struct Output {
    /// `None` when the command was killed at its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Stdout when the command succeeded, an error with everything otherwise.
    pub fn ok(self) -> Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(anyhow!(
                "`{}` {}: stdout: {:?} stderr: {:?}",
                self.command,
                match self.status {
                    Some(s) => format!("failed ({s})"),
                    None => "timed out".to_string(),
                },
                self.stdout.trim(),
                self.stderr.trim()
            ))
        }
    }
}

/// A spawned background process, killed when the topology goes.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) child: Child,
    pub(super) log: PathBuf,
    /// Set for agents: the node they serve (stopped with SIGTERM first).
    pub(super) agent_of: Option<String>,
}

/// Debian's python3 (installed by `cargo xtask setup`): no version-manager shims.
pub(super) fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Own process group, and SIGKILL when the spawning thread dies.
pub(super) fn background(c: &mut Command) {
    c.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

pub(super) fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain kill(2) on the group we created for this child.
        unsafe {
            libc::kill(-(child.id() as i32), libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

/// SIGTERM, wait up to `grace`, then SIGKILL. The exit status if it exited in time.
pub(super) fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_group(child);
    None
}

/// The last `n` lines of `text`.
pub(super) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `argv` with a timeout, capturing stdout and stderr.
pub fn run(argv: &[&str], timeout: Duration) -> Result<Output> {
    let command = argv.join(" ");
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.process_group(0);
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run `{command}`"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            kill_group(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        command,
    })
}

/// `ip netns exec NETNS argv...` with a timeout.
pub fn exec_in(netns: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
    let mut full = vec!["ip", "netns", "exec", netns];
    full.extend_from_slice(argv);
    run(&full, timeout)
}

/// [`exec_in`] with 30 s: stdout on success, an error otherwise.
pub(super) fn exec_ok(netns: &str, argv: &[&str]) -> Result<String> {
    exec_in(netns, argv, Duration::from_secs(30))?.ok()
}

impl Topology {
    /// The argv that runs a command as host `who`: `ip netns exec NETNS` for a
    /// node, pod, `ext` or `lan`; for `<node>:host` the node's namespace
    /// (`nsenter --net`) inside the node's cgroup.
    pub(super) fn host_prefix(&self, who: &str) -> Vec<String> {
        match who.strip_suffix(HOST_SUFFIX) {
            Some(node) => self.cgroup_prefix(node, node),
            None => ["ip", "netns", "exec"]
                .iter()
                .map(|s| s.to_string())
                .chain([self.netns(who)])
                .collect(),
        }
    }

    /// The argv that runs a command in the network namespace of host `who`
    /// and in the cgroup of `node`.
    fn cgroup_prefix(&self, node: &str, who: &str) -> Vec<String> {
        let cgroup = self.node(node).cgroup.as_ref().unwrap_or_else(|| {
            panic!("{node} has no cgroup: this machine has no cgroup v2 hierarchy")
        });
        vec![
            "sh".to_string(),
            "-c".to_string(),
            ENTER_SCRIPT.to_string(),
            "sh".to_string(),
            cgroup.join("cgroup.procs").to_string_lossy().into_owned(),
            format!("/run/netns/{}", self.netns(who)),
        ]
    }

    /// Runs `argv` as host `who` (node, pod, `ext`, `<node>:host`).
    pub fn exec(&self, who: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
        let prefix = self.host_prefix(who);
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(argv);
        run(&full, timeout)
    }

    /// Runs `argv` in the network namespace of host `who` but inside the
    /// cgroup of `node` (e.g. a pod's process under the node's cgroup hooks,
    /// as every pod is below the cgroup v2 root on a real node).
    pub fn exec_in_cgroup_of(
        &self,
        node: &str,
        who: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let prefix = self.cgroup_prefix(node, who);
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(argv);
        run(&full, timeout)
    }

    /// Like [`exec`](Self::exec), stdout on success, an error otherwise.
    pub fn sh(&self, who: &str, script: &str) -> Result<String> {
        self.exec(who, &["sh", "-c", script], Duration::from_secs(30))?
            .ok()
    }

    /// Spawns a background process in `who`'s namespace (its own process group,
    /// killed with the topology and when the spawning thread dies). Output goes
    /// to `<dir>/<name>.log`.
    pub fn spawn(&self, who: &str, name: &str, argv: &[&str]) -> Result<()> {
        let prefix = self.host_prefix(who);
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(argv);
        self.spawn_raw(name, &full, None)
    }

    /// Spawns `argv` as it is (no namespace switch), logging to `<dir>/<name>.log`.
    pub(super) fn spawn_raw(
        &self,
        name: &str,
        argv: &[&str],
        agent_of: Option<&str>,
    ) -> Result<()> {
        let log = self.log_path(name);
        let file = std::fs::File::create(&log)?;
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        background(&mut c);
        let child = c
            .spawn()
            .with_context(|| format!("spawning {}", argv.join(" ")))?;
        self.procs.lock().unwrap().push(Proc {
            name: name.to_string(),
            child,
            log,
            agent_of: agent_of.map(str::to_string),
        });
        Ok(())
    }

    pub(super) fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The log of a process spawned under `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Fails when the process spawned as `name` has exited.
    pub fn check_running(&self, name: &str) -> Result<()> {
        let mut procs = self.procs.lock().unwrap();
        let p = procs
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("no process {name}"))?;
        if let Some(status) = p.child.try_wait()? {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            bail!("{name} exited ({status}); its log:\n{}", tail(&log, 40));
        }
        Ok(())
    }

    /// (name, log file) of every process spawned and not stopped.
    pub(super) fn process_logs(&self) -> Vec<(String, PathBuf)> {
        self.procs
            .lock()
            .map(|p| p.iter().map(|p| (p.name.clone(), p.log.clone())).collect())
            .unwrap_or_default()
    }

    /// Stops every process: agents first and gracefully (they leave their
    /// pinned state, cleaned up afterwards), then everything is killed.
    pub(super) fn stop_processes(&mut self) {
        let mut procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|e| e.into_inner()));
        for p in procs.iter_mut().filter(|p| p.agent_of.is_some()) {
            terminate(&mut p.child, Duration::from_secs(5));
        }
        for p in procs.iter_mut() {
            kill_group(&mut p.child);
        }
    }
}

/// Runs `lb-agent --cleanup` for a pin directory (inside the node's namespace
/// when it still exists), then removes the directory.
pub(super) fn cleanup_pins(bpffs: &Path, netns: Option<&str>) {
    if !bpffs.exists() {
        return;
    }
    let agent = artifacts::lb_agent_bin();
    if agent.exists() {
        let agent_s = agent.to_string_lossy();
        let bpffs_s = bpffs.to_string_lossy();
        let net = netns
            .filter(|ns| Path::new("/run/netns").join(ns).exists())
            .map(|ns| format!("--net=/run/netns/{ns}"));
        let mut argv: Vec<&str> = Vec::new();
        if let Some(net) = &net {
            argv.extend_from_slice(&["nsenter", net, "--"]);
        }
        argv.extend_from_slice(&[&agent_s, "--cleanup", "--bpffs", &bpffs_s]);
        match run(&argv, Duration::from_secs(20)) {
            Ok(o) if o.success() => {}
            Ok(o) => eprintln!("warning: {}: {}", o.command, o.stderr.trim()),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    if let Err(e) = std::fs::remove_dir_all(bpffs) {
        if bpffs.exists() {
            eprintln!("warning: removing {}: {e}", bpffs.display());
        }
    }
}

/// The pid in a name `lbt<pid>-...` when that process is gone (a crashed run).
pub(super) fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('-') {
        return None;
    }
    let pid: u32 = digits.parse().ok()?;
    let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
    (!alive).then_some(pid)
}

/// Removes namespaces, pin directories, cgroups and temp directories left by
/// runs whose process is gone.
pub fn cleanup_stale() {
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| stale_owner(n).is_some())
                .collect()
        })
        .unwrap_or_default();
    if let Ok(d) = std::fs::read_dir(BPFFS_ROOT) {
        for e in d.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale_owner(&name).is_some() {
                eprintln!("removing stale pin directory {}", e.path().display());
                cleanup_pins(&e.path(), Some(&name));
            }
        }
    }
    // After the pins (their cgroup links are detached by then).
    cleanup_stale_cgroups();
    for ns in &netns {
        eprintln!("removing stale network namespace {ns}");
        kill_processes_in(ns);
        let _ = super::links::ip(&["netns", "del", ns]);
    }
    if let Ok(d) = std::fs::read_dir(std::env::temp_dir()) {
        for e in d.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale_owner(&name).is_some() && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_dead_owners() {
        let me = std::process::id();
        assert_eq!(stale_owner(&format!("lbt{me}-0-lan")), None);
        assert_eq!(stale_owner("lbt4000000000-0-lan"), Some(4_000_000_000));
        assert_eq!(stale_owner("lbtx-lan"), None);
        assert_eq!(stale_owner("lb"), None);
        assert_eq!(stale_owner("lbt123"), None);
    }
}
