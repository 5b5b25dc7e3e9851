//! Backend selection for a new flow: one random slot of the service's
//! cluster-wide or node-local set (SEMANTICS F3), or the client's previous
//! backend under session affinity (F8).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use lb_common::{
    service_flags, AffinityKey, AffinityValue, BackendSlotKey, BackendValue, ServiceValue,
    StatReason, LOCAL_SLOT_BASE,
};

use crate::{
    maps::{LB_AFFINITY, LB_BACKENDS, LB_BACKEND_SLOTS},
    stats::count,
};

#[inline(always)]
fn backend(id: u32) -> Option<BackendValue> {
    // SAFETY: a valid map value pointer; copied out at once.
    LB_BACKENDS.get_ptr(id).map(|p| unsafe { *p })
}

/// The backend `client` used before, if the affinity entry is younger than
/// the service's timeout and its backend is, right now, a usable endpoint
/// of this service port in the set in use (C6: backend ids are reused, and
/// a backend can leave the set while the entry lives). A live entry that
/// fails the check counts `affinity_stale`; the caller picks anew and
/// overwrites it.
#[inline(always)]
fn affinity(
    key: &AffinityKey,
    svc: &ServiceValue,
    local: bool,
    now: u64,
) -> Option<(u32, BackendValue)> {
    // SAFETY: a valid map value pointer; copied out at once.
    let a: AffinityValue = LB_AFFINITY.get_ptr(key).map(|p| unsafe { *p })?;
    if now.saturating_sub(a.last_used_ns) > u64::from(svc.affinity_timeout_sec) * 1_000_000_000 {
        return None;
    }
    match backend(a.backend_id) {
        Some(b) if b.serves(svc.service_id, local) => Some((a.backend_id, b)),
        _ => {
            count(StatReason::AffinityStale);
            None
        }
    }
}

/// Chooses the backend of a new flow from `svc`'s node-local set (`local`)
/// or its cluster-wide set. The caller has checked that the set is not
/// empty (an empty one is E1's reject or E2's drop).
#[inline(always)]
pub fn select(
    svc: &ServiceValue,
    local: bool,
    client: u32,
    now: u64,
) -> Result<(u32, BackendValue), StatReason> {
    let (base, count) = if local {
        (LOCAL_SLOT_BASE, u32::from(svc.local_backend_count))
    } else {
        (0, u32::from(svc.backend_count))
    };
    if count == 0 {
        return Err(StatReason::DropNoBackend);
    }

    let sticky = svc.flags & service_flags::AFFINITY != 0;
    let akey = AffinityKey {
        client_addr: client,
        service_id: svc.service_id,
    };
    let previous = if sticky {
        affinity(&akey, svc, local, now)
    } else {
        None
    };
    let chosen = match previous {
        Some(c) => c,
        None => {
            // SAFETY: no preconditions.
            let slot = unsafe { bpf_get_prandom_u32() }
                .checked_rem(count)
                .unwrap_or(0);
            let skey = BackendSlotKey {
                service_id: svc.service_id,
                slot: base + slot,
            };
            // SAFETY: a valid map value pointer; copied out at once.
            let id = LB_BACKEND_SLOTS
                .get_ptr(skey)
                .map(|p| unsafe { (*p).backend_id })
                .ok_or(StatReason::DropBackendMissing)?;
            (id, backend(id).ok_or(StatReason::DropBackendMissing)?)
        }
    };
    if sticky {
        let value = AffinityValue {
            backend_id: chosen.0,
            _pad: 0,
            last_used_ns: now,
        };
        // Best effort: an LRU insert only fails on allocation failure, and
        // the flow itself does not depend on it.
        let _ = LB_AFFINITY.insert(akey, value, BPF_ANY as u64);
    }
    Ok(chosen)
}
