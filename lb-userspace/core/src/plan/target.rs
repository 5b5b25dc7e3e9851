//! Ids and target: the exact entries the admitted ports of a plan must
//! have, with the ids they keep or get.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    backend_flags, service_flags, BackendSlot, BackendSlotKey, BackendValue, ServiceValue,
    LOCAL_SLOT_BASE,
};

use super::admit::Admission;
use super::mirror::Mirror;
use super::{IdsExhausted, Limits, PlanError, Scoped};
use crate::contents::MapContents;
use crate::desired::{DesiredServicePort, Endpoint, Protocol};

/// A backend's identity within a port: (address, port, protocol), network
/// byte order, as in [`BackendValue`].
pub(crate) type BackendTuple = (u32, u16, u8);

pub(crate) fn backend_tuple(e: &Endpoint, proto: Protocol) -> BackendTuple {
    (
        lb_common::ipv4_to_net(e.addr.octets()),
        lb_common::port_to_net(e.port),
        proto.number(),
    )
}

fn tuple_of(v: &BackendValue) -> BackendTuple {
    (v.addr, v.port, v.proto)
}

/// The backend entries of service port `sid`: one per endpoint (address,
/// port), used by one or both sets. LOCAL if the endpoint is local;
/// TERMINATING only if every set uses it as a terminating fallback (E3);
/// IN_CLUSTER_SET / IN_LOCAL_SET for the sets it is in (what the datapath
/// checks before it trusts an affinity or conntrack entry, C6 and E4). The
/// only place these flags are decided.
fn backend_values(
    port: &DesiredServicePort,
    proto: Protocol,
    sid: u32,
) -> BTreeMap<BackendTuple, BackendValue> {
    let mut out: BTreeMap<BackendTuple, BackendValue> = BTreeMap::new();
    let sets = [
        (&port.backends, backend_flags::IN_CLUSTER_SET),
        (&port.local_backends, backend_flags::IN_LOCAL_SET),
    ];
    for (set, member) in sets {
        for e in set {
            let t = backend_tuple(e, proto);
            let v = out.entry(t).or_insert(BackendValue {
                addr: t.0,
                port: t.1,
                proto: t.2,
                flags: backend_flags::TERMINATING,
                service_id: sid,
            });
            v.flags |= member;
            if e.local {
                v.flags |= backend_flags::LOCAL;
            }
            if !e.terminating {
                v.flags &= !backend_flags::TERMINATING;
            }
        }
    }
    out
}

/// Hands out the smallest ids the mirror shows free, each once per plan.
struct Fresh<I> {
    free: I,
    what: &'static str,
}

impl<I: Iterator<Item = u32>> Fresh<I> {
    fn next(&mut self) -> Result<u32, IdsExhausted> {
        self.free.next().ok_or(IdsExhausted(self.what))
    }
}

/// The entries of every admitted port of `scoped` (node addresses aside).
pub(crate) fn target(
    scoped: &[Scoped<'_>],
    admitted: &[Admission],
    mirror: &Mirror,
    node_addrs: &BTreeSet<Ipv4Addr>,
) -> Result<MapContents, IdsExhausted> {
    let c = mirror.contents();
    let mut fresh_sids = Fresh {
        free: mirror.free_sids(),
        what: "service",
    };
    let mut fresh_bids = Fresh {
        free: mirror.free_bids(),
        what: "backend",
    };
    let mut t = MapContents::default();
    for (s, a) in scoped.iter().zip(admitted) {
        let (Admission::Admitted { keys, ranges, .. }, Some(port)) = (a, s.desired) else {
            continue;
        };
        let proto = s.name.protocol;
        let sid = match s.old_sid {
            Some(sid) => sid,
            None => fresh_sids.next()?,
        };
        // Backend ids this port owns now: referenced by its slots and by
        // no other service's (maps written by older agents shared them).
        let mut refs: BTreeMap<u32, u32> = BTreeMap::new();
        for (_, slot) in s.old_sid.into_iter().flat_map(|sid| mirror.slots_of(sid)) {
            *refs.entry(slot.backend_id).or_default() += 1;
        }
        let owned: BTreeMap<BackendTuple, u32> = refs
            .iter()
            .filter(|(bid, n)| mirror.backend_refs(**bid) == **n)
            .filter_map(|(bid, _)| c.backends.get(bid).map(|v| (tuple_of(v), *bid)))
            .collect();
        let mut bid_of: BTreeMap<BackendTuple, u32> = BTreeMap::new();
        for (tuple, value) in backend_values(port, proto, sid) {
            let bid = match owned.get(&tuple) {
                Some(bid) => *bid,
                None => fresh_bids.next()?,
            };
            bid_of.insert(tuple, bid);
            t.backends.insert(bid, value);
        }
        for (base, set) in [
            (0u32, &port.backends),
            (LOCAL_SLOT_BASE, &port.local_backends),
        ] {
            for (i, e) in set.iter().enumerate() {
                t.slots.insert(
                    BackendSlotKey {
                        service_id: sid,
                        slot: base + i as u32,
                    },
                    BackendSlot {
                        backend_id: bid_of[&backend_tuple(e, proto)],
                    },
                );
            }
        }
        t.names.insert(sid, s.name.clone());
        let mut flags = port.flags;
        if *ranges {
            t.source_ranges
                .extend(port.source_ranges.iter().map(|net| (sid, *net)));
            // kube-proxy's allowFromNode: a range that holds a node address
            // lets the node's own connections through.
            if port
                .source_ranges
                .iter()
                .any(|net| node_addrs.iter().any(|a| net.contains(a)))
            {
                flags |= service_flags::SOURCE_RANGES_ALLOW_NODE;
            }
        } else {
            flags &= !service_flags::SOURCE_RANGES;
        }
        for (key, kind) in keys {
            t.services.insert(
                *key,
                ServiceValue {
                    service_id: sid,
                    // admit bounded both lengths by u16::MAX.
                    backend_count: port.backends.len() as u16,
                    local_backend_count: port.local_backends.len() as u16,
                    flags: kind.flag() | flags,
                    _pad: 0,
                    affinity_timeout_sec: port.affinity_timeout_sec,
                },
            );
        }
    }
    Ok(t)
}

/// The node addresses that fit in LB_NODE_ADDRS (in address order); the
/// rest are reported.
pub(crate) fn node_addrs(
    node_addrs: &BTreeSet<Ipv4Addr>,
    limits: &Limits,
    errors: &mut BTreeSet<PlanError>,
) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for (i, addr) in node_addrs.iter().enumerate() {
        if i < limits.max_node_addrs as usize {
            out.insert(lb_common::ipv4_to_net(addr.octets()));
        } else {
            errors.insert(PlanError::TooManyNodeAddrs {
                addr: *addr,
                max: limits.max_node_addrs,
            });
        }
    }
    out
}
