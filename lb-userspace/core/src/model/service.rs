//! One Service -> its validated input ([`ParsedService`]): ports, frontend
//! addresses and flags, with what is wrong with it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use lb_common::{service_flags, MAX_NAME_LEN, MAX_PORT_NAME_LEN};

use super::{
    is_foreign, port_number, quoted, ObjectError, ObjectKind, ObjectRef, Reporter,
    DEFAULT_AFFINITY_TIMEOUT_SEC, MAX_AFFINITY_TIMEOUT_SEC, MAX_FRONTENDS_PER_SERVICE,
    MAX_SOURCE_RANGES_PER_SERVICE,
};
use crate::desired::{Frontend, FrontendKind, Protocol, ServiceRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// A Service as the model reads it: made once when the object arrives and
/// kept by the sources instead of the object.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedService {
    /// The object, for log lines and Events.
    pub reference: ObjectRef,
    /// `None`: not ours (W1, W2, no IPv4 cluster IP) or invalid as a whole.
    pub info: Option<ServiceInfo>,
    /// What is wrong with it (empty when it is fine or not ours).
    pub errors: Vec<ObjectError>,
}

impl ParsedService {
    pub fn parse(svc: &Service) -> Self {
        let mut r = Reporter::new(ObjectKind::Service, &svc.metadata);
        let info = parse(svc, &mut r);
        Self {
            reference: ObjectRef::of(&svc.metadata),
            info,
            errors: r.errors,
        }
    }

    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(
            self.reference.namespace.clone(),
            self.reference.name.clone(),
        )
    }
}

/// A Service that passed validation (possibly with some ports or
/// frontends dropped).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) type_: ServiceType,
    pub(crate) ports: Vec<PortInfo>,
    /// In spec order, IPv4 only, no duplicates.
    pub(crate) cluster_ips: Vec<Ipv4Addr>,
    pub(crate) external_ips: Vec<Ipv4Addr>,
    pub(crate) lb_ips: Vec<Ipv4Addr>,
    /// AFFINITY, EXTERNAL_LOCAL, INTERNAL_LOCAL, SOURCE_RANGES.
    pub(crate) flags: u16,
    pub(crate) affinity_timeout_sec: u32,
    pub(crate) health_check_node_port: Option<u16>,
    pub(crate) source_ranges: Vec<Ipv4Net>,
    /// C7: metadata.creationTimestamp.
    pub(crate) created: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PortInfo {
    /// Index in spec.ports (for error fields).
    pub index: usize,
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// Address parse result for fields that may hold either family.
enum Addr {
    V4(Ipv4Addr),
    /// Valid, but of the other family: not ours, skipped silently.
    V6,
    Invalid,
}

fn parse_addr(s: &str) -> Addr {
    match s.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Addr::V4(a),
        Ok(IpAddr::V6(_)) => Addr::V6,
        Err(_) => Addr::Invalid,
    }
}

/// Parses a protocol field (nil = TCP). `Err(message)` for SCTP and unknown values.
pub(crate) fn parse_protocol(p: Option<&str>) -> Result<Protocol, &'static str> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Err("SCTP is not supported yet (TCP and UDP are)"),
        Some(_) => Err("unknown protocol (expected TCP or UDP)"),
    }
}

/// Validates a Service. `None` when it is skipped: not ours (W1, W2, no IPv4
/// cluster IP) silently, or invalid with errors pushed.
fn parse(svc: &Service, r: &mut Reporter) -> Option<ServiceInfo> {
    if is_foreign(&svc.metadata) {
        return None; // W1
    }
    // The identity of every service port (LB_SERVICE_NAMES holds it whole).
    if r.name.len() > MAX_NAME_LEN {
        r.error(
            "metadata.name",
            quoted(&r.name.clone()),
            format!("longer than {MAX_NAME_LEN} characters"),
        );
        return None;
    }
    if r.namespace.len() > MAX_NAME_LEN {
        r.error(
            "metadata.namespace",
            quoted(&r.namespace.clone()),
            format!("longer than {MAX_NAME_LEN} characters"),
        );
        return None;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return None; // no spec: no clusterIP, headless (W2)
    };

    let type_ = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return None, // W2
        Some(other) => {
            r.error(
                "spec.type",
                quoted(other),
                "unknown type (expected ClusterIP, NodePort, LoadBalancer or ExternalName)",
            );
            return None;
        }
    };

    // W2: headless. clusterIPs[0] is the primary and equals clusterIP when
    // both are set; accept either.
    let primary = spec
        .cluster_ip
        .as_deref()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            spec.cluster_ips
                .as_ref()
                .and_then(|v| v.first())
                .map(String::as_str)
        });
    match primary {
        None | Some("") | Some("None") => return None,
        Some(_) => {}
    }

    // F1: spec.clusterIP and the IPv4 entries of spec.clusterIPs.
    let mut cluster_ips: Vec<Ipv4Addr> = Vec::new();
    let mut fatal = false;
    let candidates = spec
        .cluster_ip
        .iter()
        .map(|ip| (ip.as_str(), "spec.clusterIP".to_string()))
        .chain(
            spec.cluster_ips
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, ip)| (ip.as_str(), format!("spec.clusterIPs[{i}]"))),
        );
    for (ip, field) in candidates {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match parse_addr(ip) {
            Addr::V4(a) => {
                if !cluster_ips.contains(&a) {
                    cluster_ips.push(a);
                }
            }
            Addr::V6 => {}
            Addr::Invalid => {
                r.error(field, quoted(ip), "not an IPv4 address");
                fatal = true;
            }
        }
    }

    // F8: session affinity.
    let mut flags = 0u16;
    let mut affinity_timeout_sec = 0;
    match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => {}
        Some("ClientIP") => {
            flags |= service_flags::AFFINITY;
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => affinity_timeout_sec = DEFAULT_AFFINITY_TIMEOUT_SEC,
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SEC as i64).contains(&i64::from(t)) => {
                    affinity_timeout_sec = t as u32
                }
                Some(t) => {
                    r.error(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        Some(t.to_string()),
                        format!("out of range 1-{MAX_AFFINITY_TIMEOUT_SEC}"),
                    );
                    fatal = true;
                }
            }
        }
        Some(other) => {
            r.error(
                "spec.sessionAffinity",
                quoted(other),
                "unknown value (expected None or ClientIP)",
            );
            fatal = true;
        }
    }

    // E5 / M3: traffic policies.
    let externally_accessible = type_ != ServiceType::ClusterIp
        || spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    let mut external_local = false;
    match spec.external_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => {}
        Some("Local") => {
            external_local = externally_accessible;
            if externally_accessible {
                flags |= service_flags::EXTERNAL_LOCAL;
            }
        }
        Some(other) => {
            r.error(
                "spec.externalTrafficPolicy",
                quoted(other),
                "unknown value (expected Cluster or Local)",
            );
            fatal = true;
        }
    }
    match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => {}
        Some("Local") => flags |= service_flags::INTERNAL_LOCAL,
        Some(other) => {
            r.error(
                "spec.internalTrafficPolicy",
                quoted(other),
                "unknown value (expected Cluster or Local)",
            );
            fatal = true;
        }
    }

    // F7: source ranges (LoadBalancer only). A bad entry is fatal: skipping
    // it could leave an empty list, which would open the service to all.
    let mut source_ranges = Vec::new();
    if type_ == ServiceType::LoadBalancer {
        for (i, cidr) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            match cidr.trim().parse::<IpNet>() {
                Ok(IpNet::V4(n)) => source_ranges.push(n.trunc()),
                Ok(IpNet::V6(_)) => {}
                Err(_) => {
                    r.error(
                        format!("spec.loadBalancerSourceRanges[{i}]"),
                        quoted(cidr),
                        "not a CIDR",
                    );
                    fatal = true;
                }
            }
        }
        source_ranges.sort();
        source_ranges.dedup();
        if !source_ranges.is_empty() {
            flags |= service_flags::SOURCE_RANGES;
        }
    }

    if fatal {
        return None;
    }
    if cluster_ips.is_empty() {
        // IPv6-only Service: kube-proxy's IPv4 proxier ignores it entirely
        // (also its NodePorts).
        return None;
    }

    // Ports (F9). A bad port is skipped alone.
    let mut ports: Vec<PortInfo> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let before = r.count();
        let protocol = match parse_protocol(p.protocol.as_deref()) {
            Ok(proto) => Some(proto),
            Err(msg) => {
                r.error(
                    format!("spec.ports[{i}].protocol"),
                    quoted(p.protocol.as_deref().unwrap_or("")),
                    msg,
                );
                None
            }
        };
        let port = port_number(p.port);
        if port.is_none() {
            r.error(
                format!("spec.ports[{i}].port"),
                Some(p.port.to_string()),
                "out of range 1-65535",
            );
        }
        let node_port = match p.node_port {
            None => None,
            Some(n) => {
                let np = port_number(n);
                if np.is_none() {
                    r.error(
                        format!("spec.ports[{i}].nodePort"),
                        Some(n.to_string()),
                        "out of range 1-65535",
                    );
                }
                np
            }
        };
        if let Some(IntOrString::Int(t)) = &p.target_port {
            if port_number(*t).is_none() {
                r.error(
                    format!("spec.ports[{i}].targetPort"),
                    Some(t.to_string()),
                    "out of range 1-65535",
                );
            }
        }
        let name = p.name.clone().unwrap_or_default();
        let (Some(protocol), Some(port)) = (protocol, port) else {
            continue;
        };
        if name.len() > MAX_PORT_NAME_LEN {
            r.error(
                format!("spec.ports[{i}].name"),
                quoted(&name),
                format!("longer than {MAX_PORT_NAME_LEN} characters"),
            );
            continue;
        }
        if r.count() != before {
            continue;
        }
        if let Some(dup) = ports
            .iter()
            .find(|q| q.name == name && q.protocol == protocol)
        {
            r.error(
                format!("spec.ports[{i}].name"),
                quoted(&name),
                format!(
                    "duplicate of spec.ports[{}] (same name and protocol {protocol}); skipped",
                    dup.index
                ),
            );
            continue;
        }
        ports.push(PortInfo {
            index: i,
            name,
            protocol,
            port,
            node_port,
        });
    }

    // F5: externalIPs; a bad entry is skipped alone.
    let mut external_ips: Vec<Ipv4Addr> = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        match parse_addr(ip) {
            Addr::V4(a) => {
                if !external_ips.contains(&a) {
                    external_ips.push(a);
                }
            }
            Addr::V6 => {}
            Addr::Invalid => r.error(field, quoted(ip), "not an IPv4 address; skipped"),
        }
    }

    // F6: load balancer ingress IPs unless ipMode is Proxy.
    let mut lb_ips: Vec<Ipv4Addr> = Vec::new();
    if type_ == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
                continue; // hostname-only ingress
            };
            match ing.ip_mode.as_deref() {
                None | Some("VIP") => {}
                Some("Proxy") => continue,
                Some(other) => {
                    r.error(
                        format!("status.loadBalancer.ingress[{i}].ipMode"),
                        quoted(other),
                        "unknown value (expected VIP or Proxy); skipped",
                    );
                    continue;
                }
            }
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            match parse_addr(ip) {
                Addr::V4(a) => {
                    if !lb_ips.contains(&a) {
                        lb_ips.push(a);
                    }
                }
                Addr::V6 => {}
                Addr::Invalid => r.error(field, quoted(ip), "not an IPv4 address; skipped"),
            }
        }
    }

    // H1: health-check node port (LoadBalancer + externalTrafficPolicy Local).
    let mut health_check_node_port = None;
    if type_ == ServiceType::LoadBalancer && external_local {
        if let Some(n) = spec.health_check_node_port {
            match port_number(n) {
                Some(p) => health_check_node_port = Some(p),
                None => r.error(
                    "spec.healthCheckNodePort",
                    Some(n.to_string()),
                    "out of range 1-65535",
                ),
            }
        }
    }

    // Bounds: one Service must not take the map space of all the others.
    let addresses = cluster_ips.len() + external_ips.len() + lb_ips.len();
    let node_ports = ports.iter().filter(|p| p.node_port.is_some()).count();
    let frontends = ports.len() * addresses + node_ports;
    if frontends > MAX_FRONTENDS_PER_SERVICE {
        r.error(
            "spec",
            None,
            format!(
                "{} ports x {addresses} addresses (cluster IPs, externalIPs, LoadBalancer IPs) = {frontends} frontends, more than the {MAX_FRONTENDS_PER_SERVICE} one Service may have; not programmed",
                ports.len()
            ),
        );
        return None;
    }
    if source_ranges.len() > MAX_SOURCE_RANGES_PER_SERVICE {
        // Fail closed: the Service is not exposed at all.
        r.error(
            "spec.loadBalancerSourceRanges",
            Some(source_ranges.len().to_string()),
            format!("more than {MAX_SOURCE_RANGES_PER_SERVICE} ranges; not programmed"),
        );
        return None;
    }

    Some(ServiceInfo {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        type_,
        ports,
        cluster_ips,
        external_ips,
        lb_ips,
        flags,
        affinity_timeout_sec,
        health_check_node_port,
        source_ranges,
        created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
    })
}

impl ServiceInfo {
    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(self.namespace.clone(), self.name.clone())
    }

    /// The frontends of one port, one per map key. On an address that one
    /// port lists twice (an externalIP equal to its LoadBalancer IP) the
    /// first kind in [`FrontendKind`] order keeps it, as the first of
    /// kube-proxy's iptables rules would.
    pub(crate) fn frontends(&self, port: &PortInfo) -> BTreeSet<Frontend> {
        let at = |kind, addr: Ipv4Addr| Frontend {
            kind,
            addr: Some(addr),
            port: port.port,
            protocol: port.protocol,
        };
        let mut all = Vec::new();
        all.extend(
            self.cluster_ips
                .iter()
                .map(|a| at(FrontendKind::ClusterIp, *a)),
        );
        // F4: NodePort and LoadBalancer Services with a nodePort. A nodePort
        // given explicitly is honoured even with allocateLoadBalancerNodePorts
        // false (it is only about automatic allocation), as kube-proxy does.
        if matches!(
            self.type_,
            ServiceType::NodePort | ServiceType::LoadBalancer
        ) {
            if let Some(np) = port.node_port {
                all.push(Frontend {
                    kind: FrontendKind::NodePort,
                    addr: None,
                    port: np,
                    protocol: port.protocol,
                });
            }
        }
        all.extend(
            self.external_ips
                .iter()
                .map(|a| at(FrontendKind::ExternalIp, *a)),
        );
        all.extend(
            self.lb_ips
                .iter()
                .map(|a| at(FrontendKind::LoadBalancer, *a)),
        );
        let mut keys = BTreeSet::new();
        all.into_iter().filter(|f| keys.insert(f.key())).collect()
    }
}
