//! Frontend ownership (docs/service-contract.md C7), decided here and
//! nowhere else.
//!
//! Every desired service port claims the map keys of its frontends. When
//! two claim one key, the owner is the claim that sorts first:
//! 1. a ClusterIP claim beats any other kind (an externalIP or LB IP that
//!    happens to equal some Service's ClusterIP never hijacks it);
//! 2. then the older Service (creationTimestamp; unknown sorts last);
//! 3. then the service port name (namespace, name, port, protocol).
//!
//! The order depends only on the objects, never on the order events
//! arrived in, so every node picks the same owner, and an agent restart or a
//! relist changes nothing.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use lb_common::ServiceKey;

use crate::desired::{DesiredServicePort, FrontendKind, ServicePortName};

/// How strongly a service port claims a key (smaller wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// 0 for a ClusterIP, 1 for every other kind.
    kind: u8,
    /// Creation time; `None` sorts after every time.
    unknown_age: bool,
    created: Option<Timestamp>,
}

impl Rank {
    fn new(kind: FrontendKind, created: Option<Timestamp>) -> Self {
        Self {
            kind: u8::from(kind != FrontendKind::ClusterIp),
            unknown_age: created.is_none(),
            created,
        }
    }
}

/// Who claims which frontend key, over the whole desired state.
#[derive(Clone, Debug, Default)]
pub(crate) struct Claims {
    /// Claimants of a key, sorted (the owner first). Nearly always one: a
    /// Vec, not a map (a map's first node alone holds room for eleven).
    by_key: BTreeMap<ServiceKey, Vec<(Rank, ServicePortName)>>,
    by_port: BTreeMap<ServicePortName, Vec<ServiceKey>>,
}

impl Claims {
    /// The owner of `key`, if anyone claims it.
    pub fn owner(&self, key: &ServiceKey) -> Option<&ServicePortName> {
        self.by_key.get(key)?.first().map(|(_, name)| name)
    }

    /// The keys `name` claims.
    pub fn keys_of(&self, name: &ServicePortName) -> &[ServiceKey] {
        self.by_port.get(name).map_or(&[], Vec::as_slice)
    }

    /// Replaces what `name` claims with the frontends of `port` (`None`:
    /// the port is gone).
    pub fn set(&mut self, name: &ServicePortName, port: Option<&DesiredServicePort>) {
        for key in self.by_port.remove(name).unwrap_or_default() {
            if let Some(claimants) = self.by_key.get_mut(&key) {
                claimants.retain(|(_, n)| n != name);
                if claimants.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        let Some(port) = port else { return };
        let mut keys = Vec::with_capacity(port.frontends.len());
        for fe in &port.frontends {
            let key = fe.key();
            let claim = (Rank::new(fe.kind, port.created), name.clone());
            let claimants = self.by_key.entry(key).or_default();
            claimants.retain(|(_, n)| n != name);
            let at = claimants.partition_point(|c| *c < claim);
            claimants.insert(at, claim);
            keys.push(key);
        }
        if !keys.is_empty() {
            self.by_port.insert(name.clone(), keys);
        }
    }

    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_port.clear();
    }
}
