//! Pure decisions of the agent's loop: which interfaces get which
//! programs, and which addresses are NodePort addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use regex::Regex;

use crate::dataplane::netlink::{InterfaceAddr, Link};
use crate::dataplane::Role;

/// Uplinks by name (given on the command line, or the default-route
/// interfaces), pods by name pattern. An uplink never also counts as a pod
/// interface, whatever its name.
pub fn interfaces_to_attach(
    links: &[Link],
    uplinks: &BTreeSet<String>,
    pod_pattern: &Regex,
) -> BTreeMap<Link, Role> {
    links
        .iter()
        .filter_map(|l| {
            if uplinks.contains(&l.name) {
                Some((l.clone(), Role::Uplink))
            } else if l.name != "lo" && pod_pattern.is_match(&l.name) {
                Some((l.clone(), Role::Pod))
            } else {
                None
            }
        })
        .collect()
}

/// NodePort addresses (F4): the node's IPv4 addresses, minus loopback, and
/// when `--nodeport-addresses` is given, only those inside one of its CIDRs
/// (kube-proxy's --nodeport-addresses).
pub fn nodeport_addrs(addrs: &[InterfaceAddr], cidrs: &[Ipv4Net]) -> BTreeSet<Ipv4Addr> {
    addrs
        .iter()
        .map(|a| a.addr)
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .filter(|a| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(a)))
        .collect()
}

/// The SNAT source of each uplink: its first primary IPv4 address.
pub fn uplink_addrs(
    attached: &BTreeMap<Link, Role>,
    addrs: &[InterfaceAddr],
) -> BTreeMap<u32, Ipv4Addr> {
    attached
        .iter()
        .filter(|(_, r)| **r == Role::Uplink)
        .filter_map(|(l, _)| {
            let mine = addrs
                .iter()
                .filter(|a| a.index == l.index && !a.addr.is_loopback());
            let primary = mine.clone().find(|a| !a.secondary);
            primary.or(mine.clone().next()).map(|a| (l.index, a.addr))
        })
        .collect()
}

/// Parses a flag of comma-separated IPv4 CIDRs (`--nodeport-addresses`,
/// `--cluster-cidr`); errors name `flag`.
pub fn parse_cidrs(s: &str, flag: &str) -> Result<Vec<Ipv4Net>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|e| format!("{flag}: {p:?} is not an IPv4 CIDR: {e}"))
        })
        .collect()
}

/// A port range `MIN-MAX` of flag `flag` (host order): 1 <= MIN <= MAX,
/// not overlapping `avoid` (inclusive; the NodePort range).
pub fn parse_port_range(s: &str, flag: &str, avoid: (u16, u16)) -> Result<(u16, u16), String> {
    let bad = |why: &str| format!("{flag}: {s:?} {why}");
    let (a, b) = s
        .trim()
        .split_once('-')
        .ok_or_else(|| bad("is not a port range MIN-MAX"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| bad("is not a port range MIN-MAX (ports 1-65535)"))
    };
    let (min, max) = (port(a)?, port(b)?);
    if min == 0 {
        return Err(bad("starts at port 0"));
    }
    if min > max {
        return Err(bad("is empty: MIN is above MAX"));
    }
    if min <= avoid.1 && max >= avoid.0 {
        return Err(bad(&format!(
            "overlaps the NodePort range {}-{}",
            avoid.0, avoid.1
        )));
    }
    Ok((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_validated() {
        let np = (30_000, 32_767);
        let f = "--snat-port-range";
        assert_eq!(parse_port_range("10000-29999", f, np), Ok((10_000, 29_999)));
        assert_eq!(
            parse_port_range(" 32768 - 32768 ", f, np),
            Ok((32_768, 32_768))
        );
        for bad in [
            "",
            "10000",
            "a-b",
            "0-10",
            "5-4",
            "29999-30000",
            "32767-40000",
            "1-70000",
        ] {
            let e = parse_port_range(bad, f, np).unwrap_err();
            assert!(e.starts_with(f), "{bad}: {e}");
        }
    }

    fn link(i: u32, n: &str) -> Link {
        Link {
            index: i,
            name: n.into(),
        }
    }

    #[test]
    fn uplinks_and_pod_interfaces_are_told_apart() {
        let links = [
            link(1, "lo"),
            link(2, "eth0"),
            link(3, "cni0"),
            link(4, "veth1a2b"),
            link(5, "lxc99"),
            link(6, "vethuplink"),
        ];
        let uplinks: BTreeSet<String> = ["eth0".to_string(), "vethuplink".to_string()].into();
        let re = Regex::new("^(veth|lxc|cali)").unwrap();
        let got = interfaces_to_attach(&links, &uplinks, &re);
        let names: Vec<(&str, Role)> = got.iter().map(|(l, r)| (l.name.as_str(), *r)).collect();
        assert_eq!(
            names,
            vec![
                ("eth0", Role::Uplink),
                ("veth1a2b", Role::Pod),
                ("lxc99", Role::Pod),
                ("vethuplink", Role::Uplink),
            ]
        );
    }

    #[test]
    fn f4_nodeport_addresses_exclude_loopback_and_filter_by_cidr() {
        let a = |i, s: &str| InterfaceAddr {
            index: i,
            addr: s.parse().unwrap(),
            secondary: false,
        };
        let addrs = [a(1, "127.0.0.1"), a(2, "198.18.0.11"), a(3, "10.244.1.1")];
        let all = nodeport_addrs(&addrs, &[]);
        assert_eq!(
            all.into_iter().collect::<Vec<_>>(),
            vec![
                "10.244.1.1".parse::<Ipv4Addr>().unwrap(),
                "198.18.0.11".parse().unwrap()
            ]
        );
        let only = nodeport_addrs(
            &addrs,
            &parse_cidrs("198.18.0.0/24", "--nodeport-addresses").unwrap(),
        );
        assert_eq!(
            only.into_iter().collect::<Vec<_>>(),
            vec!["198.18.0.11".parse::<Ipv4Addr>().unwrap()]
        );
    }

    #[test]
    fn uplink_snat_address_is_the_primary_one() {
        let a = |i, s: &str, secondary| InterfaceAddr {
            index: i,
            addr: s.parse().unwrap(),
            secondary,
        };
        let attached: BTreeMap<Link, Role> = [
            (link(2, "eth0"), Role::Uplink),
            (link(3, "veth1"), Role::Pod),
            (link(4, "eth1"), Role::Uplink),
        ]
        .into();
        let addrs = [
            a(2, "198.18.0.5", true),
            a(2, "198.18.0.11", false),
            a(3, "10.244.1.1", false),
        ];
        let got = uplink_addrs(&attached, &addrs);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![(2, "198.18.0.11".parse::<Ipv4Addr>().unwrap())]
        );
    }

    #[test]
    fn bad_cidr_names_the_flag() {
        let e = parse_cidrs("10.0.0.0/8,nope", "--nodeport-addresses").unwrap_err();
        assert!(
            e.contains("--nodeport-addresses") && e.contains("nope"),
            "{e}"
        );
    }
}
