//! Ingress pipeline (pod and uplink). Per packet, in this order, each step a
//! bounded number of hash lookups:
//!
//! 1. conntrack FORWARD: a known flow gets its stored translation;
//! 2. (uplink) conntrack REPLY of a SNAT'ed flow: reverse both translations
//!    and redirect back out;
//! 3. service lookup; not a service: pass unchanged;
//! 4. new flow: pick a backend, create both conntrack entries, DNAT (and, on
//!    the uplink to a remote backend, SNAT + redirect).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_boot_ns,
    programs::TcContext,
};
use lb_common::{
    backend_flags, ct_flags, service_flags, ConntrackEntry, DatapathConfig, ServiceValue,
    StatReason, CT_DIR_FORWARD, CT_DIR_REPLY,
};

use crate::{
    backend, conntrack,
    maps::{config, LB_CONNTRACK},
    nat,
    parse::{parse, Packet},
    service,
    stats::count,
    Hook,
};

#[inline(always)]
fn drop(reason: StatReason) -> i32 {
    count(reason);
    TC_ACT_SHOT
}

#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook) -> i32 {
    count(StatReason::Packets);
    let mut pkt = match parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            count(reason);
            return TC_ACT_OK;
        }
    };
    let cfg = config();
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };

    // 1. A known flow, client -> frontend.
    let fkey = conntrack::key_of(&pkt, CT_DIR_FORWARD);
    if let Some(ptr) = LB_CONNTRACK.get_ptr_mut(fkey) {
        // SAFETY: a valid map value pointer; copied out at once.
        let entry = unsafe { *ptr };
        if !conntrack::expired(&cfg, pkt.proto, &entry, now)
            && !conntrack::backend_gone(pkt.proto, &entry)
        {
            conntrack::touch_forward(ptr, &entry, &pkt, now);
            return forward(ctx, &mut pkt, &entry);
        }
        count(StatReason::ConntrackExpired);
    }

    // 2. A reply of a SNAT'ed flow, backend -> node address:SNAT port.
    if hook == Hook::Uplink {
        let rkey = conntrack::key_of(&pkt, CT_DIR_REPLY);
        if let Some(ptr) = LB_CONNTRACK.get_ptr_mut(rkey) {
            // SAFETY: a valid map value pointer; copied out at once.
            let entry = unsafe { *ptr };
            if entry.flags & ct_flags::SNAT != 0 {
                conntrack::touch_reply(ptr, &entry, &pkt, now);
                return reply_snat(ctx, &mut pkt, &entry);
            }
        }
    }

    // 3. A frontend?
    let Some(svc) = service::lookup(&pkt) else {
        count(StatReason::PassNotService);
        return TC_ACT_OK;
    };

    // 4. A new flow.
    new_flow(ctx, &mut pkt, &svc, hook, &cfg, now)
}

/// Applies a FORWARD entry's translation.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &mut Packet, entry: &ConntrackEntry) -> i32 {
    if nat::dnat(ctx, pkt, entry.nat_addr, entry.nat_port).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    if entry.flags & ct_flags::SNAT == 0 {
        count(StatReason::ForwardTranslated);
        return TC_ACT_OK;
    }
    if nat::snat(ctx, pkt, entry.snat_addr, entry.snat_port).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    count(StatReason::ForwardTranslated);
    nat::fib_redirect(ctx, pkt)
}

/// Reverses both translations of a SNAT'ed flow's reply: source back to the
/// frontend (node address:NodePort), destination back to the client.
#[inline(always)]
fn reply_snat(ctx: &TcContext, pkt: &mut Packet, entry: &ConntrackEntry) -> i32 {
    if nat::snat(ctx, pkt, entry.nat_addr, entry.nat_port).is_err()
        || nat::dnat(ctx, pkt, entry.snat_addr, entry.snat_port).is_err()
    {
        return drop(StatReason::DropRewriteFailed);
    }
    count(StatReason::ReplyTranslated);
    nat::fib_redirect(ctx, pkt)
}

/// Whether a new flow of `svc` uses the node-local backend set: external
/// frontends with externalTrafficPolicy=Local for traffic from outside
/// (SEMANTICS M3; pods and the node itself use the cluster set), ClusterIPs
/// with internalTrafficPolicy=Local (E5).
#[inline(always)]
fn use_local_set(svc: &ServiceValue, hook: Hook) -> bool {
    let external =
        service_flags::NODE_PORT | service_flags::EXTERNAL_IP | service_flags::LOAD_BALANCER;
    (svc.flags & service_flags::EXTERNAL_LOCAL != 0
        && svc.flags & external != 0
        && hook == Hook::Uplink)
        || (svc.flags & service_flags::INTERNAL_LOCAL != 0
            && svc.flags & service_flags::CLUSTER_IP != 0)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    pkt: &mut Packet,
    svc: &ServiceValue,
    hook: Hook,
    cfg: &DatapathConfig,
    now: u64,
) -> i32 {
    let (backend_id, be) = match backend::select(svc, use_local_set(svc, hook), pkt.saddr, now) {
        Ok(b) => b,
        Err(reason) => return drop(reason),
    };
    // Traffic from outside to a backend on another node is SNAT'ed to a node
    // address, so the reply comes back here (M2).
    let snat = hook == Hook::Uplink && be.flags & backend_flags::LOCAL == 0;
    let node_addr = if snat {
        // SAFETY: the context's skb is valid for the program's run.
        match service::snat_source(pkt, unsafe { (*ctx.skb.skb).ifindex }) {
            Some(a) => a,
            None => return drop(StatReason::DropNoSnatAddress),
        }
    } else {
        0
    };
    let flags = conntrack::tcp_bits(pkt) | if snat { ct_flags::SNAT } else { 0 };

    let mut fwd = ConntrackEntry {
        nat_addr: be.addr,
        snat_addr: 0,
        nat_port: be.port,
        snat_port: 0,
        backend_id,
        service_id: svc.service_id,
        flags,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut rev = ConntrackEntry {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..fwd
    };

    // Both entries exist before the first packet leaves.
    let rkey = if snat {
        rev.snat_addr = pkt.saddr;
        rev.snat_port = pkt.sport;
        let port = match conntrack::claim_snat_port(cfg, &be, node_addr, pkt.proto, &rev) {
            Ok(p) => p,
            Err(reason) => return drop(reason),
        };
        fwd.snat_addr = node_addr;
        fwd.snat_port = port;
        conntrack::key(be.addr, node_addr, be.port, port, pkt.proto, CT_DIR_REPLY)
    } else {
        let k = conntrack::key(
            be.addr,
            pkt.saddr,
            be.port,
            pkt.sport,
            pkt.proto,
            CT_DIR_REPLY,
        );
        if let Err(reason) = conntrack::insert(&k, &rev) {
            return drop(reason);
        }
        k
    };
    let fkey = conntrack::key_of(pkt, CT_DIR_FORWARD);
    if let Err(reason) = conntrack::insert(&fkey, &fwd) {
        conntrack::remove(&rkey);
        return drop(reason);
    }
    count(StatReason::NewFlow);

    if nat::dnat(ctx, pkt, be.addr, be.port).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    if !snat {
        return TC_ACT_OK;
    }
    if nat::snat(ctx, pkt, fwd.snat_addr, fwd.snat_port).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    nat::fib_redirect(ctx, pkt)
}
