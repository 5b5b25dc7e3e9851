use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, service_flags, BackendSlot, BackendSlotKey, BackendValue, ServiceKey,
    ServiceValue, LOCAL_SLOT_BASE, SCOPE_NODEPORT,
};

use super::*;
use crate::state::{
    DesiredServicePort, DesiredState, Endpoint, Frontend, FrontendKind, MapContents, MapOp,
    Protocol, ServicePortName,
};

fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
        protocol,
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn fe(kind: FrontendKind, addr: Option<&str>, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        kind,
        addr: addr.map(ip),
        port,
        protocol,
    }
}

fn ep(addr: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port,
        local,
        terminating: false,
    }
}

fn port(frontends: &[Frontend], backends: &[Endpoint]) -> DesiredServicePort {
    DesiredServicePort {
        frontends: frontends.iter().copied().collect(),
        backends: backends.to_vec(),
        local_backends: backends.iter().filter(|e| e.local).copied().collect(),
        flags: 0,
        affinity_timeout_sec: 0,
    }
}

fn web() -> (ServicePortName, DesiredServicePort) {
    (
        spn("default", "web", "http", Protocol::Tcp),
        port(
            &[
                fe(
                    FrontendKind::ClusterIp,
                    Some("10.96.0.10"),
                    80,
                    Protocol::Tcp,
                ),
                fe(FrontendKind::NodePort, None, 30080, Protocol::Tcp),
            ],
            &[ep("10.1.0.5", 8080, true), ep("10.1.1.5", 8080, false)],
        ),
    )
}

fn state(ports: Vec<(ServicePortName, DesiredServicePort)>) -> DesiredState {
    DesiredState {
        services: ports.into_iter().collect(),
    }
}

fn none() -> BTreeSet<Ipv4Addr> {
    BTreeSet::new()
}

/// Applies the plan and checks that planning again yields nothing.
fn apply(c: &MapContents, d: &DesiredState, addrs: &BTreeSet<Ipv4Addr>) -> (Plan, MapContents) {
    let p = plan(c, d, addrs).unwrap();
    let mut next = c.clone();
    for op in &p.ops {
        op.apply_to(&mut next);
    }
    let again = plan(&next, d, addrs).unwrap();
    assert!(again.ops.is_empty(), "not converged: {:?}", again.ops);
    assert_eq!(again.service_changes, 0);
    assert_eq!(again.endpoint_changes, 0);
    (p, next)
}

fn kind(op: &MapOp) -> usize {
    match op {
        MapOp::PutBackend(..) => 0,
        MapOp::PutSlot(..) => 1,
        MapOp::PutName(..) => 2,
        MapOp::PutNodeAddr(..) => 3,
        MapOp::PutService(..) => 4,
        MapOp::DeleteService(..) => 5,
        MapOp::DeleteSlot(..) => 6,
        MapOp::DeleteBackend(..) => 7,
        MapOp::DeleteName(..) => 8,
        MapOp::DeleteNodeAddr(..) => 9,
    }
}

fn assert_ordered(ops: &[MapOp]) {
    for w in ops.windows(2) {
        assert!(
            kind(&w[0]) <= kind(&w[1]),
            "out of order: {:?} before {:?}",
            w[0],
            w[1]
        );
    }
}

/// Every service entry's counts reference slots that exist and point to
/// existing backends.
fn assert_consistent(c: &MapContents, context: &str) {
    for (k, v) in &c.services {
        let slots = (0..u32::from(v.backend_count))
            .chain((0..u32::from(v.local_backend_count)).map(|i| LOCAL_SLOT_BASE + i));
        for slot in slots {
            let key = BackendSlotKey {
                service_id: v.service_id,
                slot,
            };
            let s = c
                .slots
                .get(&key)
                .unwrap_or_else(|| panic!("{context}: {k:?} -> missing slot {key:?}"));
            assert!(
                c.backends.contains_key(&s.backend_id),
                "{context}: {k:?} slot {slot} -> missing backend {}",
                s.backend_id
            );
        }
    }
}

#[test]
fn first_sync_writes_everything_in_order() {
    let d = state(vec![web()]);
    let addrs: BTreeSet<_> = [ip("192.168.1.10")].into();
    let (p, c) = apply(&MapContents::default(), &d, &addrs);
    assert_ordered(&p.ops);
    assert!(p.errors.is_empty());
    assert_eq!(p.service_changes, 1);
    assert_eq!(p.endpoint_changes, 1);
    // Two backends (ids 1, 2), three slots, a name, a node address, two frontends.
    assert_eq!(p.ops.len(), 2 + 3 + 1 + 1 + 2);
    assert_eq!(
        c.names.get(&1).map(String::as_str),
        Some("default/web:http/TCP")
    );
    let cip = fe(
        FrontendKind::ClusterIp,
        Some("10.96.0.10"),
        80,
        Protocol::Tcp,
    )
    .key();
    let v = c.services[&cip];
    assert_eq!(v.service_id, 1);
    assert_eq!(v.backend_count, 2);
    assert_eq!(v.local_backend_count, 1);
    assert_eq!(v.flags, service_flags::CLUSTER_IP);
    let np = c
        .services
        .iter()
        .find(|(k, _)| k.scope == SCOPE_NODEPORT)
        .unwrap();
    assert_eq!(np.1.flags, service_flags::NODE_PORT);
    assert_eq!(np.0.addr, 0);
    // Slots 0..2 for the cluster set in order, LOCAL_SLOT_BASE for the local set.
    let b0 = c.slots[&BackendSlotKey {
        service_id: 1,
        slot: 0,
    }]
        .backend_id;
    let local0 = c.slots[&BackendSlotKey {
        service_id: 1,
        slot: LOCAL_SLOT_BASE,
    }]
        .backend_id;
    assert_eq!(b0, local0);
    assert_eq!(c.backends[&b0].flags, backend_flags::LOCAL);
    assert_eq!(lb_common::net_to_ipv4(c.backends[&b0].addr), [10, 1, 0, 5]);
    assert_eq!(lb_common::net_to_port(c.backends[&b0].port), 8080);
    assert_eq!(
        c.node_addrs,
        [lb_common::ipv4_to_net([192, 168, 1, 10])].into()
    );
}

#[test]
fn unchanged_state_yields_no_ops() {
    let d = state(vec![web()]);
    let (_, c) = apply(&MapContents::default(), &d, &none());
    let p = plan(&c, &d, &none()).unwrap();
    assert!(p.is_empty());
    assert_eq!(p, Plan::default());
    assert!(
        plan(&MapContents::default(), &DesiredState::default(), &none())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn ids_are_stable_and_smallest_free_ids_are_used() {
    let (w, wp) = web();
    let dns = spn("kube-system", "dns", "dns", Protocol::Udp);
    let dnsp = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.53"),
            53,
            Protocol::Udp,
        )],
        &[ep("10.1.0.9", 53, false)],
    );
    let (_, c1) = apply(
        &MapContents::default(),
        &state(vec![(w.clone(), wp.clone())]),
        &none(),
    );
    let (_, c2) = apply(
        &c1,
        &state(vec![(w.clone(), wp.clone()), (dns.clone(), dnsp.clone())]),
        &none(),
    );
    let web_id = |c: &MapContents| {
        c.names
            .iter()
            .find(|(_, n)| n.contains("web"))
            .map(|(i, _)| *i)
    };
    let dns_id = |c: &MapContents| {
        c.names
            .iter()
            .find(|(_, n)| n.contains("dns"))
            .map(|(i, _)| *i)
    };
    // "kube-system/dns" sorts before "default/web"? No: "default" < "kube-system".
    assert_eq!(web_id(&c2), Some(1));
    assert_eq!(dns_id(&c2), Some(2));
    // Removing web keeps dns's ids (service and backend).
    let dns_backend = c2.slots[&BackendSlotKey {
        service_id: 2,
        slot: 0,
    }]
        .backend_id;
    let (p3, c3) = apply(&c2, &state(vec![(dns.clone(), dnsp.clone())]), &none());
    assert_eq!(dns_id(&c3), Some(2));
    assert_eq!(
        c3.slots[&BackendSlotKey {
            service_id: 2,
            slot: 0
        }]
            .backend_id,
        dns_backend
    );
    assert_eq!(p3.service_changes, 1);
    assert_eq!(p3.endpoint_changes, 1);
    assert!(p3.ops.iter().all(|op| matches!(
        op,
        MapOp::DeleteService(_)
            | MapOp::DeleteSlot(_)
            | MapOp::DeleteBackend(_)
            | MapOp::DeleteName(_)
    )));
    // A new service then gets the smallest free id again (1).
    let (_, c4) = apply(
        &c3,
        &state(vec![(w.clone(), wp.clone()), (dns, dnsp)]),
        &none(),
    );
    assert_eq!(web_id(&c4), Some(1));
    assert_eq!(dns_id(&c4), Some(2));
}

#[test]
fn ids_of_a_deleted_service_are_not_reused_in_the_same_plan() {
    let (w, wp) = web();
    let (_, c1) = apply(&MapContents::default(), &state(vec![(w, wp)]), &none());
    let other = spn("default", "other", "", Protocol::Tcp);
    let op = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.11"),
            80,
            Protocol::Tcp,
        )],
        &[ep("10.1.2.1", 80, false)],
    );
    let (p, c2) = apply(&c1, &state(vec![(other, op)]), &none());
    // id 1 and backend ids 1, 2 are still live while the plan runs.
    assert_eq!(c2.names.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(c2.backends.keys().copied().collect::<Vec<_>>(), vec![3]);
    assert_ordered(&p.ops);
}

#[test]
fn service_keeps_its_id_through_a_frontend_change() {
    let (w, mut wp) = web();
    let (_, c1) = apply(
        &MapContents::default(),
        &state(vec![(w.clone(), wp.clone())]),
        &none(),
    );
    // Add an external IP, drop the node port: the cluster IP keeps id 1.
    wp.frontends.retain(|f| f.kind != FrontendKind::NodePort);
    wp.frontends.insert(fe(
        FrontendKind::ExternalIp,
        Some("203.0.113.7"),
        80,
        Protocol::Tcp,
    ));
    let (p, c2) = apply(&c1, &state(vec![(w, wp)]), &none());
    assert!(c2.services.values().all(|v| v.service_id == 1));
    assert_eq!(p.service_changes, 1);
    assert_eq!(p.endpoint_changes, 0);
    assert_eq!(p.ops.iter().map(kind).collect::<Vec<_>>(), vec![4, 5]);
}

#[test]
fn backend_flag_change_rewrites_the_backend_in_place() {
    let (w, mut wp) = web();
    let (_, c1) = apply(
        &MapContents::default(),
        &state(vec![(w.clone(), wp.clone())]),
        &none(),
    );
    wp.backends[1].terminating = true;
    let (p, c2) = apply(&c1, &state(vec![(w, wp)]), &none());
    assert_eq!(p.ops.len(), 1);
    let MapOp::PutBackend(id, v) = p.ops[0] else {
        panic!("{:?}", p.ops)
    };
    assert_eq!(v.flags, backend_flags::TERMINATING);
    assert_eq!(c1.backends[&id].addr, v.addr);
    assert_eq!(p.endpoint_changes, 1);
    assert_eq!(p.service_changes, 0);
    assert_eq!(c2.backends.len(), 2);
}

#[test]
fn tcp_and_udp_never_share_ids() {
    let both = |proto: Protocol| {
        (
            spn("kube-system", "dns", "dns", proto),
            port(
                &[fe(FrontendKind::ClusterIp, Some("10.96.0.10"), 53, proto)],
                &[ep("10.1.0.9", 53, false)],
            ),
        )
    };
    let (_, c) = apply(
        &MapContents::default(),
        &state(vec![both(Protocol::Tcp), both(Protocol::Udp)]),
        &none(),
    );
    assert_eq!(c.services.len(), 2);
    let sids: BTreeSet<u32> = c.services.values().map(|v| v.service_id).collect();
    assert_eq!(sids.len(), 2);
    assert_eq!(c.backends.len(), 2);
    let protos: BTreeSet<u8> = c.backends.values().map(|b| b.proto).collect();
    assert_eq!(protos, [lb_common::PROTO_TCP, lb_common::PROTO_UDP].into());
}

#[test]
fn shrinking_publishes_the_count_before_deleting_slots() {
    let (w, mut wp) = web();
    let (_, c1) = apply(
        &MapContents::default(),
        &state(vec![(w.clone(), wp.clone())]),
        &none(),
    );
    wp.backends.remove(0);
    wp.local_backends.clear();
    let p = plan(&c1, &state(vec![(w, wp)]), &none()).unwrap();
    assert_ordered(&p.ops);
    let mut c = c1.clone();
    assert_consistent(&c, "start");
    for (i, op) in p.ops.iter().enumerate() {
        op.apply_to(&mut c);
        assert_consistent(&c, &format!("after op {i} {op:?}"));
    }
    assert!(p.ops.iter().any(|op| matches!(op, MapOp::DeleteSlot(_))));
}

#[test]
fn per_service_limit_skips_only_that_service() {
    let limits = Limits {
        max_backends_per_service: 1,
        ..Limits::default()
    };
    let (w, wp) = web(); // 2 backends
    let small = spn("default", "small", "", Protocol::Tcp);
    let sp = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.20"),
            80,
            Protocol::Tcp,
        )],
        &[ep("10.1.3.1", 80, false)],
    );
    let d = state(vec![(w, wp), (small, sp)]);
    let p = plan_with_limits(&MapContents::default(), &d, &none(), &limits).unwrap();
    assert_eq!(p.errors.len(), 1);
    assert_eq!(
        p.errors[0].to_string(),
        "default/web:http/TCP: 2 backends in its cluster-wide set, more than the 1 one service port can hold; not programmed"
    );
    let mut c = MapContents::default();
    for op in &p.ops {
        op.apply_to(&mut c);
    }
    assert_eq!(c.services.len(), 1);
    assert_eq!(
        c.names.values().cloned().collect::<Vec<_>>(),
        vec!["default/small/TCP"]
    );
}

#[test]
fn map_capacity_skips_the_service_that_does_not_fit() {
    let (w, wp) = web(); // 2 frontends, 2 backends, 3 slots
    let small = spn("default", "small", "", Protocol::Tcp);
    let sp = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.20"),
            80,
            Protocol::Tcp,
        )],
        &[ep("10.1.3.1", 80, false)],
    );
    let d = state(vec![(w, wp), (small, sp)]);
    // "default/small" sorts before "default/web": web is the one left out.
    let cases: [(Limits, &str, u32); 3] = [
        (
            Limits {
                max_services: 2,
                ..Limits::default()
            },
            "LB_SERVICES",
            2,
        ),
        (
            Limits {
                max_backends: 2,
                ..Limits::default()
            },
            "LB_BACKENDS",
            2,
        ),
        (
            Limits {
                max_backend_slots: 3,
                ..Limits::default()
            },
            "LB_BACKEND_SLOTS",
            3,
        ),
    ];
    for (limits, map, max) in cases {
        let p = plan_with_limits(&MapContents::default(), &d, &none(), &limits).unwrap();
        assert_eq!(
            p.errors,
            vec![SyncError::MapFull {
                service: "default/web:http/TCP".into(),
                map,
                max,
            }],
            "{map}"
        );
        let mut c = MapContents::default();
        for op in &p.ops {
            op.apply_to(&mut c);
        }
        assert_eq!(
            c.names.values().cloned().collect::<Vec<_>>(),
            vec!["default/small/TCP"]
        );
    }
}

#[test]
fn duplicate_frontend_stays_with_the_first_service_port() {
    let (w, wp) = web();
    let thief = spn("default", "zz", "", Protocol::Tcp);
    let tp = port(
        &[
            fe(
                FrontendKind::ExternalIp,
                Some("10.96.0.10"),
                80,
                Protocol::Tcp,
            ),
            fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.99"),
                80,
                Protocol::Tcp,
            ),
        ],
        &[],
    );
    let p = plan(
        &MapContents::default(),
        &state(vec![(w, wp), (thief, tp)]),
        &none(),
    )
    .unwrap();
    assert_eq!(p.errors.len(), 1);
    assert!(
        p.errors[0]
            .to_string()
            .starts_with("default/zz/TCP: frontend"),
        "{}",
        p.errors[0]
    );
    let mut c = MapContents::default();
    for op in &p.ops {
        op.apply_to(&mut c);
    }
    assert_eq!(c.services.len(), 3);
}

#[test]
fn node_addresses_are_diffed_and_bounded() {
    let a: BTreeSet<_> = [ip("192.168.1.1"), ip("192.168.1.2")].into();
    let (_, c) = apply(&MapContents::default(), &DesiredState::default(), &a);
    let b: BTreeSet<_> = [ip("192.168.1.2"), ip("192.168.1.3")].into();
    let (p, _) = apply(&c, &DesiredState::default(), &b);
    assert_eq!(
        p.ops,
        vec![
            MapOp::PutNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 3])),
            MapOp::DeleteNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 1])),
        ]
    );
    let limits = Limits {
        max_node_addrs: 1,
        ..Limits::default()
    };
    let p = plan_with_limits(
        &MapContents::default(),
        &DesiredState::default(),
        &b,
        &limits,
    )
    .unwrap();
    assert_eq!(p.ops.len(), 1);
    assert_eq!(
        p.errors[0].to_string(),
        "node address 192.168.1.3: more than 1 node addresses; not programmed"
    );
}

#[test]
fn long_names_are_stored_truncated_and_do_not_churn() {
    let long = "n".repeat(63);
    let name = spn(&long, &long, "a-long-port-nam", Protocol::Tcp);
    let p = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.10"),
            80,
            Protocol::Tcp,
        )],
        &[],
    );
    let (_, c) = apply(&MapContents::default(), &state(vec![(name, p)]), &none());
    assert_eq!(c.names[&1].len(), lb_common::SERVICE_NAME_LEN);
}

#[test]
fn values_carry_service_flags_and_affinity() {
    let (w, mut wp) = web();
    wp.flags = service_flags::AFFINITY | service_flags::EXTERNAL_LOCAL;
    wp.affinity_timeout_sec = 10_800;
    let (_, c) = apply(&MapContents::default(), &state(vec![(w, wp)]), &none());
    for (k, v) in &c.services {
        let kind = if k.scope == SCOPE_NODEPORT {
            service_flags::NODE_PORT
        } else {
            service_flags::CLUSTER_IP
        };
        assert_eq!(
            v.flags,
            kind | service_flags::AFFINITY | service_flags::EXTERNAL_LOCAL
        );
        assert_eq!(v.affinity_timeout_sec, 10_800);
    }
}

// ---- property-style tests -------------------------------------------

/// splitmix64: small, deterministic, good enough for test generation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn pick_str(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len() as u64) as usize]
    }
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const NAMES: [&str; 4] = ["s0", "s1", "s2", "s3"];
const PORT_NAMES: [&str; 3] = ["", "http", "dns"];

fn random_state(rng: &mut Rng) -> (DesiredState, BTreeSet<Ipv4Addr>) {
    let mut d = DesiredState::default();
    for _ in 0..rng.below(7) {
        let protocol = *rng.pick(&[Protocol::Tcp, Protocol::Udp]);
        let (ns, svc, port_name) = (
            rng.pick_str(&NAMESPACES),
            rng.pick_str(&NAMES),
            rng.pick_str(&PORT_NAMES),
        );
        let name = spn(ns, svc, port_name, protocol);
        let mut p = DesiredServicePort::default();
        for _ in 0..=rng.below(4) {
            let kind = *rng.pick(&[
                FrontendKind::ClusterIp,
                FrontendKind::NodePort,
                FrontendKind::ExternalIp,
                FrontendKind::LoadBalancer,
            ]);
            let f = if kind == FrontendKind::NodePort {
                fe(kind, None, *rng.pick(&[30000, 30001, 30002]), protocol)
            } else {
                let a = format!("10.96.0.{}", 1 + rng.below(8));
                fe(kind, Some(&a), *rng.pick(&[80, 53, 443]), protocol)
            };
            p.frontends.insert(f);
        }
        let mut eps = BTreeMap::new();
        for _ in 0..rng.below(6) {
            let e = Endpoint {
                addr: ip(&format!("10.1.0.{}", 1 + rng.below(10))),
                port: *rng.pick(&[8080, 53]),
                local: rng.chance(40),
                terminating: rng.chance(20),
            };
            eps.insert((e.addr, e.port), e);
        }
        p.backends = eps.values().copied().collect();
        p.local_backends = p.backends.iter().filter(|e| e.local).copied().collect();
        if rng.chance(30) {
            p.backends.retain(|e| !e.local); // local-only fallback shapes
        }
        p.flags = (rng.below(16) as u16) << 4;
        p.affinity_timeout_sec = if p.flags & service_flags::AFFINITY != 0 {
            10_800
        } else {
            0
        };
        d.services.insert(name, p);
    }
    let addrs = (1..=4)
        .filter(|_| rng.chance(50))
        .map(|i| ip(&format!("192.168.0.{i}")))
        .collect();
    (d, addrs)
}

/// Every programmed frontend leads to exactly the backends its desired
/// service port lists, in order; every desired frontend is programmed
/// unless the plan reported its service port.
fn assert_matches(c: &MapContents, d: &DesiredState, errors: &[SyncError]) {
    let resolve = |sid: u32, base: u32, n: u16| -> Vec<(u32, u16)> {
        (0..u32::from(n))
            .map(|i| {
                let s = c.slots[&BackendSlotKey {
                    service_id: sid,
                    slot: base + i,
                }];
                let b = c.backends[&s.backend_id];
                (b.addr, b.port)
            })
            .collect()
    };
    let want = |set: &[Endpoint]| -> Vec<(u32, u16)> {
        set.iter()
            .map(|e| {
                (
                    lb_common::ipv4_to_net(e.addr.octets()),
                    lb_common::port_to_net(e.port),
                )
            })
            .collect()
    };
    for (name, p) in &d.services {
        let reported = errors
            .iter()
            .any(|e| e.to_string().starts_with(&format!("{name}:")));
        for f in &p.frontends {
            let Some(v) = c.services.get(&f.key()) else {
                assert!(reported, "{name}: {f:?} missing and not reported");
                continue;
            };
            if c.names.get(&v.service_id) != Some(&name.to_string()) {
                assert!(
                    reported,
                    "{name}: {f:?} owned by another port, not reported"
                );
                continue;
            }
            assert_eq!(
                resolve(v.service_id, 0, v.backend_count),
                want(&p.backends),
                "{name}"
            );
            assert_eq!(
                resolve(v.service_id, LOCAL_SLOT_BASE, v.local_backend_count),
                want(&p.local_backends),
                "{name}"
            );
            assert_eq!(v.flags & !0xf, p.flags);
        }
    }
}

#[test]
fn property_plans_converge_and_never_expose_half_written_sets() {
    let mut rng = Rng(0x5eed);
    for round in 0..60 {
        let mut c = MapContents::default();
        for step in 0..12 {
            let (d, addrs) = random_state(&mut rng);
            let p = plan(&c, &d, &addrs).unwrap();
            assert_ordered(&p.ops);
            let before = c.clone();
            for (i, op) in p.ops.iter().enumerate() {
                op.apply_to(&mut c);
                assert_consistent(&c, &format!("round {round} step {step} op {i} {op:?}"));
            }
            let again = plan(&c, &d, &addrs).unwrap();
            assert!(
                again.ops.is_empty(),
                "round {round} step {step}: {:?}",
                again.ops
            );
            assert_matches(&c, &d, &p.errors);
            // Counts: zero exactly when nothing changed.
            if p.ops.is_empty() {
                assert_eq!((p.service_changes, p.endpoint_changes), (0, 0));
            }
            if before == c {
                assert!(p.ops.is_empty());
            }
            // Ids are stable: a service port whose frontend set stayed
            // the same keeps its id.
            for (k, v) in &c.services {
                if let Some(old) = before.services.get(k) {
                    if before.names.get(&old.service_id) == c.names.get(&v.service_id) {
                        assert_eq!(old.service_id, v.service_id);
                    }
                }
            }
        }
    }
}

#[test]
fn property_converges_from_arbitrary_contents() {
    let mut rng = Rng(42);
    for _ in 0..100 {
        // Garbage: dangling slots, duplicate backends, stale names.
        let mut c = MapContents::default();
        for _ in 0..rng.below(8) {
            c.services.insert(
                ServiceKey {
                    addr: lb_common::ipv4_to_net([10, 96, 0, 1 + rng.below(8) as u8]),
                    port: lb_common::port_to_net(*rng.pick(&[80, 53, 443])),
                    proto: *rng.pick(&[6, 17, 132]),
                    scope: 0,
                },
                ServiceValue {
                    service_id: rng.below(5) as u32,
                    backend_count: rng.below(4) as u16,
                    ..ServiceValue::default()
                },
            );
        }
        for _ in 0..rng.below(8) {
            c.slots.insert(
                BackendSlotKey {
                    service_id: rng.below(5) as u32,
                    slot: rng.below(3) as u32,
                },
                BackendSlot {
                    backend_id: rng.below(6) as u32,
                },
            );
        }
        for _ in 0..rng.below(6) {
            c.backends.insert(
                rng.below(6) as u32,
                BackendValue {
                    addr: lb_common::ipv4_to_net([10, 1, 0, 1 + rng.below(10) as u8]),
                    port: lb_common::port_to_net(*rng.pick(&[8080, 53])),
                    proto: *rng.pick(&[6, 17]),
                    flags: 0,
                },
            );
        }
        for _ in 0..rng.below(3) {
            c.names.insert(rng.below(5) as u32, "stale".into());
        }
        let (d, addrs) = random_state(&mut rng);
        let p = plan(&c, &d, &addrs).unwrap();
        for op in &p.ops {
            op.apply_to(&mut c);
        }
        assert_consistent(&c, "after converging");
        assert!(plan(&c, &d, &addrs).unwrap().ops.is_empty());
        assert_matches(&c, &d, &p.errors);
    }
}

// ---- SyncState: the incremental planner ---------------------------------

type Changes = BTreeMap<ServicePortName, Option<DesiredServicePort>>;

fn changes(ports: Vec<(ServicePortName, Option<DesiredServicePort>)>) -> Changes {
    ports.into_iter().collect()
}

/// Executes a plan against the state, checking the order and the
/// no-half-written-set invariant at every prefix.
fn run(s: &mut SyncState, p: &Plan, context: &str) {
    assert_ordered(&p.ops);
    for (i, op) in p.ops.iter().enumerate() {
        s.apply(op);
        assert_consistent(s.contents(), &format!("{context}: op {i} {op:?}"));
    }
}

/// A state programmed with `d` through `plan_full`.
fn programmed(d: &DesiredState) -> SyncState {
    let mut s = SyncState::new(MapContents::default(), Limits::default());
    let p = s.plan_full(d, &none()).unwrap();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    run(&mut s, &p, "plan_full");
    s
}

/// What the desired-state diff between two states is: the changed ports.
fn desired_diff(before: &DesiredState, after: &DesiredState) -> Changes {
    let names: BTreeSet<&ServicePortName> = before
        .services
        .keys()
        .chain(after.services.keys())
        .collect();
    names
        .into_iter()
        .filter(|n| before.services.get(*n) != after.services.get(*n))
        .map(|n| (n.clone(), after.services.get(n).cloned()))
        .collect()
}

/// Drops frontends whose key an earlier port already has (the model never
/// produces such duplicates; `plan_full` and `plan_ports` resolve them
/// differently on purpose).
fn without_conflicts(mut d: DesiredState) -> DesiredState {
    let mut seen = BTreeSet::new();
    for p in d.services.values_mut() {
        p.frontends.retain(|f| seen.insert(f.key()));
    }
    d
}

fn id_of(c: &MapContents, name: &str) -> u32 {
    let ids: Vec<u32> = c
        .names
        .iter()
        .filter(|(_, n)| n.as_str() == name)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(ids.len(), 1, "{name}: {ids:?}");
    ids[0]
}

fn backend_id(c: &MapContents, addr: &str, port: u16) -> Option<u32> {
    let (a, p) = (
        lb_common::ipv4_to_net(ip(addr).octets()),
        lb_common::port_to_net(port),
    );
    c.backends
        .iter()
        .find(|(_, v)| v.addr == a && v.port == p)
        .map(|(id, _)| *id)
}

/// Everything a service port's frontends lead to, by stored name, without
/// ids: frontend key -> (flags, timeout, cluster set, local set), backends as
/// (addr, port). Backend flags are left out: they are shared.
type Resolved = BTreeMap<ServiceKey, (u16, u32, Vec<(u32, u16)>, Vec<(u32, u16)>)>;

fn resolved(c: &MapContents, name: &str) -> Resolved {
    let set = |sid: u32, base: u32, n: u16| -> Vec<(u32, u16)> {
        (0..u32::from(n))
            .map(|i| {
                let s = c.slots[&BackendSlotKey {
                    service_id: sid,
                    slot: base + i,
                }];
                let b = c.backends[&s.backend_id];
                (b.addr, b.port)
            })
            .collect()
    };
    c.services
        .iter()
        .filter(|(_, v)| c.names.get(&v.service_id).map(String::as_str) == Some(name))
        .map(|(k, v)| {
            (
                *k,
                (
                    v.flags,
                    v.affinity_timeout_sec,
                    set(v.service_id, 0, v.backend_count),
                    set(v.service_id, LOCAL_SLOT_BASE, v.local_backend_count),
                ),
            )
        })
        .collect()
}

#[test]
fn plan_ports_with_an_unchanged_port_yields_no_ops() {
    let (w, wp) = web();
    let d = state(vec![(w.clone(), wp.clone())]);
    let mut s = programmed(&d);
    let p = s
        .plan_ports(&changes(vec![(w.clone(), Some(wp.clone()))]))
        .unwrap();
    assert_eq!(p, Plan::default());
    // Also right after adopting the maps (agent restart).
    let mut adopted = SyncState::new(s.contents().clone(), Limits::default());
    adopted.assert_indexes();
    let p = adopted.plan_ports(&changes(vec![(w, Some(wp))])).unwrap();
    assert_eq!(p, Plan::default());
    assert!(adopted.plan_full(&d, &none()).unwrap().is_empty());
    assert!(s.plan_ports(&Changes::new()).unwrap().is_empty());
}

#[test]
fn adopting_the_maps_is_never_a_flush() {
    let (w, wp) = web();
    let addrs: BTreeSet<_> = [ip("192.168.1.10")].into();
    let d = state(vec![(w, wp)]);
    let (_, c) = apply(&MapContents::default(), &d, &addrs);
    let mut s = SyncState::new(c.clone(), Limits::default());
    assert_eq!(s.contents(), &c);
    s.assert_indexes();
    assert!(s.plan_full(&d, &addrs).unwrap().is_empty());
    assert!(s.plan_node_addrs(&addrs).is_empty());
}

#[test]
fn removing_a_port_removes_exactly_its_entries() {
    let (w, wp) = web(); // 10.1.0.5 (local), 10.1.1.5
    let api = spn("default", "api", "", Protocol::Tcp);
    let ap = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.20"),
            80,
            Protocol::Tcp,
        )],
        &[ep("10.1.1.5", 8080, false), ep("10.1.2.5", 8080, false)],
    );
    let mut s = programmed(&state(vec![(w.clone(), wp), (api.clone(), ap)]));
    let before = s.contents().clone();
    let web_id = id_of(&before, "default/web:http/TCP");
    let shared = backend_id(&before, "10.1.1.5", 8080).unwrap();
    let only_web = backend_id(&before, "10.1.0.5", 8080).unwrap();
    let api_view = resolved(&before, "default/api/TCP");

    let p = s.plan_ports(&changes(vec![(w, None)])).unwrap();
    let web_keys: Vec<ServiceKey> = before
        .services
        .iter()
        .filter(|(_, v)| v.service_id == web_id)
        .map(|(k, _)| *k)
        .collect();
    let mut want: Vec<MapOp> = web_keys.into_iter().map(MapOp::DeleteService).collect();
    want.extend([0, 1, LOCAL_SLOT_BASE].map(|slot| {
        MapOp::DeleteSlot(BackendSlotKey {
            service_id: web_id,
            slot,
        })
    }));
    want.push(MapOp::DeleteBackend(only_web));
    want.push(MapOp::DeleteName(web_id));
    assert_eq!(p.ops, want);
    assert_eq!((p.service_changes, p.endpoint_changes), (1, 1));
    run(&mut s, &p, "remove web");
    s.assert_indexes();
    // The backend api shares with web survives, api is untouched.
    assert!(s.contents().backends.contains_key(&shared));
    assert_eq!(resolved(s.contents(), "default/api/TCP"), api_view);
    assert!(!s.contents().names.contains_key(&web_id));
}

#[test]
fn backend_flags_are_recomputed_from_every_use() {
    // Two ports use 10.1.0.7:8080; both see it local at first.
    let mk = |name: &str, vip: &str, local: bool, terminating: bool| {
        let e = Endpoint {
            addr: ip("10.1.0.7"),
            port: 8080,
            local,
            terminating,
        };
        (
            spn("default", name, "", Protocol::Tcp),
            DesiredServicePort {
                frontends: [fe(FrontendKind::ClusterIp, Some(vip), 80, Protocol::Tcp)].into(),
                backends: vec![e],
                local_backends: if local { vec![e] } else { vec![] },
                ..DesiredServicePort::default()
            },
        )
    };
    let (a, ap) = mk("a", "10.96.0.1", true, false);
    let (b, bp) = mk("b", "10.96.0.2", true, false);
    let mut s = programmed(&state(vec![(a.clone(), ap), (b.clone(), bp)]));
    let x = backend_id(s.contents(), "10.1.0.7", 8080).unwrap();
    let flags = |s: &SyncState| s.contents().backends[&x].flags;
    assert_eq!(flags(&s), backend_flags::LOCAL);

    // b stops seeing it local: a still does, the backend stays LOCAL.
    let (_, bp) = mk("b", "10.96.0.2", false, false);
    let p = s.plan_ports(&changes(vec![(b.clone(), Some(bp))])).unwrap();
    assert!(
        !p.ops.iter().any(|op| matches!(op, MapOp::PutBackend(..))),
        "{:?}",
        p.ops
    );
    run(&mut s, &p, "b not local");
    assert_eq!(flags(&s), backend_flags::LOCAL);

    // Now a too: LOCAL goes, in place, and both ports' sets changed.
    let (_, ap) = mk("a", "10.96.0.1", false, false);
    let p = s.plan_ports(&changes(vec![(a.clone(), Some(ap))])).unwrap();
    assert!(p.ops.contains(&MapOp::PutBackend(
        x,
        BackendValue {
            flags: 0,
            ..s.contents().backends[&x]
        }
    )));
    assert_eq!(p.endpoint_changes, 2); // a's own change, and b sees the flag
    run(&mut s, &p, "a not local");
    assert_eq!(flags(&s), 0);
    s.assert_indexes();

    // TERMINATING needs every use to be a fallback.
    let (_, ap) = mk("a", "10.96.0.1", false, true);
    let p = s.plan_ports(&changes(vec![(a.clone(), Some(ap))])).unwrap();
    run(&mut s, &p, "a terminating");
    assert_eq!(flags(&s), 0);
    let (_, bp) = mk("b", "10.96.0.2", false, true);
    let p = s.plan_ports(&changes(vec![(b.clone(), Some(bp))])).unwrap();
    assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
    run(&mut s, &p, "b terminating");
    assert_eq!(flags(&s), backend_flags::TERMINATING);
    s.assert_indexes();

    // Removing b leaves a's use alone deciding.
    let (_, ap) = mk("a", "10.96.0.1", true, false);
    let p = s
        .plan_ports(&changes(vec![(a, Some(ap)), (b, None)]))
        .unwrap();
    run(&mut s, &p, "a local, b gone");
    assert_eq!(flags(&s), backend_flags::LOCAL);
    s.assert_indexes();
}

#[test]
fn a_frontend_owned_outside_the_change_set_keeps_the_old_entries() {
    let (w, wp) = web();
    let other = spn("default", "other", "", Protocol::Tcp);
    let op = port(
        &[fe(
            FrontendKind::ClusterIp,
            Some("10.96.0.11"),
            80,
            Protocol::Tcp,
        )],
        &[ep("10.1.2.1", 80, false)],
    );
    let mut s = programmed(&state(vec![(w.clone(), wp.clone()), (other.clone(), op)]));
    let before = s.contents().clone();
    // web's update also claims other's cluster IP (and changes its backends).
    let stolen = fe(
        FrontendKind::ExternalIp,
        Some("10.96.0.11"),
        80,
        Protocol::Tcp,
    );
    let mut bad = wp.clone();
    bad.frontends.insert(stolen);
    bad.backends.pop();
    let p = s
        .plan_ports(&changes(vec![(w.clone(), Some(bad.clone()))]))
        .unwrap();
    assert_eq!(
        p.errors,
        vec![SyncError::DuplicateFrontend {
            service: "default/web:http/TCP".into(),
            frontend: format!("{stolen:?}"),
            owner: "default/other/TCP".into(),
        }]
    );
    assert!(p.ops.is_empty(), "{:?}", p.ops);
    assert_eq!((p.service_changes, p.endpoint_changes), (0, 0));
    run(&mut s, &p, "bad update");
    assert_eq!(s.contents(), &before);

    // A port that wants a key of the kept port is kept as well.
    let third = spn("default", "third", "", Protocol::Tcp);
    let tp = port(
        &[fe(FrontendKind::NodePort, None, 30080, Protocol::Tcp)],
        &[],
    );
    let p = s
        .plan_ports(&changes(vec![
            (w.clone(), Some(bad.clone())),
            (third.clone(), Some(tp)),
        ]))
        .unwrap();
    assert!(p.ops.is_empty(), "{:?}", p.ops);
    assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
    // Errors come in change-set order: "third" sorts before "web".
    assert_eq!(
        p.errors[0].to_string(),
        "default/third/TCP: frontend Frontend { kind: NodePort, addr: None, port: 30080, \
         protocol: Tcp } is already programmed for default/web:http/TCP; skipped"
    );

    // Once other lets the address go in the same change set, web gets it.
    let p = s
        .plan_ports(&changes(vec![
            (w.clone(), Some(bad.clone())),
            (other, None),
        ]))
        .unwrap();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    run(&mut s, &p, "handover");
    s.assert_indexes();
    let mut d = state(vec![(w, bad)]);
    assert_matches(s.contents(), &d, &[]);
    assert!(s.plan_full(&d, &none()).unwrap().is_empty());
    d.services.clear();
    let p = s.plan_full(&d, &none()).unwrap();
    run(&mut s, &p, "clear");
    assert_eq!(s.contents(), &MapContents::default());
    s.assert_indexes();
}

#[test]
fn plan_ports_respects_the_limits() {
    let limits = Limits {
        max_services: 3,
        ..Limits::default()
    };
    let (w, wp) = web(); // 2 frontends
    let mut s = SyncState::new(MapContents::default(), limits);
    let p = s.plan_ports(&changes(vec![(w.clone(), Some(wp))])).unwrap();
    run(&mut s, &p, "web");
    let big = spn("default", "big", "", Protocol::Tcp);
    let bp = port(
        &[
            fe(
                FrontendKind::ClusterIp,
                Some("10.96.0.30"),
                80,
                Protocol::Tcp,
            ),
            fe(
                FrontendKind::ExternalIp,
                Some("10.96.0.31"),
                80,
                Protocol::Tcp,
            ),
        ],
        &[ep("10.1.3.1", 80, false)],
    );
    let p = s
        .plan_ports(&changes(vec![(big.clone(), Some(bp.clone()))]))
        .unwrap();
    assert_eq!(
        p.errors,
        vec![SyncError::MapFull {
            service: "default/big/TCP".into(),
            map: "LB_SERVICES",
            max: 3,
        }]
    );
    assert!(p.ops.is_empty());
    // Removing web in the same change set makes room ("big" sorts first).
    let p = s
        .plan_ports(&changes(vec![(big.clone(), Some(bp.clone())), (w, None)]))
        .unwrap();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    run(&mut s, &p, "swap");
    assert_eq!(s.contents().services.len(), 2);
    // Too many backends: as with plan_full, the port is not programmed and
    // what it had is removed.
    let mut s = SyncState::new(
        s.contents().clone(),
        Limits {
            max_backends_per_service: 1,
            ..limits
        },
    );
    let mut two = bp;
    two.backends.push(ep("10.1.3.2", 80, false));
    let p = s.plan_ports(&changes(vec![(big, Some(two))])).unwrap();
    assert_eq!(p.errors.len(), 1);
    run(&mut s, &p, "too many");
    assert_eq!(s.contents(), &MapContents::default());
    s.assert_indexes();
}

#[test]
fn node_addresses_alone() {
    let s = SyncState::new(MapContents::default(), Limits::default());
    let a: BTreeSet<_> = [ip("192.168.1.1")].into();
    let p = s.plan_node_addrs(&a);
    assert_eq!(
        p.ops,
        vec![MapOp::PutNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 1]))]
    );
    let mut s = s;
    run(&mut s, &p, "addrs");
    assert!(s.plan_node_addrs(&a).is_empty());
    let p = s.plan_node_addrs(&none());
    assert_eq!(
        p.ops,
        vec![MapOp::DeleteNodeAddr(lb_common::ipv4_to_net([
            192, 168, 1, 1
        ]))]
    );
}

#[test]
fn ports_whose_names_collide_after_truncation_stay_apart() {
    // 63-character namespace and name: the protocol is cut off, so the TCP
    // and UDP ports of this service store the same name.
    let long = "n".repeat(63);
    let mk = |proto: Protocol, backend: &str| {
        (
            spn(&long, &long, "dns", proto),
            port(
                &[fe(FrontendKind::ClusterIp, Some("10.96.0.10"), 53, proto)],
                &[ep(backend, 53, false)],
            ),
        )
    };
    let (t, tp) = mk(Protocol::Tcp, "10.1.0.1");
    let (u, up) = mk(Protocol::Udp, "10.1.0.2");
    let mut s = SyncState::new(MapContents::default(), Limits::default());
    let p = s
        .plan_ports(&changes(vec![
            (t.clone(), Some(tp.clone())),
            (u.clone(), Some(up.clone())),
        ]))
        .unwrap();
    run(&mut s, &p, "both");
    let names: Vec<&String> = s.contents().names.values().collect();
    assert_eq!(names.len(), 2);
    assert_eq!(names[0], names[1]);
    // Changing or removing one leaves the other alone.
    let (_, up2) = mk(Protocol::Udp, "10.1.0.3");
    let tcp_key = tp.frontends.first().unwrap().key();
    let tcp_before = s.contents().services[&tcp_key];
    let p = s
        .plan_ports(&changes(vec![(u.clone(), Some(up2))]))
        .unwrap();
    run(&mut s, &p, "udp changed");
    let p = s.plan_ports(&changes(vec![(u, None)])).unwrap();
    run(&mut s, &p, "udp gone");
    assert_eq!(s.contents().services.len(), 1);
    assert_eq!(s.contents().services[&tcp_key], tcp_before);
    s.assert_indexes();
    assert!(s
        .plan_full(&state(vec![(t, tp)]), &none())
        .unwrap()
        .is_empty());
}

#[test]
fn property_plan_ports_equals_plan_full() {
    let mut rng = Rng(0x1ac7);
    // (ops, flag rewrites of kept backends, ports removed, shared-flag counts)
    let mut seen = (0, 0, 0, 0);
    for round in 0..60 {
        // Track 1: the whole-state planner. Track 2: only the changed ports.
        let mut full_c = MapContents::default();
        let mut s = SyncState::new(MapContents::default(), Limits::default());
        let mut prev = DesiredState::default();
        for step in 0..12 {
            let ctx = format!("round {round} step {step}");
            let (d, addrs) = random_state(&mut rng);
            let d = without_conflicts(d);
            let full = plan(&full_c, &d, &addrs).unwrap();
            assert!(full.errors.is_empty(), "{ctx}: {:?}", full.errors);
            for op in &full.ops {
                op.apply_to(&mut full_c);
            }

            let mut ch = desired_diff(&prev, &d);
            // Unchanged ports in the change set are harmless.
            for (n, p) in &d.services {
                if rng.chance(20) {
                    ch.insert(n.clone(), Some(p.clone()));
                }
            }
            let p = s.plan_ports(&ch).unwrap();
            assert!(p.errors.is_empty(), "{ctx}: {:?}", p.errors);
            // Same ops (ids are deterministic), same counts.
            let full_ops: Vec<MapOp> = full
                .ops
                .iter()
                .filter(|op| !matches!(op, MapOp::PutNodeAddr(_) | MapOp::DeleteNodeAddr(_)))
                .cloned()
                .collect();
            assert_eq!(p.ops, full_ops, "{ctx}");
            assert_eq!(
                (p.service_changes, p.endpoint_changes),
                (full.service_changes, full.endpoint_changes),
                "{ctx}"
            );
            seen.0 += p.ops.len();
            seen.1 += p
                .ops
                .iter()
                .filter(|op| {
                    matches!(op, MapOp::PutBackend(id, _) if s.contents().backends.contains_key(id))
                })
                .count();
            seen.2 += ch.values().filter(|p| p.is_none()).count();
            if p.endpoint_changes > ch.len() {
                seen.3 += 1; // a port outside the change set saw a flag change
            }
            run(&mut s, &p, &ctx);
            let n = s.plan_node_addrs(&addrs);
            run(&mut s, &n, &ctx);
            assert_eq!(s.contents(), &full_c, "{ctx}");
            s.assert_indexes();
            // Nothing left for the whole-state planner, nor for the ports.
            let mut probe = s.clone();
            assert!(probe.plan_full(&d, &addrs).unwrap().is_empty(), "{ctx}");
            let all: Changes = d
                .services
                .iter()
                .map(|(n, p)| (n.clone(), Some(p.clone())))
                .collect();
            assert!(s.plan_ports(&all).unwrap().is_empty(), "{ctx}");
            prev = d;
        }
    }
    // The generator reaches the interesting cases.
    assert!(
        seen.0 > 1_000 && seen.1 > 20 && seen.2 > 50 && seen.3 > 5,
        "{seen:?}"
    );
}

#[test]
fn property_plan_ports_touches_only_its_ports() {
    // Raw random states (duplicate frontends included), random subsets of
    // the changes, now and then a restart (adoption) or a relist.
    let mut rng = Rng(0xd1ff);
    let (mut kept_ports, mut programmed_ports) = (0, 0);
    for round in 0..40 {
        let mut s = SyncState::new(MapContents::default(), Limits::default());
        let mut applied_desired = DesiredState::default();
        for step in 0..15 {
            let ctx = format!("round {round} step {step}");
            let (d, addrs) = random_state(&mut rng);
            if rng.chance(10) {
                s = SyncState::new(s.contents().clone(), Limits::default());
                s.assert_indexes();
            }
            if rng.chance(15) {
                let p = s.plan_full(&d, &addrs).unwrap();
                run(&mut s, &p, &ctx);
                assert_matches(s.contents(), &d, &p.errors);
                applied_desired = d;
                s.assert_indexes();
                continue;
            }
            let ch: Changes = desired_diff(&applied_desired, &d)
                .into_iter()
                .filter(|_| rng.chance(70))
                .collect();
            let before = s.contents().clone();
            let untouched: Vec<String> = before
                .names
                .values()
                .filter(|n| !ch.keys().any(|k| &k.to_string() == *n))
                .cloned()
                .collect();
            let p = s.plan_ports(&ch).unwrap();
            run(&mut s, &p, &ctx);
            s.assert_indexes();
            for n in &untouched {
                assert_eq!(
                    resolved(s.contents(), n),
                    resolved(&before, n),
                    "{ctx}: {n}"
                );
            }
            for (name, port) in &ch {
                let label = name.to_string();
                let reported: Vec<&SyncError> = p
                    .errors
                    .iter()
                    .filter(|e| e.to_string().starts_with(&format!("{label}:")))
                    .collect();
                let now = resolved(s.contents(), &label);
                let kept = reported.iter().any(|e| {
                    matches!(e, SyncError::DuplicateFrontend { owner, .. }
                        if !ch.keys().any(|k| &k.to_string() == owner))
                });
                if kept {
                    kept_ports += 1;
                    assert_eq!(now, resolved(&before, &label), "{ctx}: {label} kept");
                } else if reported.is_empty() {
                    programmed_ports += 1;
                    let want = port.iter().map(|p| (name.clone(), p.clone())).collect();
                    let want = DesiredState { services: want };
                    assert_matches(s.contents(), &want, &[]);
                }
                if reported.is_empty() || !kept {
                    match port {
                        Some(p) => applied_desired.services.insert(name.clone(), p.clone()),
                        None => applied_desired.services.remove(name),
                    };
                }
            }
            // A relist converges from wherever the events left the maps.
            let mut probe = s.clone();
            let p = probe.plan_full(&d, &addrs).unwrap();
            run(&mut probe, &p, &format!("{ctx} relist"));
            probe.assert_indexes();
            assert_matches(probe.contents(), &d, &p.errors);
            assert!(probe.plan_full(&d, &addrs).unwrap().is_empty(), "{ctx}");
        }
    }
    assert!(
        kept_ports > 20 && programmed_ports > 200,
        "{kept_ports} {programmed_ports}"
    );
}

/// 10,000 service ports x 10 endpoints: one endpoint event is a handful of
/// writes, whatever the size (the structural proof of incrementality; the
/// timing is `cargo xtask bench`'s).
#[test]
fn one_endpoint_change_at_scale_is_a_handful_of_ops() {
    const PORTS: u32 = 10_000;
    let svc = |i: u32| -> (ServicePortName, DesiredServicePort) {
        let vip = Ipv4Addr::from(0x0a60_0000 + i); // 10.96.x.y
        let eps = (0..10)
            .map(|j| Endpoint {
                addr: Ipv4Addr::from(0x0a01_0000 + i * 16 + j), // 10.1.x.y
                port: 8080,
                local: j == 0,
                terminating: false,
            })
            .collect::<Vec<_>>();
        let mut p = DesiredServicePort {
            frontends: [Frontend {
                kind: FrontendKind::ClusterIp,
                addr: Some(vip),
                port: 80,
                protocol: Protocol::Tcp,
            }]
            .into(),
            ..DesiredServicePort::default()
        };
        p.local_backends = eps.iter().filter(|e| e.local).copied().collect();
        p.backends = eps;
        (
            spn("default", &format!("svc-{i:05}"), "http", Protocol::Tcp),
            p,
        )
    };
    let d = DesiredState {
        services: (0..PORTS).map(svc).collect(),
    };
    let mut s = SyncState::new(MapContents::default(), Limits::default());
    let p = s.plan_full(&d, &none()).unwrap();
    assert!(p.errors.is_empty());
    for op in &p.ops {
        s.apply(op);
    }
    assert_eq!(s.contents().services.len(), PORTS as usize);
    assert_eq!(s.contents().slots.len(), PORTS as usize * 11);

    // One more endpoint for one port: backend, slot, count.
    let (name, mut port) = svc(4_242);
    port.backends.push(Endpoint {
        addr: ip("10.200.0.1"),
        port: 8080,
        local: false,
        terminating: false,
    });
    let p = s
        .plan_ports(&changes(vec![(name.clone(), Some(port.clone()))]))
        .unwrap();
    assert_eq!(p.ops.len(), 3, "{:?}", p.ops);
    assert_eq!((p.service_changes, p.endpoint_changes), (0, 1));
    for op in &p.ops {
        s.apply(op);
    }
    // It goes again: slot count back, slot and backend deleted.
    port.backends.pop();
    let p = s.plan_ports(&changes(vec![(name, Some(port))])).unwrap();
    assert_eq!(p.ops.len(), 3, "{:?}", p.ops);
    for op in &p.ops {
        s.apply(op);
    }
    // An endpoint replaced in place: new backend, one slot, old backend out.
    let (name, mut port) = svc(17);
    port.backends[9].addr = ip("10.1.0.255");
    let p = s.plan_ports(&changes(vec![(name, Some(port))])).unwrap();
    assert!(p.ops.len() <= 4, "{:?}", p.ops);
}

#[test]
fn planner_errors_name_their_service() {
    let e = SyncError::DuplicateFrontend {
        service: "prod/api:http/TCP".into(),
        frontend: "10.96.0.10:80/TCP".into(),
        owner: "prod/web:http/TCP".into(),
    };
    assert_eq!(e.service_ref(), Some(("prod".into(), "api".into())));
    let e = SyncError::MapFull {
        service: "default/dns/UDP".into(),
        map: "LB_BACKENDS",
        max: 1,
    };
    assert_eq!(e.service_ref(), Some(("default".into(), "dns".into())));
    let e = SyncError::IdsExhausted { what: "service" };
    assert_eq!(e.service_ref(), None);
}
