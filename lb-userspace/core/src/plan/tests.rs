//! The planner: unit tests per rule, and properties (proptest) that hold
//! for any desired state: plans converge, never expose a half-written
//! backend set, a `Ports` plan equals a `Full` one, ownership of a frontend
//! does not depend on the order events arrive in (C7).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, service_flags, BackendSlotKey, ServiceKey, LOCAL_SLOT_BASE, SCOPE_NODEPORT,
};
use proptest::prelude::*;

use super::*;
use crate::desired::{DesiredState, Endpoint, FrontendKind, Protocol};

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

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

fn cip(addr: &str, port: u16) -> Frontend {
    fe(FrontendKind::ClusterIp, Some(addr), port, TCP)
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
        ..DesiredServicePort::default()
    }
}

fn created(p: DesiredServicePort, t: &str) -> DesiredServicePort {
    DesiredServicePort {
        created: Some(t.parse().unwrap()),
        ..p
    }
}

fn web() -> (ServicePortName, DesiredServicePort) {
    (
        spn("default", "web", "http", TCP),
        port(
            &[
                cip("10.96.0.10", 80),
                fe(FrontendKind::NodePort, None, 30080, TCP),
            ],
            &[ep("10.1.0.5", 8080, true), ep("10.1.1.5", 8080, false)],
        ),
    )
}

fn small() -> (ServicePortName, DesiredServicePort) {
    (
        spn("default", "small", "", TCP),
        port(&[cip("10.96.0.20", 80)], &[ep("10.1.3.1", 80, false)]),
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

/// Every service entry's counts reference slots that exist and point to
/// existing backends: what the datapath may read at any moment.
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

/// Executes a plan one op at a time, checking the order and that no prefix
/// exposes a half-written set; then the mirror's indexes.
fn execute(p: &mut Planner, plan: &Plan, context: &str) {
    for w in plan.ops.windows(2) {
        assert!(
            w[0].phase() <= w[1].phase(),
            "{context}: out of order: {:?} before {:?}",
            w[0],
            w[1]
        );
    }
    assert_consistent(p.contents(), &format!("{context}: start"));
    for (i, op) in plan.ops.iter().enumerate() {
        p.apply(op);
        assert_consistent(p.contents(), &format!("{context}: after op {i} {op:?}"));
    }
    p.assert_indexes();
}

/// Plans and executes; then checks that planning `Full` again yields nothing.
fn run(p: &mut Planner, d: &DesiredState, addrs: &BTreeSet<Ipv4Addr>, scope: Scope<'_>) -> Plan {
    let plan = p.plan(d, addrs, scope).unwrap();
    execute(p, &plan, "run");
    let again = p.plan(d, addrs, Scope::Full).unwrap();
    assert!(again.ops.is_empty(), "not converged: {:?}", again.ops);
    assert_eq!((again.service_changes, again.endpoint_changes), (0, 0));
    plan
}

fn full(d: &DesiredState) -> (Planner, Plan) {
    let mut p = Planner::default();
    let plan = run(&mut p, d, &none(), Scope::Full);
    (p, plan)
}

fn sid_of(c: &MapContents, name: &ServicePortName) -> Option<u32> {
    c.names.iter().find(|(_, n)| *n == name).map(|(i, _)| *i)
}

/// The owner of each programmed frontend key, by name: what traffic to it
/// reaches, without ids.
fn owners(c: &MapContents) -> BTreeMap<ServiceKey, ServicePortName> {
    c.services
        .iter()
        .map(|(k, v)| (*k, c.names[&v.service_id].clone()))
        .collect()
}

// ---- unit tests, one rule each ---------------------------------------------

#[test]
fn first_plan_writes_everything_in_order() {
    let d = state(vec![web()]);
    let addrs: BTreeSet<_> = [ip("192.168.1.10")].into();
    let mut p = Planner::default();
    let plan = run(&mut p, &d, &addrs, Scope::Full);
    let c = p.contents();
    assert!(plan.errors.is_empty() && plan.full);
    assert_eq!((plan.service_changes, plan.endpoint_changes), (1, 1));
    // Two backends, three slots, a name, a node address, two frontends.
    assert_eq!(plan.ops.len(), 2 + 3 + 1 + 1 + 2);
    assert_eq!(c.names.get(&1), Some(&web().0));
    let v = c.services[&cip("10.96.0.10", 80).key()];
    assert_eq!(
        (
            v.service_id,
            v.backend_count,
            v.local_backend_count,
            v.flags
        ),
        (1, 2, 1, service_flags::CLUSTER_IP)
    );
    let np = c
        .services
        .iter()
        .find(|(k, _)| k.scope == SCOPE_NODEPORT)
        .unwrap();
    assert_eq!((np.0.addr, np.1.flags), (0, service_flags::NODE_PORT));
    // Slots 0.. for the cluster set in order, LOCAL_SLOT_BASE.. for the local set;
    // one backend entry per endpoint, shared by both sets of the port.
    let slot = |slot| {
        c.slots[&BackendSlotKey {
            service_id: 1,
            slot,
        }]
            .backend_id
    };
    assert_eq!(slot(0), slot(LOCAL_SLOT_BASE));
    let b = c.backends[&slot(0)];
    assert_eq!(
        b.flags,
        backend_flags::LOCAL | backend_flags::IN_CLUSTER_SET | backend_flags::IN_LOCAL_SET
    );
    assert_eq!(b.service_id, 1);
    assert_eq!(lb_common::net_to_ipv4(b.addr), [10, 1, 0, 5]);
    assert_eq!(lb_common::net_to_port(b.port), 8080);
    assert_eq!(
        c.node_addrs,
        [lb_common::ipv4_to_net([192, 168, 1, 10])].into()
    );
}

#[test]
fn an_unchanged_state_yields_no_ops_in_either_scope() {
    let d = state(vec![web()]);
    let (mut p, _) = full(&d);
    let plan = p.plan(&d, &none(), Scope::Full).unwrap();
    assert!(plan.is_empty());
    assert_eq!((plan.service_changes, plan.endpoint_changes), (0, 0));
    let changed: BTreeSet<_> = [web().0].into();
    assert!(p
        .plan(&d, &none(), Scope::Ports(&changed))
        .unwrap()
        .is_empty());
    assert!(Planner::default()
        .plan(&DesiredState::default(), &none(), Scope::Full)
        .unwrap()
        .is_empty());
}

#[test]
fn adopting_the_maps_is_never_a_flush() {
    // An agent restart: a new planner on the same maps plans nothing.
    let d = state(vec![web(), small()]);
    let (p, _) = full(&d);
    let mut again = Planner::adopt(p.contents().clone(), Limits::default());
    assert!(again.plan(&d, &none(), Scope::Full).unwrap().is_empty());
    // A Ports plan before any Full plan cannot know the other claims: it is a
    // full diff (and still nothing to do).
    let mut again = Planner::adopt(p.contents().clone(), Limits::default());
    let changed: BTreeSet<_> = [small().0].into();
    let plan = again.plan(&d, &none(), Scope::Ports(&changed)).unwrap();
    assert!(plan.full && plan.is_empty());
}

#[test]
fn ids_are_kept_and_new_ones_are_the_smallest_free() {
    let (w, wp) = web();
    let dns = spn("kube-system", "dns", "dns", UDP);
    let dnsp = port(
        &[fe(FrontendKind::ClusterIp, Some("10.96.0.53"), 53, UDP)],
        &[ep("10.1.0.9", 53, false)],
    );
    let (mut p, _) = full(&state(vec![(w.clone(), wp.clone())]));
    run(
        &mut p,
        &state(vec![(w.clone(), wp.clone()), (dns.clone(), dnsp.clone())]),
        &none(),
        Scope::Full,
    );
    assert_eq!(sid_of(p.contents(), &w), Some(1));
    assert_eq!(sid_of(p.contents(), &dns), Some(2));
    let dns_backend = p.contents().slots[&BackendSlotKey {
        service_id: 2,
        slot: 0,
    }]
        .backend_id;
    // Removing web keeps dns's ids; only deletes.
    let plan = run(
        &mut p,
        &state(vec![(dns.clone(), dnsp.clone())]),
        &none(),
        Scope::Full,
    );
    assert_eq!(sid_of(p.contents(), &dns), Some(2));
    assert_eq!(
        p.contents().slots[&BackendSlotKey {
            service_id: 2,
            slot: 0
        }]
            .backend_id,
        dns_backend
    );
    assert_eq!((plan.service_changes, plan.endpoint_changes), (1, 1));
    assert!(
        plan.ops
            .iter()
            .all(|op| op.phase() >= MapOp::FIRST_DELETE_PHASE),
        "{:?}",
        plan.ops
    );
    // A new port gets the smallest free id again.
    run(
        &mut p,
        &state(vec![(w.clone(), wp), (dns, dnsp)]),
        &none(),
        Scope::Full,
    );
    assert_eq!(sid_of(p.contents(), &w), Some(1));
}

#[test]
fn ids_still_in_the_maps_are_not_reused_in_the_same_plan() {
    let (mut p, _) = full(&state(vec![web()]));
    let other = spn("default", "other", "", TCP);
    let op = port(&[cip("10.96.0.11", 80)], &[ep("10.1.2.1", 80, false)]);
    run(
        &mut p,
        &state(vec![(other.clone(), op)]),
        &none(),
        Scope::Full,
    );
    // Service id 1 and backend ids 1, 2 were live while the plan ran.
    assert_eq!(sid_of(p.contents(), &other), Some(2));
    assert_eq!(
        p.contents().backends.keys().copied().collect::<Vec<_>>(),
        vec![3]
    );
}

#[test]
fn a_port_keeps_its_id_through_a_frontend_change() {
    let (w, mut wp) = web();
    let (mut p, _) = full(&state(vec![(w.clone(), wp.clone())]));
    wp.frontends.retain(|f| f.kind != FrontendKind::NodePort);
    wp.frontends
        .insert(fe(FrontendKind::ExternalIp, Some("203.0.113.7"), 80, TCP));
    let plan = run(&mut p, &state(vec![(w, wp)]), &none(), Scope::Full);
    assert!(p.contents().services.values().all(|v| v.service_id == 1));
    assert_eq!((plan.service_changes, plan.endpoint_changes), (1, 0));
    assert_eq!(
        plan.ops.iter().map(MapOp::phase).collect::<Vec<_>>(),
        vec![5, 6]
    );
}

#[test]
fn a_backend_flag_change_rewrites_that_backend_in_place() {
    let (w, mut wp) = web();
    let (mut p, _) = full(&state(vec![(w.clone(), wp.clone())]));
    let before = p.contents().clone();
    wp.backends[1].terminating = true;
    let plan = run(&mut p, &state(vec![(w, wp)]), &none(), Scope::Full);
    let [MapOp::PutBackend(id, v)] = plan.ops.as_slice() else {
        panic!("{:?}", plan.ops)
    };
    assert_eq!(
        v.flags,
        backend_flags::TERMINATING | backend_flags::IN_CLUSTER_SET
    );
    assert_eq!(before.backends[id].addr, v.addr);
    assert_eq!((plan.service_changes, plan.endpoint_changes), (0, 1));
}

#[test]
fn backends_belong_to_one_port_with_that_ports_flags() {
    // One pod behind two Services: a terminating fallback for one, ready for
    // the other. Each port has its own backend entry with its own flags, and
    // changing one never rewrites the other's.
    let a = spn("default", "a", "", TCP);
    let b = spn("default", "b", "", TCP);
    let pod = ep("10.1.0.7", 8080, true);
    let pa = port(
        &[cip("10.96.0.1", 80)],
        &[Endpoint {
            terminating: true,
            ..pod
        }],
    );
    let pb = port(&[cip("10.96.0.2", 80)], &[pod]);
    let (mut p, _) = full(&state(vec![(a.clone(), pa.clone()), (b.clone(), pb)]));
    let flags = |p: &Planner, n: &ServicePortName| {
        let sid = sid_of(p.contents(), n).unwrap();
        let bid = p.contents().slots[&BackendSlotKey {
            service_id: sid,
            slot: 0,
        }]
            .backend_id;
        p.contents().backends[&bid].flags
    };
    let both_sets = backend_flags::IN_CLUSTER_SET | backend_flags::IN_LOCAL_SET;
    assert_eq!(
        flags(&p, &a),
        backend_flags::LOCAL | backend_flags::TERMINATING | both_sets
    );
    assert_eq!(flags(&p, &b), backend_flags::LOCAL | both_sets);
    assert_eq!(p.contents().backends.len(), 2);
    // b goes away: a's entry is untouched.
    let plan = run(&mut p, &state(vec![(a.clone(), pa)]), &none(), Scope::Full);
    assert!(plan
        .ops
        .iter()
        .all(|op| !matches!(op, MapOp::PutBackend(..))));
    assert_eq!(plan.endpoint_changes, 1);
    assert_eq!(
        flags(&p, &a),
        backend_flags::LOCAL | backend_flags::TERMINATING | both_sets
    );
}

#[test]
fn f9_tcp_and_udp_never_share_ids() {
    let both = |proto| {
        (
            spn("kube-system", "dns", "dns", proto),
            port(
                &[fe(FrontendKind::ClusterIp, Some("10.96.0.10"), 53, proto)],
                &[ep("10.1.0.9", 53, false)],
            ),
        )
    };
    let (p, _) = full(&state(vec![both(TCP), both(UDP)]));
    let c = p.contents();
    assert_eq!(c.services.len(), 2);
    let sids: BTreeSet<u32> = c.services.values().map(|v| v.service_id).collect();
    assert_eq!(sids.len(), 2);
    let protos: BTreeSet<u8> = c.backends.values().map(|b| b.proto).collect();
    assert_eq!(protos, [lb_common::PROTO_TCP, lb_common::PROTO_UDP].into());
}

#[test]
fn shrinking_publishes_the_count_before_deleting_slots() {
    let (w, mut wp) = web();
    let (mut p, _) = full(&state(vec![(w.clone(), wp.clone())]));
    wp.backends.remove(0);
    wp.local_backends.clear();
    let plan = run(&mut p, &state(vec![(w, wp)]), &none(), Scope::Full);
    assert!(plan.ops.iter().any(|op| matches!(op, MapOp::DeleteSlot(_))));
}

#[test]
fn values_carry_service_flags_and_affinity() {
    let (w, mut wp) = web();
    wp.flags = service_flags::AFFINITY | service_flags::EXTERNAL_LOCAL;
    wp.affinity_timeout_sec = 10_800;
    let (p, _) = full(&state(vec![(w, wp)]));
    for (k, v) in &p.contents().services {
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

#[test]
fn per_port_backend_limit_skips_only_that_port() {
    let limits = Limits {
        max_backends_per_service: 1,
        ..Limits::default()
    };
    let d = state(vec![web(), small()]);
    let mut p = Planner::adopt(MapContents::default(), limits);
    let plan = run(&mut p, &d, &none(), Scope::Full);
    assert_eq!(
        plan.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec!["default/web:http/TCP: 2 backends in its cluster-wide set, more than the 1 one service port can hold; not programmed"]
    );
    assert_eq!(plan.new_errors, plan.errors);
    assert_eq!(
        p.contents().names.values().cloned().collect::<Vec<_>>(),
        vec![small().0]
    );
    // Reported once: the next plan still has it, but nothing new.
    let plan = p.plan(&d, &none(), Scope::Full).unwrap();
    assert_eq!(plan.errors.len(), 1);
    assert!(plan.new_errors.is_empty());
}

#[test]
fn map_capacity_refuses_the_port_that_does_not_fit_and_retries_it() {
    // web: 2 frontends, 2 backends, 3 slots; small: 1, 1, 1.
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
        let mut p = Planner::adopt(MapContents::default(), limits);
        let d = state(vec![web(), small()]);
        let plan = run(&mut p, &d, &none(), Scope::Full);
        assert_eq!(
            plan.errors,
            vec![PlanError::MapFull {
                port: web().0,
                map,
                max,
            }],
            "{map}"
        );
        assert_eq!(
            p.contents().names.values().cloned().collect::<Vec<_>>(),
            vec![small().0]
        );
        // small goes away (an incremental plan about small only): web, left
        // out before, is retried and now fits.
        let changed: BTreeSet<_> = [small().0].into();
        let plan = run(&mut p, &state(vec![web()]), &none(), Scope::Ports(&changed));
        assert!(plan.errors.is_empty(), "{map}: {:?}", plan.errors);
        assert_eq!(
            p.contents().names.values().cloned().collect::<Vec<_>>(),
            vec![web().0]
        );
    }
}

#[test]
fn programmed_ports_keep_their_room_before_new_ones() {
    // web is programmed; "default/a-new" (sorts first) arrives when there is
    // no room: the new one is refused, the working one stays.
    let limits = Limits {
        max_services: 2,
        ..Limits::default()
    };
    let mut p = Planner::adopt(MapContents::default(), limits);
    run(&mut p, &state(vec![web()]), &none(), Scope::Full);
    let newer = spn("default", "a-new", "", TCP);
    let d = state(vec![
        web(),
        (newer.clone(), port(&[cip("10.96.0.30", 80)], &[])),
    ]);
    for scope in [Scope::Full, Scope::Ports(&[newer.clone()].into())] {
        let mut q = p.clone();
        let plan = run(&mut q, &d, &none(), scope);
        assert_eq!(plan.errors.len(), 1, "{scope:?}");
        assert_eq!(plan.errors[0].port(), Some(&newer));
        assert!(sid_of(q.contents(), &web().0).is_some());
    }
}

#[test]
fn c7_a_clusterip_beats_an_external_ip_and_the_older_service_beats_the_newer() {
    let old = spn("default", "z-old", "", TCP);
    let new = spn("default", "a-new", "", TCP);
    let thief = spn("default", "thief", "", TCP);
    let ext = fe(FrontendKind::ExternalIp, Some("203.0.113.7"), 80, TCP);
    let d = state(vec![
        (
            old.clone(),
            created(
                port(&[cip("10.96.0.2", 80), ext], &[]),
                "2024-01-01T00:00:00Z",
            ),
        ),
        (
            new.clone(),
            created(
                port(&[cip("10.96.0.1", 80), ext], &[]),
                "2025-01-01T00:00:00Z",
            ),
        ),
        // Older than everyone, but claims z-old's ClusterIP as an external IP.
        (
            thief.clone(),
            created(
                port(
                    &[
                        cip("10.96.0.3", 80),
                        fe(FrontendKind::ExternalIp, Some("10.96.0.2"), 80, TCP),
                    ],
                    &[],
                ),
                "2020-01-01T00:00:00Z",
            ),
        ),
    ]);
    let (p, plan) = full(&d);
    let o = owners(p.contents());
    assert_eq!(o[&ext.key()], old);
    assert_eq!(o[&cip("10.96.0.2", 80).key()], old);
    assert_eq!(o.len(), 4);
    let msgs: Vec<String> = plan.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        msgs,
        vec![
            "default/a-new/TCP: spec.externalIPs 203.0.113.7:80/TCP is already served by default/z-old/TCP (a ClusterIP, or an older Service, keeps it); skipped",
            "default/thief/TCP: spec.externalIPs 10.96.0.2:80/TCP is already served by default/z-old/TCP (a ClusterIP, or an older Service, keeps it); skipped",
        ]
    );
}

#[test]
fn c7_ownership_does_not_depend_on_arrival_order_and_moves_when_the_owner_goes() {
    let old = spn("default", "z-old", "", TCP);
    let new = spn("default", "a-new", "", TCP);
    let ext = fe(FrontendKind::ExternalIp, Some("203.0.113.7"), 80, TCP);
    let po = created(
        port(&[cip("10.96.0.2", 80), ext], &[ep("10.1.0.2", 80, false)]),
        "2024-01-01T00:00:00Z",
    );
    let pn = created(
        port(&[cip("10.96.0.1", 80), ext], &[ep("10.1.0.1", 80, false)]),
        "2025-01-01T00:00:00Z",
    );
    let both = state(vec![(old.clone(), po.clone()), (new.clone(), pn.clone())]);
    // The newer Service is programmed first (its event came first), then the
    // older one arrives: the older one takes the address over.
    let mut p = Planner::default();
    run(
        &mut p,
        &state(vec![(new.clone(), pn.clone())]),
        &none(),
        Scope::Full,
    );
    assert_eq!(owners(p.contents())[&ext.key()], new);
    let plan = run(&mut p, &both, &none(), Scope::Ports(&[old.clone()].into()));
    assert_eq!(owners(p.contents())[&ext.key()], old);
    assert_eq!(plan.new_errors.len(), 1);
    assert_eq!(plan.new_errors[0].port(), Some(&new));
    // A relist (Full) and a restart (adopt + Full) change nothing.
    assert!(p.plan(&both, &none(), Scope::Full).unwrap().is_empty());
    let mut restarted = Planner::adopt(p.contents().clone(), Limits::default());
    assert!(restarted
        .plan(&both, &none(), Scope::Full)
        .unwrap()
        .is_empty());
    // The owner goes away: the other claimant gets the address in the same
    // incremental plan.
    let plan = run(
        &mut p,
        &state(vec![(new.clone(), pn)]),
        &none(),
        Scope::Ports(&[old.clone()].into()),
    );
    assert_eq!(owners(p.contents())[&ext.key()], new);
    assert!(plan.errors.is_empty());
}

#[test]
fn node_addresses_are_diffed_and_bounded() {
    let a: BTreeSet<_> = [ip("192.168.1.1"), ip("192.168.1.2")].into();
    let mut p = Planner::default();
    let d = DesiredState::default();
    run(&mut p, &d, &a, Scope::Full);
    let b: BTreeSet<_> = [ip("192.168.1.2"), ip("192.168.1.3")].into();
    // Any scope diffs the node addresses.
    let plan = run(&mut p, &d, &b, Scope::Ports(&BTreeSet::new()));
    assert_eq!(
        plan.ops,
        vec![
            MapOp::PutNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 3])),
            MapOp::DeleteNodeAddr(lb_common::ipv4_to_net([192, 168, 1, 1])),
        ]
    );
    let limits = Limits {
        max_node_addrs: 1,
        ..Limits::default()
    };
    let mut p = Planner::adopt(MapContents::default(), limits);
    let plan = p.plan(&d, &b, Scope::Full).unwrap();
    assert_eq!(plan.ops.len(), 1);
    assert_eq!(
        plan.errors[0].to_string(),
        "node address 192.168.1.3: more than 1 node addresses; not programmed"
    );
}

#[test]
fn removing_a_port_removes_exactly_its_entries() {
    let (w, wp) = web();
    let (s, sp) = small();
    let (mut p, _) = full(&state(vec![(w.clone(), wp), (s.clone(), sp.clone())]));
    let before = p.contents().clone();
    let web_sid = sid_of(&before, &w).unwrap();
    let plan = run(
        &mut p,
        &state(vec![(s.clone(), sp)]),
        &none(),
        Scope::Ports(&[w.clone()].into()),
    );
    for op in &plan.ops {
        match op {
            MapOp::DeleteService(k) => assert_eq!(before.services[k].service_id, web_sid),
            MapOp::DeleteSlot(k) => assert_eq!(k.service_id, web_sid),
            MapOp::DeleteName(id) => assert_eq!(*id, web_sid),
            MapOp::DeleteBackend(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        p.contents().names.values().cloned().collect::<Vec<_>>(),
        vec![s]
    );
}

#[test]
fn maps_written_by_an_older_agent_are_taken_over_without_a_gap() {
    // Older agents shared one backend entry between the ports using an
    // endpoint. The planner gives each port its own entry: fresh ids,
    // written before the slots move, the shared one deleted last.
    let a = spn("default", "a", "", TCP);
    let b = spn("default", "b", "", TCP);
    let pod = ep("10.1.0.7", 8080, false);
    let d = state(vec![
        (a.clone(), port(&[cip("10.96.0.1", 80)], &[pod])),
        (b.clone(), port(&[cip("10.96.0.2", 80)], &[pod])),
    ]);
    let (p, _) = full(&d);
    let mut shared = p.contents().clone();
    let b_sid = sid_of(&shared, &b).unwrap();
    let a_bid = shared.slots[&BackendSlotKey {
        service_id: sid_of(&shared, &a).unwrap(),
        slot: 0,
    }];
    let b_bid = shared
        .slots
        .insert(
            BackendSlotKey {
                service_id: b_sid,
                slot: 0,
            },
            a_bid,
        )
        .unwrap();
    shared.backends.remove(&b_bid.backend_id);
    let mut old = Planner::adopt(shared, Limits::default());
    let plan = run(&mut old, &d, &none(), Scope::Full);
    assert!(!plan.is_empty());
    assert_eq!(old.contents().backends.len(), 2);
}

#[test]
fn a_port_with_every_frontend_taken_is_not_programmed() {
    let (w, wp) = web();
    let copy = spn("default", "zz-copy", "", TCP);
    let d = state(vec![(w, wp.clone()), (copy.clone(), wp)]);
    let (p, plan) = full(&d);
    assert_eq!(plan.errors.len(), 2);
    assert!(sid_of(p.contents(), &copy).is_none());
}

#[test]
fn f7_source_ranges_go_in_with_the_lb_ips_and_fail_closed() {
    let lb = fe(FrontendKind::LoadBalancer, Some("198.51.100.10"), 80, TCP);
    let name = spn("default", "lb", "", TCP);
    let mut pt = port(&[cip("10.96.0.40", 80), lb], &[ep("10.1.0.9", 80, false)]);
    pt.flags = service_flags::SOURCE_RANGES;
    pt.source_ranges = vec![
        "10.0.0.0/8".parse().unwrap(),
        "192.168.1.0/24".parse().unwrap(),
    ];
    let d = state(vec![(name.clone(), pt.clone())]);
    // The ranges are written before the frontends that need them.
    let node: BTreeSet<_> = [ip("192.168.1.7")].into();
    let mut p = Planner::default();
    let plan = run(&mut p, &d, &node, Scope::Full);
    let put_range = plan
        .ops
        .iter()
        .position(|o| matches!(o, MapOp::PutSourceRange(..)))
        .unwrap();
    let put_lb = plan
        .ops
        .iter()
        .position(|o| matches!(o, MapOp::PutService(k, _) if *k == lb.key()))
        .unwrap();
    assert!(put_range < put_lb);
    assert_eq!(p.contents().source_ranges.len(), 2);
    // A range holds a node address: the node's own connections get through.
    let v = p.contents().services[&lb.key()];
    assert_eq!(
        v.flags,
        service_flags::LOAD_BALANCER
            | service_flags::SOURCE_RANGES
            | service_flags::SOURCE_RANGES_ALLOW_NODE
    );
    // A range changes: one put, one delete, counted as a service change.
    let mut narrower = pt.clone();
    narrower.source_ranges.pop();
    let plan = run(
        &mut p,
        &state(vec![(name.clone(), narrower)]),
        &node,
        Scope::Full,
    );
    assert_eq!(plan.ops.len(), 2 + 1, "{:?}", plan.ops); // flag rewrite on two frontends, one range gone
    assert_eq!(plan.service_changes, 1);
    // No room for the ranges: programmed without its LoadBalancer IP, retried.
    let limits = Limits {
        max_source_ranges: 1,
        ..Limits::default()
    };
    let mut p = Planner::adopt(MapContents::default(), limits);
    let plan = run(&mut p, &d, &none(), Scope::Full);
    assert!(
        matches!(plan.errors[0], PlanError::SourceRangesFull { .. }),
        "{:?}",
        plan.errors
    );
    assert!(!p.contents().services.contains_key(&lb.key()));
    assert!(p
        .contents()
        .services
        .contains_key(&cip("10.96.0.40", 80).key()));
    assert!(p.contents().source_ranges.is_empty());
    // The port is gone: so are its ranges.
    let (mut p, _) = full(&d);
    run(&mut p, &DesiredState::default(), &none(), Scope::Full);
    assert!(p.contents().source_ranges.is_empty());
}

/// 10,000 service ports x 10 endpoints: one endpoint event is a handful of
/// writes, whatever the size (the structural proof that a `Ports` plan does
/// not grow with the number of services; the timing is `cargo xtask bench`'s).
#[test]
fn one_endpoint_change_at_scale_is_a_handful_of_ops() {
    let mut d = DesiredState::default();
    for i in 0..10_000u32 {
        let name = spn("default", &format!("svc-{i}"), "http", TCP);
        let addr = Ipv4Addr::from(0x0a60_0000 + i);
        let eps: Vec<Endpoint> = (0..10u32)
            .map(|j| Endpoint {
                addr: Ipv4Addr::from(0x0af4_0000 + i * 16 + j),
                port: 8080,
                local: j == 0,
                terminating: false,
            })
            .collect();
        let mut pt = port(&[], &eps);
        pt.frontends.insert(Frontend {
            kind: FrontendKind::ClusterIp,
            addr: Some(addr),
            port: 80,
            protocol: TCP,
        });
        d.services.insert(name, pt);
    }
    let mut p = Planner::default();
    let plan = p.plan(&d, &none(), Scope::Full).unwrap();
    for op in &plan.ops {
        p.apply(op);
    }
    let name = spn("default", "svc-4242", "http", TCP);
    let port = d.services.get_mut(&name).unwrap();
    port.backends[3].addr = Ipv4Addr::new(10, 250, 0, 1);
    let plan = p.plan(&d, &none(), Scope::Ports(&[name].into())).unwrap();
    // New backend, its slot, the old backend deleted.
    assert_eq!(plan.ops.len(), 3, "{:?}", plan.ops);
    assert_eq!(plan.ports_planned, 1);
    assert_eq!((plan.service_changes, plan.endpoint_changes), (0, 1));
}

// ---- properties --------------------------------------------------------------

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const ADDRS: [&str; 4] = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "203.0.113.7"];
const TIMES: [Option<&str>; 3] = [
    Some("2024-01-01T00:00:00Z"),
    Some("2025-01-01T00:00:00Z"),
    None,
];

fn arb_frontend() -> impl Strategy<Value = Frontend> {
    (
        0..4usize,
        0..ADDRS.len(),
        prop_oneof![Just(80u16), Just(443)],
        any::<bool>(),
    )
        .prop_map(|(kind, addr, port, udp)| {
            let protocol = if udp { UDP } else { TCP };
            match kind {
                0 => fe(FrontendKind::ClusterIp, Some(ADDRS[addr]), port, protocol),
                1 => fe(FrontendKind::NodePort, None, 30000 + port, protocol),
                2 => fe(FrontendKind::ExternalIp, Some(ADDRS[addr]), port, protocol),
                _ => fe(
                    FrontendKind::LoadBalancer,
                    Some(ADDRS[addr]),
                    port,
                    protocol,
                ),
            }
        })
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    (
        0..6u8,
        prop_oneof![Just(8080u16), Just(53)],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(host, port, local, terminating)| Endpoint {
            addr: Ipv4Addr::new(10, 1, 0, host),
            port,
            local,
            terminating,
        })
}

const RANGES: [&str; 3] = ["10.0.0.0/8", "192.168.1.0/24", "203.0.113.0/24"];

fn arb_port() -> impl Strategy<Value = DesiredServicePort> {
    (
        proptest::collection::vec(arb_frontend(), 0..4),
        proptest::collection::btree_set(arb_endpoint(), 0..5),
        0..TIMES.len(),
        any::<bool>(),
        proptest::collection::btree_set(0..RANGES.len(), 0..3),
    )
        .prop_map(|(frontends, eps, time, sticky, ranges)| {
            // The model gives one frontend per key within a port.
            let mut keys = BTreeSet::new();
            let frontends = frontends
                .into_iter()
                .filter(|f| keys.insert(f.key()))
                .collect();
            // The model gives one endpoint per address:port.
            let mut seen = BTreeSet::new();
            let backends: Vec<Endpoint> = eps
                .into_iter()
                .filter(|e| seen.insert((e.addr, e.port)))
                .collect();
            let source_ranges: Vec<ipnet::Ipv4Net> =
                ranges.iter().map(|i| RANGES[*i].parse().unwrap()).collect();
            let mut flags = if sticky { service_flags::AFFINITY } else { 0 };
            if !source_ranges.is_empty() {
                flags |= service_flags::SOURCE_RANGES;
            }
            DesiredServicePort {
                frontends,
                local_backends: backends.iter().filter(|e| e.local).copied().collect(),
                backends,
                flags,
                affinity_timeout_sec: if sticky { 60 } else { 0 },
                created: TIMES[time].map(|t| t.parse().unwrap()),
                source_ranges,
            }
        })
}

fn arb_state() -> impl Strategy<Value = DesiredState> {
    proptest::collection::btree_map(
        (0..NAMES.len(), any::<bool>())
            .prop_map(|(n, udp)| spn("default", NAMES[n], "", if udp { UDP } else { TCP })),
        arb_port(),
        0..6,
    )
    .prop_map(|services| DesiredState { services })
}

/// What the maps must show for `d`: every key goes to the port C7 says, with
/// exactly that port's backends, in order.
fn assert_matches(c: &MapContents, d: &DesiredState) {
    let mut claims = claims::Claims::default();
    for (n, p) in &d.services {
        claims.set(n, Some(p));
    }
    let mut want = BTreeSet::new();
    for (n, p) in &d.services {
        for f in &p.frontends {
            if claims.owner(&f.key()) == Some(n) {
                want.insert(f.key());
                let v = c
                    .services
                    .get(&f.key())
                    .unwrap_or_else(|| panic!("{f} of {n} missing"));
                assert_eq!(c.names.get(&v.service_id), Some(n), "{f}");
                // F7: the ranges go in with a LoadBalancer IP, else the flag goes.
                let owns_lb = p.frontends.iter().any(|g| {
                    g.kind == FrontendKind::LoadBalancer && claims.owner(&g.key()) == Some(n)
                });
                let mut flags = p.flags;
                if !owns_lb {
                    flags &= !service_flags::SOURCE_RANGES;
                }
                assert_eq!(v.flags, f.kind.flag() | flags);
                let ranges: BTreeSet<ipnet::Ipv4Net> = c
                    .source_ranges
                    .iter()
                    .filter(|(sid, _)| *sid == v.service_id)
                    .map(|(_, net)| *net)
                    .collect();
                let want: BTreeSet<ipnet::Ipv4Net> = if flags & service_flags::SOURCE_RANGES != 0 {
                    p.source_ranges.iter().copied().collect()
                } else {
                    BTreeSet::new()
                };
                assert_eq!(ranges, want, "ranges of {n}");
                let backends = |base: u32, n: u16| -> Vec<(Ipv4Addr, u16, bool)> {
                    (0..u32::from(n))
                        .map(|i| {
                            let s = c.slots[&BackendSlotKey {
                                service_id: v.service_id,
                                slot: base + i,
                            }];
                            let b = c.backends[&s.backend_id];
                            (
                                Ipv4Addr::from(lb_common::net_to_ipv4(b.addr)),
                                lb_common::net_to_port(b.port),
                                b.flags & backend_flags::LOCAL != 0,
                            )
                        })
                        .collect()
                };
                let view = |set: &[Endpoint]| -> Vec<(Ipv4Addr, u16, bool)> {
                    set.iter().map(|e| (e.addr, e.port, e.local)).collect()
                };
                assert_eq!(backends(0, v.backend_count), view(&p.backends));
                assert_eq!(
                    backends(LOCAL_SLOT_BASE, v.local_backend_count),
                    view(&p.local_backends)
                );
            }
        }
    }
    assert_eq!(c.services.keys().copied().collect::<BTreeSet<_>>(), want);
}

/// The ports whose desired value differs between two states.
fn changed(a: &DesiredState, b: &DesiredState) -> BTreeSet<ServicePortName> {
    a.services
        .keys()
        .chain(b.services.keys())
        .filter(|n| a.services.get(*n) != b.services.get(*n))
        .cloned()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// From nothing to any state to any other: each plan converges, no
    /// prefix of it exposes a half-written set, and the maps show exactly
    /// the desired state.
    #[test]
    fn plans_converge_and_never_expose_half_written_sets(
        states in proptest::collection::vec(arb_state(), 1..4),
    ) {
        let mut p = Planner::default();
        for d in &states {
            run(&mut p, d, &none(), Scope::Full);
            assert_matches(p.contents(), d);
        }
    }

    /// A `Ports` plan of the changed ports does exactly what a `Full` plan does.
    #[test]
    fn a_ports_plan_equals_a_full_plan(before in arb_state(), after in arb_state()) {
        let (p, _) = full(&before);
        let scope = changed(&before, &after);
        let mut incremental = p.clone();
        let mut whole = p.clone();
        let a = incremental.plan(&after, &none(), Scope::Ports(&scope)).unwrap();
        let b = whole.plan(&after, &none(), Scope::Full).unwrap();
        prop_assert_eq!(&a.ops, &b.ops);
        prop_assert_eq!(
            (a.service_changes, a.endpoint_changes),
            (b.service_changes, b.endpoint_changes)
        );
        execute(&mut incremental, &a, "ports");
        assert_matches(incremental.contents(), &after);
    }

    /// C7: whatever order the ports arrive in, one at a time, the maps end
    /// with the same owner for every frontend as a single full plan gives.
    #[test]
    fn c7_ownership_does_not_depend_on_arrival_order(
        d in arb_state(),
        order in proptest::collection::vec(any::<proptest::sample::Index>(), 8),
    ) {
        let mut names: Vec<ServicePortName> = d.services.keys().cloned().collect();
        for (i, idx) in order.iter().enumerate() {
            if !names.is_empty() {
                let j = idx.index(names.len());
                let i = i % names.len();
                names.swap(i, j);
            }
        }
        let mut p = Planner::default();
        run(&mut p, &DesiredState::default(), &none(), Scope::Full);
        let mut so_far = DesiredState::default();
        for n in names {
            so_far.services.insert(n.clone(), d.services[&n].clone());
            let plan = p.plan(&so_far, &none(), Scope::Ports(&[n].into())).unwrap();
            execute(&mut p, &plan, "arrival");
        }
        let (whole, _) = full(&d);
        prop_assert_eq!(owners(p.contents()), owners(whole.contents()));
        assert_matches(p.contents(), &d);
    }

    /// Whatever an earlier agent (or a crash half way) left in the maps, a
    /// full plan converges to the desired state.
    #[test]
    fn converges_from_arbitrary_contents(
        d in arb_state(),
        garbage in proptest::collection::vec((1u32..6, 0u32..4, 1u32..8, 0usize..ADDRS.len()), 0..12),
    ) {
        let mut c = MapContents::default();
        for (sid, slot, bid, addr) in garbage {
            let f = cip(ADDRS[addr], 80);
            c.services.insert(f.key(), lb_common::ServiceValue { service_id: sid, backend_count: 1, ..Default::default() });
            c.slots.insert(BackendSlotKey { service_id: sid, slot }, lb_common::BackendSlot { backend_id: bid });
            if bid % 2 == 0 {
                c.backends.insert(bid, lb_common::BackendValue { addr: bid, port: 80, proto: 6, flags: 0, service_id: sid });
            }
            if sid % 2 == 0 {
                c.names.insert(sid, spn("default", NAMES[sid as usize % NAMES.len()], "", TCP));
            }
        }
        let mut p = Planner::adopt(c, Limits::default());
        let plan = p.plan(&d, &none(), Scope::Full).unwrap();
        for op in &plan.ops {
            p.apply(op);
        }
        p.assert_indexes();
        assert_matches(p.contents(), &d);
        let again = p.plan(&d, &none(), Scope::Full).unwrap();
        prop_assert!(again.ops.is_empty(), "{:?}", again.ops);
        // Nothing is left over: no slot, backend or name without a frontend.
        let sids: BTreeSet<u32> = p.contents().services.values().map(|v| v.service_id).collect();
        prop_assert!(p.contents().slots.keys().all(|k| sids.contains(&k.service_id)));
        prop_assert!(p.contents().names.keys().all(|k| sids.contains(k)));
    }
}
