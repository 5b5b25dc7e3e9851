//! `lbctl monitor`: reads the datapath's events from the ring buffer the
//! agent pins with `--monitor`, filters them and turns them into lines or
//! JSON objects. The filters and the formatting are pure functions; the
//! [`Reader`] is the only part that touches the kernel.
//!
//! One reader at a time: a BPF ring buffer has a single consumer position,
//! shared by everyone who maps it. Two `lbctl monitor` on one node would
//! each see only part of the events (whatever the other did not take
//! first); that is a property of the kernel object, not of lbctl.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError, RingBuf};
use lb_common::monitor::{hook, kind, MonitorEvent, EVENTS_MAP, EVENT_VERSION};
use lb_common::StatReason;
use lb_core::desired::ServicePortName;
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MonitorError {
    #[error("datapath monitoring is off: no ring buffer is pinned at {pin}. Start lb-agent with --monitor (chart: --set agent.monitor=true), or point --bpffs at the agent's pin directory")]
    Off { pin: String },
    #[error("cannot open the monitor ring buffer {pin}: {source}")]
    Open {
        pin: String,
        #[source]
        source: MapError,
    },
    #[error("an event of version {found} (this lbctl reads version {EVENT_VERSION}): use the lbctl of the agent's release")]
    Version { found: u8 },
    #[error("waiting for events: {0}")]
    Poll(#[source] io::Error),
}

/// `--service NS/NAME[:PORT]`: a Service, optionally one of its ports by
/// name or by the frontend port number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceMatch {
    pub namespace: String,
    pub name: String,
    pub port: Option<String>,
}

impl ServiceMatch {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (namespace, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("--service {s:?}: expected NAMESPACE/NAME[:PORT]"))?;
        let (name, port) = match rest.split_once(':') {
            Some((n, p)) => (n, Some(p.to_string())),
            None => (rest, None),
        };
        if namespace.is_empty() || name.is_empty() || port.as_deref() == Some("") {
            return Err(format!("--service {s:?}: expected NAMESPACE/NAME[:PORT]"));
        }
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port,
        })
    }

    fn matches(&self, spn: &ServicePortName, ev: &MonitorEvent) -> bool {
        spn.namespace == self.namespace
            && spn.name == self.name
            && self.port.as_deref().is_none_or(|p| {
                spn.port_name == p
                    || p.parse::<u16>().ok() == Some(lb_common::net_to_port(ev.dport))
            })
    }
}

/// The kind names `--type` takes.
pub fn parse_kind(s: &str) -> Result<u8, String> {
    kind::ALL
        .iter()
        .find(|(_, n)| *n == s)
        .map(|(k, _)| *k)
        .ok_or_else(|| {
            let names: Vec<&str> = kind::ALL.iter().map(|(_, n)| *n).collect();
            format!("--type {s:?}: one of {}", names.join(", "))
        })
}

/// The reason names `--reason` takes: the counters' names (`lbctl stats`).
pub fn parse_reason(s: &str) -> Result<StatReason, String> {
    StatReason::ALL
        .iter()
        .find(|r| r.name() == s)
        .copied()
        .ok_or_else(|| format!("--reason {s:?}: not a counter name (see `lbctl stats`)"))
}

/// What `lbctl monitor` prints; every filter given must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `--type` (any of them); empty: every kind.
    pub kinds: Vec<u8>,
    pub service: Option<ServiceMatch>,
    /// `--addr`: the source or destination, before or after translation.
    pub addr: Option<Ipv4Addr>,
    pub reason: Option<StatReason>,
}

impl Filter {
    pub fn matches(&self, ev: &MonitorEvent, names: &BTreeMap<u32, ServicePortName>) -> bool {
        if !self.kinds.is_empty() && !self.kinds.contains(&ev.kind) {
            return false;
        }
        if let Some(r) = self.reason {
            if ev.reason != r as u32 {
                return false;
            }
        }
        if let Some(a) = self.addr {
            let a = lb_common::ipv4_to_net(a.octets());
            if ![ev.saddr, ev.daddr, ev.nat_saddr, ev.nat_daddr].contains(&a) {
                return false;
            }
        }
        if let Some(s) = &self.service {
            match names.get(&ev.service_id) {
                Some(spn) if ev.service_id != 0 => return s.matches(spn, ev),
                _ => return false,
            }
        }
        true
    }
}

/// One event as printed (`--json`: one object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventRow {
    /// Wall-clock time, UTC, `HH:MM:SS.mmm`.
    pub time: String,
    pub kind: &'static str,
    pub reason: String,
    /// `namespace/name:port/PROTO`, when the packet was looked up as a
    /// service (new flows, rejects and their drops).
    pub service: Option<String>,
    pub service_id: u32,
    pub hook: &'static str,
    pub interface: String,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// New translations: the packet as it left.
    pub nat_source: Option<String>,
    pub nat_destination: Option<String>,
}

fn endpoint(addr: u32, port: u16, ports: bool) -> String {
    let a = Ipv4Addr::from(lb_common::net_to_ipv4(addr));
    if ports {
        format!("{a}:{}", lb_common::net_to_port(port))
    } else {
        a.to_string()
    }
}

fn protocol(p: u8) -> String {
    match p {
        lb_common::PROTO_TCP => "TCP".into(),
        lb_common::PROTO_UDP => "UDP".into(),
        1 => "ICMP".into(),
        p => format!("proto-{p}"),
    }
}

/// The row of `ev`. `wall_ns` is the event's time on the wall clock (ns
/// since the epoch); `ifname` names an interface index.
pub fn row(
    ev: &MonitorEvent,
    names: &BTreeMap<u32, ServicePortName>,
    wall_ns: u64,
    ifname: &dyn Fn(u32) -> String,
) -> EventRow {
    let ports = ev.sport != 0 || ev.dport != 0;
    let translated = ev.kind == kind::TRANSLATE && ev.nat_daddr != 0;
    EventRow {
        time: clock(wall_ns),
        kind: kind::name(ev.kind).unwrap_or("unknown"),
        reason: ev
            .stat_reason()
            .map(|r| r.name().to_string())
            .unwrap_or_else(|| format!("reason-{}", ev.reason)),
        service: (ev.service_id != 0).then(|| {
            names
                .get(&ev.service_id)
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("<id {}>", ev.service_id))
        }),
        service_id: ev.service_id,
        hook: hook::name(ev.hook),
        interface: ifname(ev.ifindex),
        protocol: protocol(ev.proto),
        source: endpoint(ev.saddr, ev.sport, ports),
        destination: endpoint(ev.daddr, ev.dport, ports),
        nat_source: translated.then(|| endpoint(ev.nat_saddr, ev.nat_sport, ports)),
        nat_destination: translated.then(|| endpoint(ev.nat_daddr, ev.nat_dport, ports)),
    }
}

/// `HH:MM:SS.mmm` (UTC) of a time in ns since the epoch.
fn clock(ns: u64) -> String {
    let ms = ns / 1_000_000;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// The table line of a row.
pub fn line(r: &EventRow) -> String {
    let mut s = format!(
        "{} {:<9} {:<22} {:<4} {} -> {}",
        r.time, r.kind, r.reason, r.protocol, r.source, r.destination
    );
    if let (Some(src), Some(dst)) = (&r.nat_source, &r.nat_destination) {
        s.push_str(&format!(" => {src} -> {dst}"));
    }
    s.push_str(&format!(
        "  service={}  {} {}",
        r.service.as_deref().unwrap_or("-"),
        r.hook,
        r.interface
    ));
    s
}

/// The pinned ring buffer, opened for reading.
pub struct Reader {
    ring: RingBuf<MapData>,
    pin: PathBuf,
}

impl Reader {
    /// Opens the ring buffer under the pin directory `dir`. No pin: the
    /// agent runs without `--monitor` ([`MonitorError::Off`]).
    pub fn open(dir: &Path) -> Result<Self, MonitorError> {
        let pin = dir.join(EVENTS_MAP);
        let pin_s = pin.display().to_string();
        if !pin.exists() {
            return Err(MonitorError::Off { pin: pin_s });
        }
        let open_err = |source| MonitorError::Open {
            pin: pin_s.clone(),
            source,
        };
        let data = MapData::from_pin(&pin).map_err(open_err)?;
        let map = Map::from_map_data(data).map_err(open_err)?;
        let ring = RingBuf::try_from(map).map_err(open_err)?;
        Ok(Self { ring, pin })
    }

    /// The next event waiting, if any.
    pub fn next_event(&mut self) -> Option<Result<MonitorEvent, MonitorError>> {
        let item = self.ring.next()?;
        if item.len() < size_of::<MonitorEvent>() {
            return Some(Err(MonitorError::Version {
                found: item.first().copied().unwrap_or(0),
            }));
        }
        let ev: MonitorEvent = bytemuck::pod_read_unaligned(&item[..size_of::<MonitorEvent>()]);
        if ev.version != EVENT_VERSION {
            return Some(Err(MonitorError::Version { found: ev.version }));
        }
        Some(Ok(ev))
    }

    /// Waits up to `timeout_ms` for events (false: none yet, or a signal
    /// interrupted the wait).
    pub fn wait(&self, timeout_ms: i32) -> Result<bool, MonitorError> {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(MonitorError::Poll(e));
        }
        Ok(rc > 0)
    }

    /// Whether the agent still has monitoring on (its pin is there). An
    /// agent restarted without `--monitor` removes it.
    pub fn still_on(&self) -> bool {
        self.pin.exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::Protocol;

    fn names() -> BTreeMap<u32, ServicePortName> {
        let mut m = BTreeMap::new();
        m.insert(
            7,
            ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port_name: "http".into(),
                protocol: Protocol::Tcp,
            },
        );
        m
    }

    fn ev() -> MonitorEvent {
        MonitorEvent {
            version: EVENT_VERSION,
            kind: kind::REJECT,
            hook: hook::POD_INGRESS,
            proto: lb_common::PROTO_TCP,
            reason: StatReason::RejectNoEndpoint as u32,
            service_id: 7,
            ifindex: 3,
            saddr: lb_common::ipv4_to_net([10, 244, 0, 5]),
            daddr: lb_common::ipv4_to_net([10, 96, 0, 10]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            ..MonitorEvent::default()
        }
    }

    #[test]
    fn filters_by_kind_service_address_and_reason() {
        let n = names();
        let e = ev();
        assert!(Filter::default().matches(&e, &n));
        let f = |kinds: Vec<u8>| Filter {
            kinds,
            ..Filter::default()
        };
        assert!(f(vec![kind::REJECT]).matches(&e, &n));
        assert!(f(vec![kind::DROP, kind::REJECT]).matches(&e, &n));
        assert!(!f(vec![kind::DROP]).matches(&e, &n));
        let svc = |s: &str| Filter {
            service: Some(ServiceMatch::parse(s).unwrap()),
            ..Filter::default()
        };
        assert!(svc("default/web").matches(&e, &n));
        assert!(svc("default/web:http").matches(&e, &n));
        assert!(svc("default/web:80").matches(&e, &n));
        assert!(!svc("default/web:https").matches(&e, &n));
        assert!(!svc("other/web").matches(&e, &n));
        assert!(!svc("default/web").matches(&MonitorEvent { service_id: 0, ..e }, &n));
        let addr = |a: [u8; 4]| Filter {
            addr: Some(Ipv4Addr::from(a)),
            ..Filter::default()
        };
        assert!(addr([10, 244, 0, 5]).matches(&e, &n));
        assert!(addr([10, 96, 0, 10]).matches(&e, &n));
        assert!(!addr([10, 244, 1, 11]).matches(&e, &n));
        let translated = MonitorEvent {
            kind: kind::TRANSLATE,
            nat_daddr: lb_common::ipv4_to_net([10, 244, 1, 11]),
            ..e
        };
        assert!(addr([10, 244, 1, 11]).matches(&translated, &n));
        let reason = |r| Filter {
            reason: Some(r),
            ..Filter::default()
        };
        assert!(reason(StatReason::RejectNoEndpoint).matches(&e, &n));
        assert!(!reason(StatReason::DropNoBackend).matches(&e, &n));
    }

    #[test]
    fn arguments_are_checked() {
        assert_eq!(parse_kind("drop"), Ok(kind::DROP));
        assert!(parse_kind("drops").is_err());
        assert_eq!(
            parse_reason("drop_no_backend"),
            Ok(StatReason::DropNoBackend)
        );
        assert!(parse_reason("no_backend").is_err());
        for bad in ["web", "/web", "default/", "default/web:"] {
            assert!(ServiceMatch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rows_name_the_service_and_both_tuples() {
        let n = names();
        let ifname = |i: u32| format!("if{i}");
        // 01:02:03.004 UTC on some day.
        let wall = ((86_400 * 3 + 3723) * 1000 + 4) * 1_000_000;
        let r = row(&ev(), &n, wall, &ifname);
        assert_eq!(
            line(&r),
            "01:02:03.004 reject    reject_no_endpoint     TCP  10.244.0.5:40000 -> 10.96.0.10:80  service=default/web:http/TCP  pod-ingress if3"
        );
        let t = MonitorEvent {
            kind: kind::TRANSLATE,
            reason: StatReason::NewFlow as u32,
            nat_saddr: ev().saddr,
            nat_sport: ev().sport,
            nat_daddr: lb_common::ipv4_to_net([10, 244, 1, 11]),
            nat_dport: 8080u16.to_be(),
            ..ev()
        };
        let r = row(&t, &n, wall, &ifname);
        assert_eq!(r.nat_destination.as_deref(), Some("10.244.1.11:8080"));
        assert!(line(&r).contains("10.96.0.10:80 => 10.244.0.5:40000 -> 10.244.1.11:8080"));
        let unknown = MonitorEvent {
            service_id: 99,
            ..ev()
        };
        assert_eq!(
            row(&unknown, &n, wall, &ifname).service.as_deref(),
            Some("<id 99>")
        );
        let none = MonitorEvent {
            service_id: 0,
            ..ev()
        };
        assert!(line(&row(&none, &n, wall, &ifname)).contains("service=-"));
    }
}
