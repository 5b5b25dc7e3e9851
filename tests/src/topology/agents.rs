//! The agents of a topology: one `lb-agent` per node inside its network
//! namespace (its own pin directory), fed by a manifest file or by a fake
//! API server on the lan; `lbctl` on a node; waiting until a frontend has
//! the backends a test expects; and what a failed test prints.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fake_apiserver::FakeApiServer;

use super::processes::{kill_group, run, tail, terminate};
use super::{Topology, AGENT_TIMEOUT, API_SERVER_IP};
use crate::artifacts;
use crate::netns::bind_in_netns;

/// A frontend as `lbctl services -o json` reports it. `address: None` is a NodePort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub protocol: &'static str,
}

impl Frontend {
    pub fn tcp(address: Ipv4Addr, port: u16) -> Self {
        Frontend {
            address: Some(address),
            port,
            protocol: "TCP",
        }
    }
    pub fn udp(address: Ipv4Addr, port: u16) -> Self {
        Frontend {
            address: Some(address),
            port,
            protocol: "UDP",
        }
    }
    pub fn node_port(port: u16, protocol: &'static str) -> Self {
        Frontend {
            address: None,
            port,
            protocol,
        }
    }

    fn matches(&self, svc: &serde_json::Value) -> bool {
        let port_ok = svc["port"].as_u64() == Some(u64::from(self.port));
        let proto_ok = svc["protocol"]
            .as_str()
            .is_some_and(|p| p.eq_ignore_ascii_case(self.protocol));
        let addr_ok = match self.address {
            Some(a) => svc["address"].as_str() == Some(a.to_string().as_str()),
            None => svc["kind"].as_str() == Some("NodePort"),
        };
        port_ok && proto_ok && addr_ok
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            Some(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            None => write!(f, "<nodeport>:{}/{}", self.port, self.protocol),
        }
    }
}

impl Topology {
    /// Where the manifest of `node`'s agent is.
    pub fn manifest_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("manifest-{node}.yaml"))
    }

    /// Writes `yaml` as the manifest of every node (atomically: the agents poll).
    pub fn write_manifests(&self, yaml: &str) -> Result<()> {
        for n in &self.nodes {
            let path = self.manifest_path(&n.name);
            let tmp = path.with_extension("yaml.tmp");
            std::fs::write(&tmp, yaml)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Starts a fake API server on the lan ([`API_SERVER_IP`]:6443, inside the
    /// lan namespace) and switches the agents to cluster mode with a
    /// kubeconfig for it.
    pub fn start_api_server(&self) -> Result<FakeApiServer> {
        let listener = bind_in_netns(
            Some(&self.lan),
            std::net::SocketAddr::from((API_SERVER_IP, 6443)),
        );
        let server = FakeApiServer::start(listener);
        let kubeconfig = server.write_kubeconfig(&self.dir);
        *self.kubeconfig.lock().unwrap() = Some(kubeconfig);
        Ok(server)
    }

    /// Starts one agent per node (cluster mode after [`Topology::start_api_server`]).
    pub fn start_all_agents(&self) -> Result<()> {
        for n in &self.nodes {
            self.start_agent(&n.name, &[])?;
        }
        Ok(())
    }

    /// Writes the manifests and starts one agent per node.
    pub fn start_agents(&self, yaml: &str) -> Result<()> {
        self.write_manifests(yaml)?;
        for n in &self.nodes {
            self.start_agent(&n.name, &[])?;
        }
        Ok(())
    }

    /// Starts `lb-agent` for `node` inside its network namespace with
    /// `nsenter --net` (the root mount namespace, so /sys/fs/bpf is the real one).
    pub fn start_agent(&self, node: &str, extra_args: &[&str]) -> Result<()> {
        let n = self.node(node).clone();
        let agent = artifacts::lb_agent_bin();
        if !agent.exists() {
            bail!(
                "the agent {} does not exist: run `cargo xtask build` (or `cargo xtask test`)",
                agent.display()
            );
        }
        let (source_flag, source) = match self.kubeconfig.lock().unwrap().clone() {
            Some(k) => ("--kubeconfig", k),
            None => ("--manifest", self.manifest_path(node)),
        };
        let net = format!("--net=/run/netns/{}", n.netns);
        let agent_s = agent.to_string_lossy();
        let source_s = source.to_string_lossy();
        let bpffs_s = n.bpffs.to_string_lossy();
        let mut argv = vec![
            "nsenter",
            net.as_str(),
            "--",
            &agent_s,
            source_flag,
            &source_s,
            "--node-name",
            node,
            "--uplink",
            &n.uplink,
            "--bpffs",
            &bpffs_s,
        ];
        // F2: the node's own cgroup, never the machine's cgroup root.
        let cgroup_s = n.cgroup.as_ref().map(|c| c.to_string_lossy().into_owned());
        let socket_lb_given = extra_args
            .iter()
            .any(|a| a.starts_with("--cgroup-path") || *a == "--no-socket-lb");
        if !socket_lb_given {
            match &cgroup_s {
                Some(c) => argv.extend_from_slice(&["--cgroup-path", c]),
                None => argv.push("--no-socket-lb"),
            }
        }
        argv.extend_from_slice(extra_args);
        let name = format!("agent-{node}");
        {
            let mut procs = self.procs.lock().unwrap();
            if let Some(old) = procs.iter_mut().find(|p| p.name == name) {
                if old.child.try_wait()?.is_none() {
                    bail!("the agent of {node} is already running");
                }
            }
            procs.retain(|p| p.name != name);
        }
        // A restarted agent logs to the same file name; keep the old log.
        let log = self.log_path(&name);
        if log.exists() {
            let mut i = 1;
            while self.dir.join(format!("{name}.{i}.log")).exists() {
                i += 1;
            }
            std::fs::rename(&log, self.dir.join(format!("{name}.{i}.log")))?;
        }
        self.spawn_raw(&name, &argv, Some(node))
    }

    /// Stops `node`'s agent with SIGTERM (pinned state stays); error if it
    /// does not exit within 10 s or exits non-zero.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        let name = format!("agent-{node}");
        let mut procs = self.procs.lock().unwrap();
        let i = procs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no agent for {node}"))?;
        let mut p = procs.remove(i);
        drop(procs);
        let status = terminate(&mut p.child, Duration::from_secs(10));
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!("agent of {node} exited with {s}"),
            None => bail!("agent of {node} did not stop within 10 s of SIGTERM"),
        }
    }

    /// Kills `node`'s agent with SIGKILL (no chance to clean anything up)
    /// and reaps it.
    pub fn kill_agent(&self, node: &str) -> Result<()> {
        let name = format!("agent-{node}");
        let mut procs = self.procs.lock().unwrap();
        let i = procs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no agent for {node}"))?;
        let mut p = procs.remove(i);
        drop(procs);
        if p.child.try_wait()?.is_some() {
            bail!("the agent of {node} had already exited");
        }
        // The agent is the child itself (nsenter execs it), alone in its
        // process group.
        kill_group(&mut p.child);
        Ok(())
    }

    /// Runs `lbctl ARGS --bpffs <node's pin dir>` in the node's namespace.
    pub fn lbctl(&self, node: &str, args: &[&str]) -> Result<String> {
        let n = self.node(node);
        let lbctl = artifacts::lbctl_bin();
        let net = format!("--net=/run/netns/{}", n.netns);
        let lbctl_s = lbctl.to_string_lossy();
        let bpffs_s = n.bpffs.to_string_lossy();
        let mut argv = vec!["nsenter", net.as_str(), "--", &lbctl_s];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--bpffs", &bpffs_s]);
        run(&argv, Duration::from_secs(15))?.ok()
    }

    /// `lbctl WHAT -o json` parsed.
    pub fn lbctl_json(&self, node: &str, what: &str) -> Result<serde_json::Value> {
        let out = self.lbctl(node, &[what, "-o", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("lbctl {what} -o json printed {out:?}"))
    }

    /// Polls `lbctl services -o json` on `node` until `frontend` is there with
    /// exactly `backends` (address:port); fails fast if the agent died.
    pub fn wait_for_backends(
        &self,
        node: &str,
        frontend: &Frontend,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        let mut want: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        want.sort();
        let mut last;
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            match self.lbctl_json(node, "services") {
                Ok(services) => {
                    let svc = services
                        .as_array()
                        .and_then(|a| a.iter().find(|s| frontend.matches(s)));
                    match svc {
                        Some(svc) => {
                            let mut have: Vec<String> = svc["backends"]
                                .as_array()
                                .map(|bs| {
                                    bs.iter()
                                        .map(|b| {
                                            format!(
                                                "{}:{}",
                                                b["address"].as_str().unwrap_or("?"),
                                                b["port"]
                                            )
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            have.sort();
                            if have == want {
                                return Ok(());
                            }
                            last = format!("{frontend} has backends {have:?}");
                        }
                        None => last = format!("{frontend} not in lbctl services"),
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            self.check_running(&format!("agent-{node}"))?;
            if Instant::now() >= deadline {
                bail!(
                    "{node}: {frontend} did not get backends {want:?} within {AGENT_TIMEOUT:?}; last: {last}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The row of `frontend` in `lbctl services -o json` on `node`, if any.
    pub fn frontend_row(
        &self,
        node: &str,
        frontend: &Frontend,
    ) -> Result<Option<serde_json::Value>> {
        let services = self.lbctl_json(node, "services")?;
        Ok(services
            .as_array()
            .and_then(|a| a.iter().find(|s| frontend.matches(s)))
            .cloned())
    }

    /// Polls `lbctl services -o json` on `node` until the row of `frontend`
    /// satisfies `ready` (a flag, its node-local backends, an affinity
    /// timeout...); returns that row. `what` names the condition in the
    /// error. Fails fast if the agent died.
    pub fn wait_for_frontend(
        &self,
        node: &str,
        frontend: &Frontend,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let last = match self.frontend_row(node, frontend) {
                Ok(Some(row)) if ready(&row) => return Ok(row),
                Ok(Some(row)) => row.to_string(),
                Ok(None) => format!("{frontend} not in lbctl services"),
                Err(e) => format!("{e:#}"),
            };
            self.check_running(&format!("agent-{node}"))?;
            if Instant::now() >= deadline {
                bail!("{node}: {frontend}: not {what} within {AGENT_TIMEOUT:?}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`wait_for_backends`](Self::wait_for_backends) on every node.
    pub fn wait_for_backends_everywhere(
        &self,
        frontend: &Frontend,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        for n in &self.nodes {
            self.wait_for_backends(&n.name, frontend, backends)?;
        }
        Ok(())
    }

    /// What a failing test should show: agent logs, lbctl views, addresses.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for (name, log) in self.process_logs() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = writeln!(
                s,
                "---- log of {name} (last lines) ----\n{}",
                tail(&text, 30)
            );
        }
        if artifacts::lbctl_bin().exists() {
            for n in &self.nodes {
                if !n.bpffs.exists() {
                    continue;
                }
                for what in ["services", "stats", "conntrack"] {
                    let out = self
                        .lbctl(&n.name, &[what])
                        .unwrap_or_else(|e| format!("{e:#}"));
                    let _ = writeln!(s, "---- {}: lbctl {what} ----\n{}", n.name, tail(&out, 40));
                }
            }
        }
        s
    }
}
