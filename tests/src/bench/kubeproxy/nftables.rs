//! kube-proxy's nftables layout: the transaction its nftables proxier runs
//! on a full sync, written as knftables dumps it (`nft -f` input).
//!
//! ```text
//! table ip kube-proxy
//!   nat-prerouting/nat-output -> services:
//!     ip daddr . meta l4proto . th dport vmap @service-ips          (one hash lookup)
//!     ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
//!   service-<h>-ns/name/tcp/port: masquerade mark for non-cluster sources,
//!     numgen random mod N vmap { 0 : goto endpoint-..., ... }
//!   external-<h>-...: mark for masquerade, goto service-<h>-...
//!   endpoint-<h>-...__ip/port: hairpin mark, dnat to ip:port
//!   nat-postrouting -> masquerading: marked -> masquerade fully-random
//!   filter hooks: firewall-check, service-endpoints-check (no-endpoint
//!     reject), cluster-ips-check (reject bad ports, drop unallocated IPs)
//! ```

use super::{hash_prefix, Config, ServicePort};

/// `HASH-ns/name/proto/port` (kube-proxy's `servicePortChainNameBase`).
fn base(sp: &ServicePort) -> String {
    let name = format!(
        "{}/{}/{}/{}",
        sp.namespace, sp.name, sp.protocol, sp.port_name
    );
    format!("{}-{name}", hash_prefix(&name, 8))
}

/// `HASH-ns/name/proto/port__ip/port` (`servicePortEndpointChainNameBase`).
fn endpoint_base(sp: &ServicePort, ep: &super::Endpoint) -> String {
    let name = format!(
        "{}/{}/{}/{}__{}/{}",
        sp.namespace, sp.name, sp.protocol, sp.port_name, ep.ip, ep.port
    );
    format!("{}-{name}", hash_prefix(&name, 8))
}

/// The chains, sets, maps and base rules every sync writes (kube-proxy's
/// `setupNFTables`, as its test's `baseRules` lists them).
fn base_rules(cfg: &Config) -> String {
    let mark = cfg.masquerade_mark;
    let mut s = format!(
        r#"add table ip kube-proxy {{ comment "rules for kube-proxy" ; }}

add set ip kube-proxy cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}
add set ip kube-proxy nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}

add map ip kube-proxy firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}
add map ip kube-proxy no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}
add map ip kube-proxy no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}
add map ip kube-proxy service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}
add map ip kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}

add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}
add chain ip kube-proxy filter-output-pre-dnat {{ type filter hook output priority -110 ; }}
add chain ip kube-proxy filter-forward {{ type filter hook forward priority 0 ; }}
add chain ip kube-proxy filter-input {{ type filter hook input priority 0 ; }}
add chain ip kube-proxy filter-output {{ type filter hook output priority 0 ; }}
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output {{ type nat hook output priority -100 ; }}
add chain ip kube-proxy nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check

add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr {{ {service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or {mark}
add rule ip kube-proxy masquerading mark and {mark} == 0 return
add rule ip kube-proxy masquerading mark set mark xor {mark}
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports

"#,
        service_cidr = cfg.service_cidr,
    );
    for ip in &cfg.node_ips {
        s.push_str(&format!(
            "add element ip kube-proxy nodeport-ips {{ {ip} }}\n"
        ));
    }
    s.push_str("add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n");
    s
}

/// The whole `nft -f` transaction for `ports`.
pub fn transaction(cfg: &Config, ports: &[ServicePort]) -> String {
    let mut s = base_rules(cfg);
    for sp in ports {
        let t = "add chain ip kube-proxy";
        let r = "add rule ip kube-proxy";
        let e = "add element ip kube-proxy";
        let proto = sp.protocol;
        let svc = format!("service-{}", base(sp));
        let ext = format!("external-{}", base(sp));
        let key = format!("{} . {proto} . {}", sp.cluster_ip, sp.port);
        s.push('\n');
        s.push_str(&format!("# {}\n", sp.name_string()));
        if sp.endpoints.is_empty() {
            s.push_str(&format!("{e} cluster-ips {{ {} }}\n", sp.cluster_ip));
            s.push_str(&format!(
                "{e} no-endpoint-services {{ {key} comment \"{}\" : goto reject-chain }}\n",
                sp.name_string()
            ));
            if let Some(np) = sp.node_port {
                s.push_str(&format!(
                    "{e} no-endpoint-nodeports {{ {proto} . {np} comment \"{}\" : goto reject-chain }}\n",
                    sp.name_string()
                ));
            }
            continue;
        }
        let endpoints: Vec<String> = sp
            .endpoints
            .iter()
            .map(|ep| format!("endpoint-{}", endpoint_base(sp, ep)))
            .collect();
        // Chains before the rules that jump to them (kube-proxy ensures the
        // endpoint chains first, then the service's own).
        for chain in &endpoints {
            s.push_str(&format!("{t} {chain}\n"));
        }
        s.push_str(&format!("{t} {svc}\n"));
        if sp.node_port.is_some() {
            s.push_str(&format!("{t} {ext}\n"));
        }
        s.push_str(&format!(
            "{r} {svc} ip daddr {} ip saddr != {} jump mark-for-masquerade\n",
            sp.cluster_ip, cfg.cluster_cidr
        ));
        let vmap: Vec<String> = endpoints
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        s.push_str(&format!(
            "{r} {svc} numgen random mod {} vmap {{ {} }}\n",
            endpoints.len(),
            vmap.join(" , ")
        ));
        if sp.node_port.is_some() {
            s.push_str(&format!("{r} {ext} jump mark-for-masquerade\n"));
            s.push_str(&format!("{r} {ext} goto {svc}\n"));
        }
        for (ep, chain) in sp.endpoints.iter().zip(&endpoints) {
            s.push_str(&format!(
                "{r} {chain} ip saddr {} jump mark-for-masquerade\n",
                ep.ip
            ));
            s.push_str(&format!(
                "{r} {chain} meta l4proto {proto} dnat to {}\n",
                ep.addr()
            ));
        }
        s.push('\n');
        s.push_str(&format!("{e} cluster-ips {{ {} }}\n", sp.cluster_ip));
        s.push_str(&format!("{e} service-ips {{ {key} : goto {svc} }}\n"));
        if let Some(np) = sp.node_port {
            s.push_str(&format!(
                "{e} service-nodeports {{ {proto} . {np} : goto {ext} }}\n"
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::bench::kubeproxy::tests::two_services;

    /// A transaction as kube-proxy's test compares it: the set of objects
    /// and elements, and each chain's rules in order.
    fn structure(text: &str) -> (BTreeSet<String>, BTreeMap<String, Vec<String>>) {
        let mut objects = BTreeSet::new();
        let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("add rule ip kube-proxy ") {
                let chain = rest.split_whitespace().next().unwrap().to_string();
                rules.entry(chain).or_default().push(line.to_string());
            } else {
                objects.insert(line.to_string());
            }
        }
        (objects, rules)
    }

    /// kube-proxy's `TestOverallNFTablesRules` expectation (its `baseRules`
    /// plus the blocks of ns1/svc1 and ns3/svc3), verbatim.
    const KUBE_PROXY_EXPECTED: &str = r#"
        add table ip kube-proxy { comment "rules for kube-proxy" ; }

        add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
        add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }

        add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
        add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
        add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
        add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
        add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }

        add chain ip kube-proxy cluster-ips-check
        add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
        add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
        add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
        add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
        add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
        add chain ip kube-proxy firewall-check
        add chain ip kube-proxy mark-for-masquerade
        add chain ip kube-proxy masquerading
        add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
        add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
        add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
        add chain ip kube-proxy nodeport-endpoints-check
        add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
        add chain ip kube-proxy services
        add chain ip kube-proxy service-endpoints-check

        add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
        add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
        add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
        add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
        add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
        add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
        add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
        add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
        add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
        add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
        add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
        add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
        add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
        add rule ip kube-proxy masquerading mark set mark xor 0x4000
        add rule ip kube-proxy masquerading masquerade fully-random
        add rule ip kube-proxy nat-output jump services
        add rule ip kube-proxy nat-postrouting jump masquerading
        add rule ip kube-proxy nat-prerouting jump services
        add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
        add rule ip kube-proxy reject-chain reject
        add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
        add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports

        add element ip kube-proxy nodeport-ips { 192.168.0.2 }
        add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services

        # svc1
        add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }

        add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80

        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }

        # svc3
        add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
        add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
        add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
        add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
        add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80

        add element ip kube-proxy cluster-ips { 172.30.0.43 }
        add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
    "#;

    #[test]
    fn two_services_match_kube_proxys_transaction() {
        let (cfg, ports) = two_services();
        let got = transaction(&cfg, &ports);
        assert_eq!(structure(&got), structure(KUBE_PROXY_EXPECTED), "{got}");
    }

    #[test]
    fn several_endpoints_share_one_numgen_vmap() {
        let (cfg, mut ports) = two_services();
        ports[0].endpoints.push(super::super::Endpoint {
            ip: "10.180.0.2".parse().unwrap(),
            port: 80,
        });
        let got = transaction(&cfg, &ports);
        let line = got
            .lines()
            .find(|l| l.contains("numgen") && l.contains("svc1"))
            .unwrap();
        assert!(line.contains("numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-"), "{line}");
    }
}
