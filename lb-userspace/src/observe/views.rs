//! lbctl's views of the maps: pure functions from map contents to rows that
//! print as a table or as JSON.

use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, ct_flags, service_flags, BackendSlotKey, BackendValue, ConntrackEntry,
    ConntrackKey, ServiceKey, ServiceValue, StatReason, CT_DIR_FORWARD, LOCAL_SLOT_BASE,
    SCOPE_NODEPORT,
};
use serde::Serialize;

use lb_core::{MapContents, Protocol};

fn addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(lb_common::net_to_ipv4(a))
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p)
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| format!("proto-{p}"))
}

fn endpoint(a: u32, p: u16) -> String {
    format!("{}:{}", addr(a), lb_common::net_to_port(p))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    pub id: u32,
    pub address: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub kind: &'static str,
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub protocol: String,
    pub service_id: u32,
    pub service: String,
    pub backends: Vec<BackendRef>,
    pub local_backends: Vec<BackendRef>,
    pub flags: Vec<&'static str>,
    pub affinity_timeout_sec: u32,
}

fn kind(k: &ServiceKey, v: &ServiceValue) -> &'static str {
    if k.scope == SCOPE_NODEPORT || v.flags & service_flags::NODE_PORT != 0 {
        "NodePort"
    } else if v.flags & service_flags::LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else if v.flags & service_flags::EXTERNAL_IP != 0 {
        "ExternalIP"
    } else {
        "ClusterIP"
    }
}

fn service_flag_names(f: u16) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (bit, name) in [
        (service_flags::AFFINITY, "affinity"),
        (service_flags::EXTERNAL_LOCAL, "external-traffic-local"),
        (service_flags::INTERNAL_LOCAL, "internal-traffic-local"),
        (service_flags::SOURCE_RANGES, "source-ranges"),
    ] {
        if f & bit != 0 {
            out.push(name);
        }
    }
    out
}

fn slot_backends(c: &MapContents, service_id: u32, base: u32, count: u16) -> Vec<BackendRef> {
    (0..u32::from(count))
        .map(|i| {
            let slot = c.slots.get(&BackendSlotKey {
                service_id,
                slot: base + i,
            });
            let id = slot.map(|s| s.backend_id).unwrap_or(0);
            let b: Option<&BackendValue> = slot.and_then(|s| c.backends.get(&s.backend_id));
            BackendRef {
                id,
                address: b.map(|b| addr(b.addr)),
                port: b.map(|b| lb_common::net_to_port(b.port)),
                local: b.is_some_and(|b| b.flags & backend_flags::LOCAL != 0),
            }
        })
        .collect()
}

/// One row per frontend, sorted by service name then frontend.
pub fn services(c: &MapContents) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = c
        .services
        .iter()
        .map(|(k, v)| {
            let port = lb_common::net_to_port(k.port);
            let address = (k.scope != SCOPE_NODEPORT).then(|| addr(k.addr));
            let protocol = proto_name(k.proto);
            let frontend = match address {
                Some(a) => format!("{a}:{port}/{protocol}"),
                None => format!("*:{port}/{protocol}"),
            };
            ServiceRow {
                frontend,
                kind: kind(k, v),
                address,
                port,
                protocol,
                service_id: v.service_id,
                service: c
                    .names
                    .get(&v.service_id)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| format!("<id {}>", v.service_id)),
                backends: slot_backends(c, v.service_id, 0, v.backend_count),
                local_backends: slot_backends(
                    c,
                    v.service_id,
                    LOCAL_SLOT_BASE,
                    v.local_backend_count,
                ),
                flags: service_flag_names(v.flags),
                affinity_timeout_sec: v.affinity_timeout_sec,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    rows
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub local: bool,
    pub terminating: bool,
}

pub fn backends(c: &MapContents) -> Vec<BackendRow> {
    c.backends
        .iter()
        .map(|(id, b)| BackendRow {
            id: *id,
            address: addr(b.addr),
            port: lb_common::net_to_port(b.port),
            protocol: proto_name(b.proto),
            local: b.flags & backend_flags::LOCAL != 0,
            terminating: b.flags & backend_flags::TERMINATING != 0,
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConntrackRow {
    pub direction: &'static str,
    pub source: String,
    pub destination: String,
    pub protocol: String,
    pub nat: String,
    pub snat: Option<String>,
    pub backend_id: u32,
    pub service_id: u32,
    pub flags: Vec<&'static str>,
    pub age_seconds: f64,
    /// The flow's state (netfilter's name), from both entries' bits.
    pub state: &'static str,
    /// How long the flow may stay idle before it expires, with the
    /// lifetimes of the `DatapathConfig` given (0: expired).
    pub remaining_seconds: f64,
}

fn ct_flag_names(f: u16) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (bit, name) in [
        (ct_flags::SNAT, "snat"),
        (ct_flags::PORT_REMAP, "remap"),
        (ct_flags::SEEN_REPLY, "seen-reply"),
        (ct_flags::TCP_SYN, "syn"),
        (ct_flags::TCP_ESTABLISHED, "established"),
        (ct_flags::TCP_FIN, "fin"),
        (ct_flags::TCP_RST, "rst"),
        (ct_flags::FIN_FORWARD, "fin-fwd"),
        (ct_flags::FIN_REPLY, "fin-reply"),
        (ct_flags::UDP_STREAM, "stream"),
    ] {
        if f & bit != 0 {
            out.push(name);
        }
    }
    out
}

/// `now_ns` is CLOCK_BOOTTIME, the clock of bpf_ktime_get_boot_ns. The
/// state and remaining lifetime of each entry are its flow's (both entries,
/// as the datapath and the GC judge them), with the lifetimes of `cfg`.
pub fn conntrack(
    entries: &[(ConntrackKey, ConntrackEntry)],
    cfg: &lb_common::DatapathConfig,
    now_ns: u64,
) -> Vec<ConntrackRow> {
    let by_key: std::collections::HashMap<&ConntrackKey, &ConntrackEntry> =
        entries.iter().map(|(k, e)| (k, e)).collect();
    let mut rows: Vec<ConntrackRow> = entries
        .iter()
        .map(|(k, e)| {
            let pk = k.peer(e);
            let peer = by_key.get(&pk).copied().filter(|p| pk.peer(p) == *k);
            let (state, remaining) = cfg.flow_state_remaining(k.proto, e, peer, now_ns);
            (k, e, state, remaining)
        })
        .map(|(k, e, state, remaining)| ConntrackRow {
            direction: if k.dir == CT_DIR_FORWARD {
                "forward"
            } else {
                "reply"
            },
            source: endpoint(k.saddr, k.sport),
            destination: endpoint(k.daddr, k.dport),
            protocol: proto_name(k.proto),
            nat: endpoint(e.nat_addr, e.nat_port),
            snat: (e.flags & ct_flags::SNAT != 0).then(|| endpoint(e.snat_addr, e.snat_port)),
            backend_id: e.backend_id,
            service_id: e.service_id,
            flags: ct_flag_names(e.flags),
            age_seconds: now_ns.saturating_sub(e.last_seen_ns) as f64 / 1e9,
            state: state.name(),
            remaining_seconds: remaining as f64 / 1e9,
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.direction, &a.source, &a.destination).cmp(&(b.direction, &b.source, &b.destination))
    });
    rows
}

/// Counters as a JSON object, name -> value, in `StatReason::ALL` order.
pub fn stats_json(stats: &[(StatReason, u64)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (r, v) in stats {
        m.insert(r.name().to_string(), serde_json::Value::from(*v));
    }
    serde_json::Value::Object(m)
}

/// CLOCK_BOOTTIME in nanoseconds.
pub fn boottime_ns() -> u64 {
    // SAFETY: timespec is plain data and clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{ipv4_to_net, port_to_net, BackendSlot, PROTO_TCP};

    #[test]
    fn services_view_resolves_slots_and_names() {
        let mut c = MapContents::default();
        c.services.insert(
            ServiceKey {
                addr: ipv4_to_net([10, 96, 0, 10]),
                port: port_to_net(80),
                proto: PROTO_TCP,
                scope: 0,
            },
            ServiceValue {
                service_id: 7,
                backend_count: 2,
                local_backend_count: 1,
                flags: service_flags::CLUSTER_IP | service_flags::AFFINITY,
                _pad: 0,
                affinity_timeout_sec: 10800,
            },
        );
        c.names.insert(
            7,
            lb_core::ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port_name: "http".into(),
                protocol: Protocol::Tcp,
            },
        );
        for (slot, id) in [(0, 1), (1, 2), (LOCAL_SLOT_BASE, 1)] {
            c.slots.insert(
                BackendSlotKey {
                    service_id: 7,
                    slot,
                },
                BackendSlot { backend_id: id },
            );
        }
        c.backends.insert(
            1,
            BackendValue {
                addr: ipv4_to_net([10, 244, 1, 2]),
                port: port_to_net(8080),
                proto: PROTO_TCP,
                flags: backend_flags::LOCAL,
                service_id: 7,
            },
        );
        // Backend 2 missing: shown as a dangling slot, not a panic.
        let rows = services(&c);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.frontend, "10.96.0.10:80/TCP");
        assert_eq!(r.kind, "ClusterIP");
        assert_eq!(r.service, "default/web:http/TCP");
        assert_eq!(r.backends.len(), 2);
        assert_eq!(r.backends[0].address, Some(Ipv4Addr::new(10, 244, 1, 2)));
        assert_eq!(r.backends[0].port, Some(8080));
        assert!(r.backends[0].local);
        assert_eq!(r.backends[1].address, None);
        assert_eq!(r.local_backends.len(), 1);
        assert_eq!(r.flags, vec!["affinity"]);
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["backends"][0]["address"], "10.244.1.2");
    }

    #[test]
    fn conntrack_view_formats_both_directions() {
        let k = ConntrackKey {
            saddr: ipv4_to_net([10, 244, 1, 5]),
            daddr: ipv4_to_net([10, 96, 0, 10]),
            sport: port_to_net(40000),
            dport: port_to_net(80),
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let e = ConntrackEntry {
            nat_addr: ipv4_to_net([10, 244, 2, 3]),
            nat_port: port_to_net(8080),
            flags: ct_flags::TCP_SYN | ct_flags::SEEN_REPLY,
            last_seen_ns: 1_000_000_000,
            ..Default::default()
        };
        let cfg = lb_common::DatapathConfig::DEFAULT;
        let rows = conntrack(&[(k, e)], &cfg, 3_500_000_000);
        assert_eq!(rows[0].source, "10.244.1.5:40000");
        assert_eq!(rows[0].nat, "10.244.2.3:8080");
        assert_eq!(rows[0].snat, None);
        assert_eq!(rows[0].flags, vec!["seen-reply", "syn"]);
        assert!((rows[0].age_seconds - 2.5).abs() < 1e-9);
        // Answered, handshake not complete: SYN_RECV, 60 s less 2.5 s idle.
        assert_eq!(rows[0].state, "SYN_RECV");
        assert!((rows[0].remaining_seconds - 57.5).abs() < 1e-9);
        // Both entries of an established flow: ESTABLISHED from the union
        // of their bits, idle since the later of the two.
        let est = ConntrackEntry {
            flags: ct_flags::TCP_SYN | ct_flags::SEEN_REPLY,
            ..e
        };
        let rk = k.peer(&est);
        let re = ConntrackEntry {
            flags: ct_flags::TCP_ESTABLISHED,
            last_seen_ns: 3_000_000_000,
            ..k.peer_entry(&est)
        };
        let rows = conntrack(&[(k, est), (rk, re)], &cfg, 3_500_000_000);
        for r in &rows {
            assert_eq!(r.state, "ESTABLISHED", "{r:?}");
            assert!(
                (r.remaining_seconds - (86_400.0 - 0.5)).abs() < 1e-6,
                "{r:?}"
            );
        }
        // Expired: 0 left.
        let rows = conntrack(&[(k, e)], &cfg, 100_000_000_000);
        assert_eq!(rows[0].remaining_seconds, 0.0);
    }
}
