//! The planner: the ordered, minimal map writes that turn what the maps
//! hold into the desired state. ONE pipeline, whatever the scope:
//!
//! ```text
//! scope ──> admit ──> ids ──> target ──> emit
//! ```
//!
//! - **scope** ([`Scope`]): which service ports this plan decides. `Full`:
//!   every desired port and everything in the maps (initial list, relist,
//!   manifest mode). `Ports`: the ports an event changed, plus the ports
//!   whose frontend ownership that change moved (C7), plus ports left out
//!   earlier for lack of room. Cost proportional to those ports (times
//!   log N), never to the total.
//! - **admit** (admit.rs): per port, what it may have: the frontend keys it
//!   owns ([`claims`](claims.rs), C7), the per-port backend limit, and room
//!   in the maps. What is refused is a typed [`PlanError`] naming the port.
//! - **ids** and **target** (target.rs): a port keeps its service id (found
//!   by its [`ServicePortName`] in LB_SERVICE_NAMES) and its backend ids
//!   (per (port, endpoint)); new ones get the smallest free ids. Then the
//!   exact entries the admitted ports must have.
//! - **emit** (emit.rs): the target against the part of the maps this scope
//!   owns, as ops in the one safe order, and the change counts.
//!
//! The planner keeps a [`Mirror`](mirror.rs) of the maps, updated by
//! [`Planner::apply`] after each successful write, and the claims of every
//! desired port. Only differences are written, never a flush: an unchanged
//! desired state gives no ops at all, also right after an agent restart
//! ([`Planner::adopt`] starts from what is in the maps).
//!
//! # Ids
//! - Service ids are per service port; a port keeps its id for as long as it
//!   is programmed, also across agent restarts (LB_SERVICE_NAMES stores the
//!   [`ServicePortName`] field by field, so it reads back exactly).
//! - Backend ids are per (service port, endpoint): a backend entry belongs
//!   to one service port, so its flags (LOCAL, TERMINATING) are exactly that
//!   port's, and changing one port never rewrites another's entries.
//! - An id still used by any entry is never handed out in the same plan, so
//!   a frontend about to be deleted never sees another port's slots.
//!
//! # Order
//! `PutBackend -> PutSlot -> PutSourceRange -> PutName -> PutNodeAddr ->
//! PutService -> DeleteService -> DeleteSlot -> DeleteSourceRange ->
//! DeleteBackend -> DeleteName -> DeleteNodeAddr` ([`MapOp::phase`]): slots
//! are complete and point to existing backends, and a LoadBalancer's source
//! ranges are in place, before a service entry publishes them; nothing a
//! live entry can reach is deleted before the entries stop reaching it.
//!
//! # Capacity
//! Ports already programmed are admitted before new ones, each group in
//! name order; a port that does not fit is left out (its entries removed,
//! a partial set would be worse), reported, and retried by every later plan.
//! A `Ports` plan counts the ports outside its scope as they are; so at the
//! very edge of capacity, a programmed port that grows can be refused by a
//! `Ports` plan where a `Full` plan would have refused a later one. Limits
//! count the target contents: while a plan runs the maps hold old and new
//! entries together, so they need some headroom over these limits.
//!
//! Usage: `plan`, then execute `plan.ops` in order, calling
//! [`Planner::apply`] after each successful write. If a write fails the
//! maps and the mirror diverge: re-read the maps into [`Planner::adopt`]
//! and plan `Full` (the agent's resync).

mod admit;
mod claims;
mod emit;
mod ids;
mod mirror;
mod target;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use crate::contents::{MapContents, MapOp};
use crate::desired::{DesiredPorts, DesiredServicePort, Frontend, ServicePortName};
use claims::Claims;
use mirror::Mirror;

/// Map capacities the plan must stay within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries of LB_SERVICES (frontends).
    pub max_services: u32,
    /// Entries of LB_BACKENDS.
    pub max_backends: u32,
    /// Entries of LB_BACKEND_SLOTS.
    pub max_backend_slots: u32,
    /// Backends in one set (cluster-wide or node-local) of one service port.
    pub max_backends_per_service: u32,
    /// Entries of LB_NODE_ADDRS.
    pub max_node_addrs: u32,
    /// Entries of LB_SOURCE_RANGES.
    pub max_source_ranges: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: lb_common::MAX_SERVICES,
            max_backends: lb_common::MAX_BACKENDS,
            max_backend_slots: lb_common::MAX_BACKEND_SLOTS,
            max_backends_per_service: lb_common::MAX_BACKENDS_PER_SERVICE,
            max_node_addrs: lb_common::MAX_NODE_ADDRS,
            max_source_ranges: lb_common::MAX_SOURCE_RANGES,
        }
    }
}

/// Which service ports a plan decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every desired port and every entry in the maps: what the desired
    /// state does not explain is removed.
    Full,
    /// These ports (present or gone from the desired state), and the ports
    /// whose frontend ownership they move; every other entry stays as it is.
    /// Before the first `Full` plan the planner cannot know who else claims
    /// a frontend: it plans `Full` instead.
    Ports(&'a BTreeSet<ServicePortName>),
}

/// Which of a port's backend sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendSet {
    ClusterWide,
    NodeLocal,
}

impl fmt::Display for BackendSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendSet::ClusterWide => "cluster-wide",
            BackendSet::NodeLocal => "node-local",
        })
    }
}

/// Something a plan refused; everything else in the plan is complete.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum PlanError {
    #[error("{port}: {count} backends in its {set} set, more than the {max} one service port can hold; not programmed")]
    TooManyBackends {
        port: ServicePortName,
        set: BackendSet,
        count: usize,
        max: u32,
    },
    #[error("{port}: the {map} map would exceed its {max} entries; not programmed")]
    MapFull {
        port: ServicePortName,
        map: &'static str,
        max: u32,
    },
    /// F7 fails closed: the port is programmed without its LoadBalancer IPs.
    #[error("{port}: its loadBalancerSourceRanges do not fit in {map} (at most {max} entries); not exposed on its LoadBalancer IPs")]
    SourceRangesFull {
        port: ServicePortName,
        map: &'static str,
        max: u32,
    },
    #[error("{port}: {} {frontend} is already served by {owner} (a ClusterIP, or an older Service, keeps it); skipped", .frontend.kind.field())]
    FrontendTaken {
        port: ServicePortName,
        frontend: Frontend,
        owner: ServicePortName,
    },
    #[error("node address {addr}: more than {max} node addresses; not programmed")]
    TooManyNodeAddrs { addr: Ipv4Addr, max: u32 },
}

impl PlanError {
    /// The service port the error is about, if one.
    pub fn port(&self) -> Option<&ServicePortName> {
        match self {
            PlanError::TooManyBackends { port, .. }
            | PlanError::MapFull { port, .. }
            | PlanError::SourceRangesFull { port, .. }
            | PlanError::FrontendTaken { port, .. } => Some(port),
            PlanError::TooManyNodeAddrs { .. } => None,
        }
    }
}

/// The only hard failure: no free id in the u32 space (cannot happen with
/// maps of the sizes lb uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no free {0} id left")]
pub struct IdsExhausted(pub &'static str);

/// What one plan must write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Map writes, in the order they must be executed.
    pub ops: Vec<MapOp>,
    /// Whether this was a full diff (also when `Ports` fell back to it).
    pub full: bool,
    /// Service ports the plan decided (the scope, extended).
    pub ports_planned: usize,
    /// Service ids added, removed, or whose frontends, flags or affinity
    /// timeout changed (kubeproxy_sync_proxy_rules_service_changes_total).
    pub service_changes: usize,
    /// Service ids whose programmed backend sets (cluster or node-local,
    /// backend flags included) changed, added or removed ones included when
    /// they have backends (kubeproxy_sync_proxy_rules_endpoint_changes_total).
    pub endpoint_changes: usize,
    /// Everything refused about the planned ports (and node addresses).
    pub errors: Vec<PlanError>,
    /// The part of `errors` no earlier plan reported: what deserves a log
    /// line and an Event (once per change, never a storm).
    pub new_errors: Vec<PlanError>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The planner: the mirror of the maps and the claims of the desired state.
#[derive(Clone, Debug)]
pub struct Planner {
    mirror: Mirror,
    claims: Claims,
    /// A `Full` plan recorded every desired port's claims.
    claims_complete: bool,
    /// Ports left out for lack of room: every plan retries them.
    deferred: BTreeSet<ServicePortName>,
    limits: Limits,
    /// What earlier plans reported, per port (for [`Plan::new_errors`]).
    reported: BTreeMap<ServicePortName, BTreeSet<PlanError>>,
    reported_node_addrs: BTreeSet<PlanError>,
}

impl Default for Planner {
    fn default() -> Self {
        Self::adopt(MapContents::default(), Limits::default())
    }
}

/// One port of the plan's scope.
pub(crate) struct Scoped<'a> {
    pub name: ServicePortName,
    pub desired: Option<&'a DesiredServicePort>,
    /// The service id it is programmed under now.
    pub old_sid: Option<u32>,
}

impl Planner {
    /// Starts from what is in the maps (agent restart, resync): nothing is
    /// flushed; the next plan diffs against it.
    pub fn adopt(contents: MapContents, limits: Limits) -> Self {
        Self {
            mirror: Mirror::new(contents),
            claims: Claims::default(),
            claims_complete: false,
            deferred: BTreeSet::new(),
            limits,
            reported: BTreeMap::new(),
            reported_node_addrs: BTreeSet::new(),
        }
    }

    /// The mirrored map contents.
    pub fn contents(&self) -> &MapContents {
        self.mirror.contents()
    }

    /// The capacities plans stay within.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Mirrors one op after the dataplane executed it.
    pub fn apply(&mut self, op: &MapOp) {
        self.mirror.apply(op);
    }

    /// Plans the writes for `scope` (see the module docs). The node
    /// addresses are always diffed (a handful of entries).
    pub fn plan(
        &mut self,
        desired: &dyn DesiredPorts,
        node_addrs: &BTreeSet<Ipv4Addr>,
        scope: Scope<'_>,
    ) -> Result<Plan, IdsExhausted> {
        let full = matches!(scope, Scope::Full) || !self.claims_complete;
        let names = match scope {
            Scope::Ports(changed) if !full => self.scope_ports(desired, changed),
            _ => self.scope_full(desired),
        };
        // Programmed ports first, then new ones, each group in name order
        // (`names` is sorted): the capacity rule.
        let (programmed, new): (Vec<_>, Vec<_>) = names
            .into_iter()
            .map(|name| Scoped {
                desired: desired.port(&name),
                old_sid: self.mirror.sid_of(&name),
                name,
            })
            .partition(|s| s.old_sid.is_some());
        let scoped: Vec<Scoped<'_>> = programmed.into_iter().chain(new).collect();

        let mut errors: BTreeMap<ServicePortName, BTreeSet<PlanError>> = BTreeMap::new();
        let admitted = admit::admit(
            &scoped,
            &self.mirror,
            &self.claims,
            &self.limits,
            full,
            &mut errors,
        );
        for (s, a) in scoped.iter().zip(&admitted) {
            match a {
                admit::Admission::Refused { retry: true }
                | admit::Admission::Admitted { retry: true, .. } => {
                    self.deferred.insert(s.name.clone());
                }
                _ => {
                    self.deferred.remove(&s.name);
                }
            }
        }
        let target = target::target(&scoped, &admitted, &self.mirror, node_addrs)?;
        let mut node_addr_errors = BTreeSet::new();
        let node_target = target::node_addrs(node_addrs, &self.limits, &mut node_addr_errors);
        let emitted = emit::emit(&scoped, &target, &node_target, &self.mirror, full);

        let mut plan = Plan {
            ops: emitted.ops,
            full,
            ports_planned: scoped.len(),
            service_changes: emitted.service_changes,
            endpoint_changes: emitted.endpoint_changes,
            ..Plan::default()
        };
        self.record_errors(&scoped, errors, node_addr_errors, full, &mut plan);
        Ok(plan)
    }

    /// `Full`: every desired port and every programmed one; the claims are
    /// rebuilt from the whole desired state.
    fn scope_full(&mut self, desired: &dyn DesiredPorts) -> BTreeSet<ServicePortName> {
        self.claims.clear();
        let mut names = BTreeSet::new();
        for (name, port) in desired.ports() {
            self.claims.set(name, Some(port));
            names.insert(name.clone());
        }
        names.extend(self.mirror.contents().names.values().cloned());
        self.deferred.clear();
        self.claims_complete = true;
        names
    }

    /// `Ports`: the changed ports, the ports whose ownership of a frontend
    /// the change moves, and the deferred ones.
    fn scope_ports(
        &mut self,
        desired: &dyn DesiredPorts,
        changed: &BTreeSet<ServicePortName>,
    ) -> BTreeSet<ServicePortName> {
        let mut names = changed.clone();
        for name in changed {
            let port = desired.port(name);
            // Keys it claimed and keys it claims now: owners before and after.
            let keys: BTreeSet<_> = self
                .claims
                .keys_of(name)
                .iter()
                .copied()
                .chain(
                    port.into_iter()
                        .flat_map(|p| p.frontends.iter().map(Frontend::key)),
                )
                .collect();
            let before: Vec<Option<ServicePortName>> =
                keys.iter().map(|k| self.claims.owner(k).cloned()).collect();
            self.claims.set(name, port);
            for (k, was) in keys.iter().zip(before) {
                let now = self.claims.owner(k);
                if was.as_ref() != now {
                    names.extend(was);
                    names.extend(now.cloned());
                }
            }
        }
        names.extend(self.deferred.iter().cloned());
        names
    }

    fn record_errors(
        &mut self,
        scoped: &[Scoped<'_>],
        mut errors: BTreeMap<ServicePortName, BTreeSet<PlanError>>,
        node_addr_errors: BTreeSet<PlanError>,
        full: bool,
        plan: &mut Plan,
    ) {
        if full {
            let planned: BTreeSet<&ServicePortName> = scoped.iter().map(|s| &s.name).collect();
            self.reported.retain(|name, _| planned.contains(name));
        }
        for s in scoped {
            let now = errors.remove(&s.name).unwrap_or_default();
            let before = self.reported.remove(&s.name).unwrap_or_default();
            plan.new_errors.extend(now.difference(&before).cloned());
            plan.errors.extend(now.iter().cloned());
            if !now.is_empty() {
                self.reported.insert(s.name.clone(), now);
            }
        }
        plan.new_errors.extend(
            node_addr_errors
                .difference(&self.reported_node_addrs)
                .cloned(),
        );
        plan.errors.extend(node_addr_errors.iter().cloned());
        self.reported_node_addrs = node_addr_errors;
    }

    /// Panics unless the mirror's indexes match its contents.
    #[cfg(test)]
    pub(crate) fn assert_indexes(&self) {
        self.mirror.assert_indexes();
    }
}
