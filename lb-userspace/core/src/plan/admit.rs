//! Admit: what each port of the scope may have. The frontend keys it owns
//! (C7, decided by [`Claims`]), its backend sets within the per-port limit,
//! and room in the maps.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{map_names, service_flags, ServiceKey};

use super::claims::Claims;
use super::mirror::Mirror;
use super::target::backend_tuple;
use super::{BackendSet, Limits, PlanError, Scoped};
use crate::desired::{DesiredServicePort, FrontendKind, ServicePortName};

pub(crate) enum Admission {
    /// Programmed with these frontend keys, and its source ranges when
    /// `ranges`. `retry`: something was left out for lack of room (the
    /// LoadBalancer IPs, when the source ranges did not fit).
    Admitted {
        keys: BTreeMap<ServiceKey, FrontendKind>,
        ranges: bool,
        retry: bool,
    },
    /// Not programmed: its entries are removed. `retry`: refused for lack
    /// of room, so later plans try again.
    Refused { retry: bool },
}

/// Entries a port needs (or holds) in the three capacity-limited maps.
#[derive(Clone, Copy, Debug, Default)]
struct Room {
    services: u64,
    backends: u64,
    slots: u64,
    source_ranges: u64,
}

impl Room {
    fn add(&mut self, o: Room) {
        self.services += o.services;
        self.backends += o.backends;
        self.slots += o.slots;
        self.source_ranges += o.source_ranges;
    }

    fn sub(&mut self, o: Room) {
        self.services = self.services.saturating_sub(o.services);
        self.backends = self.backends.saturating_sub(o.backends);
        self.slots = self.slots.saturating_sub(o.slots);
        self.source_ranges = self.source_ranges.saturating_sub(o.source_ranges);
    }

    /// Whether `self + need` overflows LB_SOURCE_RANGES.
    fn ranges_overflow(&self, need: u64, limits: &Limits) -> bool {
        self.source_ranges + need > u64::from(limits.max_source_ranges)
    }

    /// The first map `self + need` would overflow.
    fn overflow(&self, need: Room, limits: &Limits) -> Option<(&'static str, u32)> {
        [
            (
                self.services + need.services,
                map_names::SERVICES,
                limits.max_services,
            ),
            (
                self.backends + need.backends,
                map_names::BACKENDS,
                limits.max_backends,
            ),
            (
                self.slots + need.slots,
                map_names::BACKEND_SLOTS,
                limits.max_backend_slots,
            ),
        ]
        .into_iter()
        .find(|(n, _, max)| *n > u64::from(*max))
        .map(|(_, map, max)| (map, max))
    }
}

/// What a programmed service id holds now.
fn held(mirror: &Mirror, sid: u32) -> Room {
    let bids: BTreeSet<u32> = mirror.slots_of(sid).map(|(_, s)| s.backend_id).collect();
    Room {
        services: mirror.keys_of(sid).count() as u64,
        backends: bids.len() as u64,
        slots: mirror.slots_of(sid).count() as u64,
        source_ranges: mirror.ranges_of(sid).count() as u64,
    }
}

/// The per-port limit on one backend set.
fn too_many_backends(
    name: &ServicePortName,
    port: &DesiredServicePort,
    limits: &Limits,
) -> Option<PlanError> {
    let max = limits.max_backends_per_service.min(u32::from(u16::MAX));
    [
        (BackendSet::ClusterWide, port.backends.len()),
        (BackendSet::NodeLocal, port.local_backends.len()),
    ]
    .into_iter()
    .find(|(_, n)| *n as u64 > u64::from(max))
    .map(|(set, count)| PlanError::TooManyBackends {
        port: name.clone(),
        set,
        count,
        max,
    })
}

/// Decides every port of `scoped`, in order. `full`: the scope is
/// everything, so room is counted from zero; otherwise the ports outside
/// the scope keep what they hold.
pub(crate) fn admit(
    scoped: &[Scoped<'_>],
    mirror: &Mirror,
    claims: &Claims,
    limits: &Limits,
    full: bool,
    errors: &mut BTreeMap<ServicePortName, BTreeSet<PlanError>>,
) -> Vec<Admission> {
    let mut used = Room::default();
    if !full {
        let c = mirror.contents();
        used = Room {
            services: c.services.len() as u64,
            backends: c.backends.len() as u64,
            slots: c.slots.len() as u64,
            source_ranges: c.source_ranges.len() as u64,
        };
        for s in scoped {
            if let Some(sid) = s.old_sid {
                used.sub(held(mirror, sid));
            }
        }
    }
    let mut out = Vec::with_capacity(scoped.len());
    for s in scoped {
        let mut reject = |e: PlanError| {
            errors.entry(s.name.clone()).or_default().insert(e);
        };
        let Some(port) = s.desired else {
            out.push(Admission::Refused { retry: false });
            continue;
        };
        if let Some(e) = too_many_backends(&s.name, port, limits) {
            reject(e);
            out.push(Admission::Refused { retry: false });
            continue;
        }
        let mut keys = BTreeMap::new();
        for fe in &port.frontends {
            let key = fe.key();
            match claims.owner(&key) {
                Some(owner) if *owner != s.name => reject(PlanError::FrontendTaken {
                    port: s.name.clone(),
                    frontend: *fe,
                    owner: owner.clone(),
                }),
                _ => {
                    keys.insert(key, fe.kind);
                }
            }
        }
        // F7, fail closed: the source ranges go in with the LoadBalancer IPs
        // or neither does.
        let mut ranges = port.flags & service_flags::SOURCE_RANGES != 0
            && keys.values().any(|k| *k == FrontendKind::LoadBalancer);
        let mut retry = false;
        if ranges && used.ranges_overflow(port.source_ranges.len() as u64, limits) {
            reject(PlanError::SourceRangesFull {
                port: s.name.clone(),
                map: map_names::SOURCE_RANGES,
                max: limits.max_source_ranges,
            });
            keys.retain(|_, kind| *kind != FrontendKind::LoadBalancer);
            ranges = false;
            retry = true;
        }
        if keys.is_empty() {
            // Nothing reaches it: nothing to program.
            out.push(Admission::Refused { retry });
            continue;
        }
        let tuples: BTreeSet<_> = port
            .backends
            .iter()
            .chain(&port.local_backends)
            .map(|e| backend_tuple(e, s.name.protocol))
            .collect();
        let need = Room {
            services: keys.len() as u64,
            backends: tuples.len() as u64,
            slots: (port.backends.len() + port.local_backends.len()) as u64,
            source_ranges: if ranges {
                port.source_ranges.len() as u64
            } else {
                0
            },
        };
        if let Some((map, max)) = used.overflow(need, limits) {
            reject(PlanError::MapFull {
                port: s.name.clone(),
                map,
                max,
            });
            out.push(Admission::Refused { retry: true });
            continue;
        }
        used.add(need);
        out.push(Admission::Admitted {
            keys,
            ranges,
            retry,
        });
    }
    out
}
