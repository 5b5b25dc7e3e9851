//! kube-proxy's own rule sets, generated from Services and EndpointSlices.
//!
//! No kube-proxy binary exists here, so the end-to-end bench writes what
//! kube-proxy's proxiers would write for the same objects the lb agent reads:
//!
//! - [`iptables`]: the `iptables-restore` input of kube-proxy's iptables
//!   proxier (`pkg/proxy/iptables/proxier.go`, `syncProxyRules`) plus the
//!   jump rules it ensures in the built-in chains;
//! - [`nftables`]: the `nft -f` transaction of kube-proxy's nftables proxier
//!   (`pkg/proxy/nftables/proxier.go`), in the form knftables dumps it.
//!
//! Chain names are kube-proxy's (sha256 + base32 of the service port name,
//! protocol and endpoint), so the output can be compared with kube-proxy's
//! own unit-test expectations (`TestOverallIPTablesRules`,
//! `TestOverallNFTablesRules`); the unit tests of both modules do that on a
//! two-service example.
//!
//! Covered: ClusterIP and NodePort service ports (TCP, UDP) with
//! `externalTrafficPolicy: Cluster`, ready endpoints, ports without any
//! endpoint (reject), `--cluster-cidr` masquerade, hairpin masquerade, and
//! the "large cluster" mode of the iptables proxier (no per-endpoint
//! comments above 1,000 endpoints). Not covered (refused with an error):
//! externalIPs, LoadBalancer ingress, session affinity, Local traffic
//! policies.

pub mod iptables;
pub mod nftables;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Node-level settings of kube-proxy that shape its rules.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--cluster-cidr`: ClusterIP traffic from outside it is masqueraded
    /// (kube-proxy's "local detector" by CIDR).
    pub cluster_cidr: String,
    /// The service CIDR (nftables: traffic to unallocated ClusterIPs is dropped).
    pub service_cidr: String,
    /// This node's addresses accepting NodePorts (nftables `nodeport-ips`;
    /// the iptables proxier matches `--dst-type LOCAL` instead).
    pub node_ips: Vec<Ipv4Addr>,
    /// `--iptables-masquerade-bit` 14.
    pub masquerade_mark: &'static str,
}

/// One endpoint of a service port, as kube-proxy's endpoints map holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    /// `ip:port`, kube-proxy's `BaseEndpointInfo.String()`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// One service port (kube-proxy's `ServicePortName` with its info).
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name ("" for an unnamed single port).
    pub port_name: String,
    /// "tcp" or "udp" (lower case, as kube-proxy writes it).
    pub protocol: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints, sorted by `ip:port` as kube-proxy's endpoints map is.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// `ns/name:port`, kube-proxy's `ServicePortName.String()`.
    pub fn name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// The service ports of `services` (in their order, ports in spec order)
/// with the ready endpoints of their EndpointSlices.
pub fn service_ports(services: &[Service], slices: &[EndpointSlice]) -> Result<Vec<ServicePort>> {
    // (namespace, service, port name, protocol) -> endpoints
    let mut endpoints: BTreeMap<(String, String, String, String), Vec<Endpoint>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        for p in slice.ports.iter().flatten() {
            let (Some(port), Some(proto)) = (p.port, p.protocol.as_deref()) else {
                continue;
            };
            let key = (
                ns.clone(),
                svc.clone(),
                p.name.clone().unwrap_or_default(),
                proto.to_ascii_lowercase(),
            );
            let list = endpoints.entry(key).or_default();
            for e in &slice.endpoints {
                // kube-proxy: a nil `ready` counts as ready.
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                for a in &e.addresses {
                    let ip: Ipv4Addr = a.parse().with_context(|| format!("endpoint {a}"))?;
                    let ep = Endpoint {
                        ip,
                        port: u16::try_from(port).context("endpoint port")?,
                    };
                    if !list.contains(&ep) {
                        list.push(ep);
                    }
                }
            }
        }
    }
    for list in endpoints.values_mut() {
        list.sort_by_key(Endpoint::addr);
    }

    let mut out = Vec::new();
    for s in services {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let name = s.metadata.name.clone().unwrap_or_default();
        let spec = s.spec.as_ref().context("service without spec")?;
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| *ip != "None") else {
            continue;
        };
        let cluster_ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("{ns}/{name}: clusterIP"))?;
        if spec.external_ips.as_ref().is_some_and(|v| !v.is_empty())
            || spec.session_affinity.as_deref() == Some("ClientIP")
            || spec.external_traffic_policy.as_deref() == Some("Local")
            || spec.internal_traffic_policy.as_deref() == Some("Local")
            || spec.type_.as_deref() == Some("LoadBalancer")
        {
            bail!(
                "{ns}/{name}: only ClusterIP/NodePort services with Cluster policies are generated"
            );
        }
        for p in spec.ports.iter().flatten() {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "tcp",
                "UDP" => "udp",
                other => bail!("{ns}/{name}: protocol {other} is not generated"),
            };
            let port_name = p.name.clone().unwrap_or_default();
            let key = (
                ns.clone(),
                name.clone(),
                port_name.clone(),
                protocol.to_string(),
            );
            out.push(ServicePort {
                namespace: ns.clone(),
                name: name.clone(),
                port_name,
                protocol,
                cluster_ip,
                port: u16::try_from(p.port).context("service port")?,
                node_port: p.node_port.map(u16::try_from).transpose()?,
                endpoints: endpoints.get(&key).cloned().unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

/// sha256, then base32 (RFC 4648 alphabet, as Go's `base32.StdEncoding`),
/// first `len` characters: how kube-proxy shortens names into chain names.
pub fn hash_prefix(input: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
    let bytes = digest.as_ref();
    let mut out = String::with_capacity(len);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < len {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
        if out.len() == len {
            break;
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::kubeproxy::ServicePort as Sp;

    /// The two services of the generators' unit tests, taken from
    /// kube-proxy's `TestOverallIPTablesRules`/`TestOverallNFTablesRules`:
    /// ns1/svc1 (ClusterIP 172.30.0.41:80, endpoint 10.180.0.1:80) and
    /// ns3/svc3 (NodePort 3003, ClusterIP 172.30.0.43:80, endpoint 10.180.0.3:80).
    pub(crate) fn two_services() -> (Config, Vec<Sp>) {
        use lb_tests::objects::{endpoint_slice, service, Endpoint as E, ServicePort, ServiceType};
        let p80 = [ServicePort::tcp("p80", 80, 80)];
        let np = [ServicePort::tcp("p80", 80, 80).node_port(3003)];
        let services = [
            service("svc1", "172.30.0.41".parse().unwrap())
                .namespace("ns1")
                .ports(&p80)
                .build(),
            service("svc3", "172.30.0.43".parse().unwrap())
                .namespace("ns3")
                .service_type(ServiceType::NodePort)
                .ports(&np)
                .build(),
        ];
        let slices = [
            endpoint_slice("svc1", "svc1-1")
                .namespace("ns1")
                .ports_of(&p80)
                .endpoint(E::new("10.180.0.1".parse().unwrap(), "node-a"))
                .build(),
            endpoint_slice("svc3", "svc3-1")
                .namespace("ns3")
                .ports_of(&np)
                .endpoint(E::new("10.180.0.3".parse().unwrap(), "node-b"))
                .build(),
        ];
        let cfg = Config {
            cluster_cidr: "10.0.0.0/8".into(),
            service_cidr: "172.30.0.0/16".into(),
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            masquerade_mark: "0x4000",
        };
        (cfg, service_ports(&services, &slices).unwrap())
    }

    #[test]
    fn chain_name_hashes_are_kube_proxys() {
        // From kube-proxy's unit tests.
        assert_eq!(hash_prefix("ns1/svc1:p80tcp", 16), "XPGD46QRK7WJZT7O");
        assert_eq!(
            hash_prefix("ns1/svc1:p80tcp10.180.0.1:80", 16),
            "SXIVWICOYRO3J4NJ"
        );
        assert_eq!(hash_prefix("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert_eq!(
            hash_prefix("ns1/svc1/tcp/p80__10.180.0.1/80", 8),
            "5OJB2KTY"
        );
    }

    /// Both layouts load into the kernel (a throwaway namespace), and
    /// iptables reads back what kube-proxy would find there.
    #[test]
    fn generated_rules_load_into_the_kernel() {
        lb_tests::require_privileges!();
        use std::time::Duration;
        let (cfg, mut ports) = two_services();
        // Several endpoints (statistic rules, numgen maps) and one without.
        ports[0].endpoints.push(Endpoint {
            ip: "10.180.0.2".parse().unwrap(),
            port: 80,
        });
        ports[1].endpoints.clear();
        let ns = lb_tests::netns::NamedNetns::create(&format!(
            "{}{}-kubeproxy",
            lb_tests::topology::NAME_PREFIX,
            std::process::id()
        ))
        .unwrap();
        let dir = std::env::temp_dir().join(format!("{}-kubeproxy-test", ns.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let ipt = dir.join("rules.iptables");
        let nft = dir.join("rules.nft");
        std::fs::write(&ipt, iptables::restore_input(&cfg, &ports)).unwrap();
        std::fs::write(&nft, nftables::transaction(&cfg, &ports)).unwrap();
        let run = |script: String| {
            lb_tests::topology::exec_in(ns.name(), &["sh", "-c", &script], Duration::from_secs(30))
                .unwrap()
                .ok()
        };
        let loaded = run(format!(
            "iptables-legacy-restore --noflush --counters < {} && iptables-legacy-save -t nat",
            ipt.display()
        ));
        let nft_loaded = run(format!(
            "nft -f {} && nft list table ip kube-proxy",
            nft.display()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let saved = loaded.unwrap();
        assert!(saved.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), "{saved}");
        assert!(
            saved.contains("--probability 0.50000000000 -j KUBE-SEP-"),
            "{saved}"
        );
        let listed = nft_loaded.unwrap();
        assert!(listed.contains("numgen random mod 2 vmap"), "{listed}");
        assert!(
            listed.contains("172.30.0.43 . tcp . 80 comment \"ns3/svc3:p80\" : goto reject-chain"),
            "{listed}"
        );
    }

    #[test]
    fn service_ports_take_ready_endpoints_sorted() {
        use lb_tests::objects::{endpoint_slice, service, Endpoint as E, ServicePort};
        let ports = [
            ServicePort::tcp("http", 80, 8080),
            ServicePort::udp("dns", 53, 53),
        ];
        let svc = service("web", "10.96.0.10".parse().unwrap())
            .ports(&ports)
            .build();
        let slice = endpoint_slice("web", "web-1")
            .ports_of(&ports)
            .endpoint(E::new("10.244.2.9".parse().unwrap(), "b"))
            .endpoint(E::new("10.244.1.10".parse().unwrap(), "a"))
            .endpoint(E::new("10.244.1.11".parse().unwrap(), "a").not_ready())
            .build();
        let sp = service_ports(&[svc], &[slice]).unwrap();
        assert_eq!(sp.len(), 2);
        assert_eq!(sp[0].name_string(), "default/web:http");
        assert_eq!(sp[1].protocol, "udp");
        let eps: Vec<String> = sp[0].endpoints.iter().map(Endpoint::addr).collect();
        assert_eq!(eps, ["10.244.1.10:8080", "10.244.2.9:8080"]);
    }
}
