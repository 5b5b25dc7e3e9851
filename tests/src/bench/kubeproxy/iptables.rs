//! kube-proxy's iptables layout: what its iptables proxier hands to
//! `iptables-restore --noflush --counters` in one full sync, plus the jump
//! rules it ensures in the built-in chains (`iptablesJumpChains`,
//! `iptablesKubeletJumpChains`, each `EnsureRule(Prepend, ...)`).
//!
//! ```text
//! nat PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per ClusterIP (linear),
//!     last: --dst-type LOCAL -> KUBE-NODEPORTS -> KUBE-EXT-<h> -> KUBE-MARK-MASQ, KUBE-SVC-<h>
//! KUBE-SVC-<h>: ! -s <cluster-cidr> -> KUBE-MARK-MASQ; then per endpoint
//!     -m statistic --mode random --probability 1/(n-i) -> KUBE-SEP-<h>
//! KUBE-SEP-<h>: -s <self> -> KUBE-MARK-MASQ (hairpin); DNAT --to-destination
//! nat POSTROUTING -> KUBE-POSTROUTING: marked 0x4000 -> MASQUERADE --random-fully
//! filter FORWARD -> KUBE-FORWARD (INVALID drop, marked accept, ESTABLISHED accept), ...
//! ```
//!
//! This kernel has no `nfacct` match, so the rules kube-proxy adds only when
//! its nfacct counters exist (the localhost NodePort counter, the INVALID
//! drop counter) are written without it, as kube-proxy does then.

use super::{hash_prefix, Config, ServicePort};

/// kube-proxy drops per-endpoint comments above this many endpoints.
const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// (table, built-in chain, rule arguments, target chain) of the jump rules
/// kube-proxy ensures, in its order (each one prepended).
const JUMP_CHAINS: &[(&str, &str, &str, &str)] = &[
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"", "KUBE-EXTERNAL-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"", "KUBE-EXTERNAL-SERVICES"),
    ("filter", "INPUT", "-m comment --comment \"kubernetes health check service ports\"", "KUBE-NODEPORTS"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"", "KUBE-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"", "KUBE-SERVICES"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\"", "KUBE-FORWARD"),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"", "KUBE-PROXY-FIREWALL"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"", "KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"", "KUBE-PROXY-FIREWALL"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\"", "KUBE-SERVICES"),
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\"", "KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\"", "KUBE-POSTROUTING"),
    // iptablesKubeletJumpChains (no comment).
    ("filter", "INPUT", "", "KUBE-FIREWALL"),
    ("filter", "OUTPUT", "", "KUBE-FIREWALL"),
];

fn port_proto_hash(sp: &ServicePort) -> String {
    hash_prefix(&format!("{}{}", sp.name_string(), sp.protocol), 16)
}

fn svc_chain(sp: &ServicePort) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(sp))
}

fn ext_chain(sp: &ServicePort) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(sp))
}

fn sep_chain(sp: &ServicePort, endpoint: &str) -> String {
    let h = hash_prefix(
        &format!("{}{}{}", sp.name_string(), sp.protocol, endpoint),
        16,
    );
    format!("KUBE-SEP-{h}")
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Quotes a comment as kube-proxy does (only when it has a space).
fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("-m comment --comment \"{text}\"")
    } else {
        format!("-m comment --comment {text}")
    }
}

/// The full `iptables-restore --noflush` input: kube-proxy's `*filter` and
/// `*nat` sections for `ports`, with the jump rules from the built-in
/// chains inserted (`-I CHAIN 1`) after the chains they point to exist.
pub fn restore_input(cfg: &Config, ports: &[ServicePort]) -> String {
    let total_endpoints: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let mark = cfg.masquerade_mark;

    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    let chain_line = |buf: &mut String, c: &str| {
        buf.push_str(&format!(":{c} - [0:0]\n"));
    };
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        chain_line(&mut filter_chains, c);
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        chain_line(&mut nat_chains, c);
    }
    nat_rules.push_str(&format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {mark}\n\
         -A KUBE-POSTROUTING {} -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {mark}\n",
        comment("kubernetes service traffic requiring SNAT")
    ));
    // localhostNodePorts (the default for IPv4): kube-proxy adds kubelet's
    // martian-localhost rule.
    chain_line(&mut filter_chains, "KUBE-FIREWALL");
    filter_rules.push_str(&format!(
        "-A KUBE-FIREWALL {} -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        comment("block incoming localnet connections")
    ));

    for sp in ports {
        let name = sp.name_string();
        let proto = sp.protocol;
        let svc = svc_chain(sp);
        let ext = ext_chain(sp);
        let has_endpoints = !sp.endpoints.is_empty();
        let vip_match = format!(
            "-m {proto} -p {proto} -d {} --dport {}",
            sp.cluster_ip, sp.port
        );

        if has_endpoints {
            nat_rules.push_str(&format!(
                "-A KUBE-SERVICES {} {vip_match} -j {svc}\n",
                comment(&format!("{name} cluster IP"))
            ));
        } else {
            filter_rules.push_str(&format!(
                "-A KUBE-SERVICES {} {vip_match} -j REJECT\n",
                comment(&format!("{name} has no endpoints"))
            ));
        }
        if let Some(np) = sp.node_port {
            if has_endpoints {
                nat_rules.push_str(&format!(
                    "-A KUBE-NODEPORTS {} -m {proto} -p {proto} --dport {np} -j {ext}\n",
                    comment(&name)
                ));
            } else {
                filter_rules.push_str(&format!(
                    "-A KUBE-EXTERNAL-SERVICES {} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j REJECT\n",
                    comment(&format!("{name} has no endpoints"))
                ));
            }
        }
        if !has_endpoints {
            continue;
        }
        // Internal traffic: masquerade what does not come from the cluster CIDR.
        nat_rules.push_str(&format!(
            "-A {svc} {} {vip_match} ! -s {} -j KUBE-MARK-MASQ\n",
            comment(&format!("{name} cluster IP")),
            cfg.cluster_cidr
        ));
        // External traffic (Cluster policy): always masqueraded.
        if sp.node_port.is_some() {
            chain_line(&mut nat_chains, &ext);
            nat_rules.push_str(&format!(
                "-A {ext} {} -j KUBE-MARK-MASQ\n-A {ext} -j {svc}\n",
                comment(&format!(
                    "masquerade traffic for {name} external destinations"
                ))
            ));
        }
        chain_line(&mut nat_chains, &svc);
        let n = sp.endpoints.len();
        for (i, ep) in sp.endpoints.iter().enumerate() {
            let mut rule = format!("-A {svc}");
            if !large {
                rule.push(' ');
                rule.push_str(&comment(&format!("{name} -> {}", ep.addr())));
            }
            if i < n - 1 {
                rule.push_str(&format!(
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                ));
            }
            rule.push_str(&format!(" -j {}\n", sep_chain(sp, &ep.addr())));
            nat_rules.push_str(&rule);
        }
        for ep in &sp.endpoints {
            let sep = sep_chain(sp, &ep.addr());
            chain_line(&mut nat_chains, &sep);
            let c = if large {
                String::new()
            } else {
                format!(" {}", comment(&name))
            };
            nat_rules.push_str(&format!(
                "-A {sep}{c} -s {} -j KUBE-MARK-MASQ\n-A {sep}{c} -m {proto} -p {proto} -j DNAT --to-destination {}\n",
                ep.ip,
                ep.addr()
            ));
        }
    }
    // The NodePort dispatch, last in KUBE-SERVICES (nodePortAddresses unset).
    nat_rules.push_str(&format!(
        "-A KUBE-SERVICES {} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    ));
    filter_rules.push_str(&format!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD {} -m mark --mark {mark}/{mark} -j ACCEPT\n\
         -A KUBE-FORWARD {} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        comment("kubernetes forwarding rules"),
        comment("kubernetes forwarding conntrack rule")
    ));

    let jumps = |table: &str| -> String {
        JUMP_CHAINS
            .iter()
            .filter(|j| j.0 == table)
            .map(|(_, src, args, dst)| {
                if args.is_empty() {
                    format!("-I {src} 1 -j {dst}\n")
                } else {
                    format!("-I {src} 1 {args} -j {dst}\n")
                }
            })
            .collect()
    };
    format!(
        "*filter\n{filter_chains}{}{filter_rules}COMMIT\n*nat\n{nat_chains}{}{nat_rules}COMMIT\n",
        jumps("filter"),
        jumps("nat")
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::bench::kubeproxy::tests::two_services;

    /// A restore text as kube-proxy's own test helper compares it: per
    /// table, the set of declared chains and each chain's rules in order.
    type Tables = BTreeMap<String, (BTreeSet<String>, BTreeMap<String, Vec<String>>)>;

    fn structure(text: &str) -> Tables {
        let mut tables = Tables::new();
        let mut table = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
                tables.entry(table.clone()).or_default();
            } else if let Some(c) = line.strip_prefix(':') {
                let chain = c.split_whitespace().next().unwrap().to_string();
                tables.get_mut(&table).unwrap().0.insert(chain);
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap().to_string();
                let t = tables.get_mut(&table).unwrap();
                t.1.entry(chain).or_default().push(line.to_string());
            }
        }
        tables
    }

    /// kube-proxy's `TestOverallIPTablesRules` expectation, restricted to
    /// its ns1/svc1 (ClusterIP) and ns3/svc3 (NodePort) and the rules every
    /// sync writes. Two differences, both from kube-proxy's fake iptables:
    /// the real iptables supports `--random-fully` (kube-proxy adds it when
    /// `HasRandomFully()`), and no nfacct counter exists on this kernel, so
    /// the INVALID drop has no `-m nfacct`.
    const KUBE_PROXY_EXPECTED: &str = r#"
        *filter
        :KUBE-NODEPORTS - [0:0]
        :KUBE-SERVICES - [0:0]
        :KUBE-EXTERNAL-SERVICES - [0:0]
        :KUBE-FIREWALL - [0:0]
        :KUBE-FORWARD - [0:0]
        :KUBE-PROXY-FIREWALL - [0:0]
        -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KUBE-NODEPORTS - [0:0]
        :KUBE-SERVICES - [0:0]
        :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
        :KUBE-MARK-MASQ - [0:0]
        :KUBE-POSTROUTING - [0:0]
        :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
        -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
        -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
        -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
        -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
        -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
        -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        COMMIT
    "#;

    #[test]
    fn two_services_match_kube_proxys_rules() {
        let (cfg, ports) = two_services();
        let got = restore_input(&cfg, &ports);
        assert_eq!(structure(&got), structure(KUBE_PROXY_EXPECTED), "{got}");
    }

    #[test]
    fn jump_rules_end_up_in_kube_proxys_order() {
        let (cfg, ports) = two_services();
        let got = restore_input(&cfg, &ports);
        // Each -I CHAIN 1 prepends: the last one written is the first rule.
        let forward: Vec<&str> = got
            .lines()
            .filter(|l| l.starts_with("-I FORWARD 1"))
            .map(|l| l.rsplit(' ').next().unwrap())
            .rev()
            .collect();
        assert_eq!(
            forward,
            [
                "KUBE-PROXY-FIREWALL",
                "KUBE-FORWARD",
                "KUBE-SERVICES",
                "KUBE-EXTERNAL-SERVICES"
            ]
        );
        assert!(got.contains(
            "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
    }

    #[test]
    fn endpoints_get_kube_proxys_probabilities_and_large_clusters_lose_comments() {
        let (cfg, mut ports) = two_services();
        let ep = |i: u8| super::super::Endpoint {
            ip: std::net::Ipv4Addr::new(10, 180, 0, i),
            port: 80,
        };
        ports[0].endpoints = vec![ep(1), ep(2), ep(3)];
        let got = restore_input(&cfg, &ports);
        let svc: Vec<&str> = got
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVC-XPGD46QRK7WJZT7O") && l.contains("KUBE-SEP"))
            .collect();
        assert_eq!(svc.len(), 3);
        assert!(svc[0].contains("--probability 0.3333333333 "), "{}", svc[0]);
        assert!(svc[1].contains("--probability 0.5000000000 "), "{}", svc[1]);
        assert!(!svc[2].contains("statistic"));
        assert!(svc[0].contains("\"ns1/svc1:p80 -> 10.180.0.1:80\""));

        // Over 1,000 endpoints: no comments on the endpoint rules.
        ports[0].endpoints = (0..1001u32)
            .map(|i| super::super::Endpoint {
                ip: std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 181, 0, 0)) + i),
                port: 80,
            })
            .collect();
        let got = restore_input(&cfg, &ports);
        let sep = got
            .lines()
            .find(|l| l.starts_with("-A KUBE-SEP-") && l.contains("DNAT"))
            .unwrap();
        assert!(!sep.contains("comment"), "{sep}");
    }
}
