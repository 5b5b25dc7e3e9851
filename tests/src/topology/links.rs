//! The network of a topology: namespaces, the lan bridge, node uplinks,
//! each node's cni0 bridge and its pods' veths, host-gw routes between the
//! nodes' pod CIDRs, and the kubeadm-like settings of every node.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::processes::{exec_ok, run};
use super::{Node, Pod, Topology, API_SERVER_IP, BPFFS_ROOT, EXTERNAL_IP, EXTERNAL_IP_2};
use crate::netns::NamedNetns;

/// `ip ARGS...` (in the root namespace; `-n NS` reaches into one).
pub(super) fn ip(args: &[&str]) -> Result<()> {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    run(&argv, Duration::from_secs(30))?.ok().map(|_| ())
}

fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(settings);
    exec_ok(netns, &argv).map(|_| ())
}

/// What kubeadm leaves on a node that matters to a datapath: forwarding on,
/// bridged frames through iptables (br_netfilter; its sysctls are per
/// namespace) and the FORWARD rule dropping conntrack-INVALID packets.
fn make_kubeadm_like(netns: &str) -> Result<()> {
    sysctl(
        netns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.bridge.bridge-nf-call-iptables=1",
        ],
    )?;
    exec_ok(
        netns,
        &[
            "iptables",
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

/// A veth pair: `outer` in namespace `from`, its peer `eth0` in `into`.
fn veth_to_eth0(from: &str, outer: &str, into: &str) -> Result<()> {
    veth_pair(from, outer, into, "eth0")
}

/// A veth pair: `outer` in namespace `from`, its peer `inner` in `into`.
fn veth_pair(from: &str, outer: &str, into: &str, inner: &str) -> Result<()> {
    ip(&[
        "-n", from, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", into,
    ])
}

fn add_address(netns: &str, cidr: &str, dev: &str) -> Result<()> {
    ip(&["-n", netns, "addr", "add", cidr, "dev", dev])
}

fn link_up(netns: &str, dev: &str) -> Result<()> {
    ip(&["-n", netns, "link", "set", dev, "up"])
}

impl Topology {
    /// Builds the lan, the nodes with their pods, the routes and the
    /// external client.
    pub(super) fn create(&mut self, spec: &[(String, Vec<String>)]) -> Result<()> {
        let lan = self.lan.clone();
        self.add_netns(&lan)?;
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        link_up(&lan, "br0")?;
        // Where a fake API server listens (cluster-mode tests).
        add_address(&lan, &format!("{API_SERVER_IP}/24"), "br0")?;
        if self.second_lan.is_some() {
            ip(&["-n", &lan, "link", "add", "br1", "type", "bridge"])?;
            link_up(&lan, "br1")?;
        }

        for (i, (name, pods)) in spec.iter().enumerate() {
            let index = u8::try_from(i + 1).expect("at most 200 nodes");
            let node = Node {
                name: name.clone(),
                netns: format!("{}{name}", self.prefix),
                index,
                address: Ipv4Addr::new(198, 18, 0, 10 + index),
                gateway: Ipv4Addr::new(10, 244, index, 1),
                pod_cidr: format!("10.244.{index}.0/24"),
                bpffs: Path::new(BPFFS_ROOT).join(format!("{}{name}", self.prefix)),
                uplink: "eth0".to_string(),
                second_uplink: self
                    .second_lan
                    .as_ref()
                    .is_some_and(|on| on.is_empty() || on.contains(name))
                    .then(|| ("eth1".to_string(), Ipv4Addr::new(198, 19, 0, 10 + index))),
                cgroup: self.cgroup.as_ref().map(|c| c.join(name)),
            };
            self.add_node(&node)?;
            self.nodes.push(node);
            for pod_name in pods {
                self.add_pod(name, pod_name)?;
            }
        }
        // host-gw routes between the nodes' pod CIDRs.
        for a in &self.nodes {
            for b in &self.nodes {
                if a.index != b.index {
                    ip(&[
                        "-n",
                        &a.netns,
                        "route",
                        "add",
                        &b.pod_cidr,
                        "via",
                        &b.address.to_string(),
                    ])?;
                }
            }
        }
        if let Some(ext) = self.external.clone() {
            self.add_netns(&ext)?;
            veth_to_eth0(&lan, "ext", &ext)?;
            ip(&["-n", &lan, "link", "set", "ext", "master", "br0", "up"])?;
            add_address(&ext, &format!("{EXTERNAL_IP}/24"), "eth0")?;
            link_up(&ext, "eth0")?;
            if self.second_lan.is_some() {
                veth_pair(&lan, "ext2", &ext, "eth1")?;
                ip(&["-n", &lan, "link", "set", "ext2", "master", "br1", "up"])?;
                add_address(&ext, &format!("{EXTERNAL_IP_2}/24"), "eth1")?;
                link_up(&ext, "eth1")?;
            }
        }
        // rp_filter off on every interface of the nodes (max(all, iface) applies).
        for n in &self.nodes {
            exec_ok(
                &n.netns,
                &[
                    "sh",
                    "-c",
                    "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
                ],
            )?;
        }
        Ok(())
    }

    /// A node: its namespace made like kubeadm's, the uplink `eth0` whose
    /// peer (`n<index>`) is on the lan bridge, the second uplink `eth1`
    /// (peer `m<index>` on br1) with a second lan, and the cni0 bridge.
    fn add_node(&mut self, node: &Node) -> Result<()> {
        let (lan, netns) = (self.lan.clone(), node.netns.as_str());
        if let Some(cg) = &node.cgroup {
            super::cgroups::create(cg)?;
        }
        self.add_netns(netns)?;
        make_kubeadm_like(netns)?;
        let lan_port = format!("n{}", node.index);
        veth_to_eth0(&lan, &lan_port, netns)?;
        ip(&["-n", &lan, "link", "set", &lan_port, "master", "br0", "up"])?;
        add_address(netns, &format!("{}/24", node.address), "eth0")?;
        link_up(netns, "eth0")?;
        if let Some((dev, addr)) = &node.second_uplink {
            let lan_port = format!("m{}", node.index);
            veth_pair(&lan, &lan_port, netns, dev)?;
            ip(&["-n", &lan, "link", "set", &lan_port, "master", "br1", "up"])?;
            add_address(netns, &format!("{addr}/24"), dev)?;
            link_up(netns, dev)?;
        }
        ip(&["-n", netns, "link", "add", "cni0", "type", "bridge"])?;
        add_address(netns, &format!("{}/24", node.gateway), "cni0")?;
        link_up(netns, "cni0")
    }

    /// Adds a pod to `node`'s cni0 (also while agents run: they attach to its
    /// veth as it appears). Pod k of a node gets 10.244.<node>.<k+2>.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        if self.pods.iter().any(|p| p.name == name) || self.nodes.iter().any(|n| n.name == name) {
            bail!("duplicate name {name}");
        }
        let n = self.node(node).clone();
        let used: std::collections::BTreeSet<Ipv4Addr> = self.pods.iter().map(|p| p.ip).collect();
        let host = (2..=250u8)
            .find(|h| !used.contains(&Ipv4Addr::new(10, 244, n.index, *h)))
            .ok_or_else(|| anyhow!("node {node}: no free pod address"))?;
        let pod = Pod {
            name: name.to_string(),
            node: node.to_string(),
            netns: format!("{}{node}-{name}", self.prefix),
            ip: Ipv4Addr::new(10, 244, n.index, host),
            host_iface: format!("veth{host}"),
        };
        self.add_netns(&pod.netns)?;
        let h = &pod.host_iface;
        veth_to_eth0(&n.netns, h, &pod.netns)?;
        ip(&["-n", &n.netns, "link", "set", h, "master", "cni0", "up"])?;
        add_address(&pod.netns, &format!("{}/24", pod.ip), "eth0")?;
        link_up(&pod.netns, "eth0")?;
        ip(&[
            "-n",
            &pod.netns,
            "route",
            "add",
            "default",
            "via",
            &n.gateway.to_string(),
        ])?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Removes a pod: its processes, its namespace and so its veth.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name}"))?;
        let pod = self.pods.remove(i);
        match self.namespaces.iter().position(|n| n.name() == pod.netns) {
            Some(i) => Ok(self.namespaces.remove(i).delete()?),
            None => bail!("pod {name} has no namespace"),
        }
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        self.namespaces.push(NamedNetns::create(name)?);
        // IPv6 off: keeps captures quiet (no DAD, no router solicitations).
        let _ = sysctl(
            name,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        Ok(())
    }

    /// Adds a route in `who`'s namespace (e.g. an external IP via a node).
    pub fn add_route(&self, who: &str, cidr: &str, via: Ipv4Addr) -> Result<()> {
        ip(&[
            "-n",
            &self.netns(who),
            "route",
            "add",
            cidr,
            "via",
            &via.to_string(),
        ])
    }
}
