//! Ingress pipeline (pod and uplink). Per packet, in this order, each step a
//! bounded number of hash lookups:
//!
//! 1. conntrack FORWARD: a known flow gets its stored translation (a UDP
//!    flow whose backend left its service port is re-created: E4);
//! 2. conntrack REPLY of a SNAT'ed flow, looked up only when the destination
//!    port is in the SNAT port range: reverse both translations and forward
//!    the reply ourselves. On the uplink: replies of remote backends. On a
//!    pod's interface: replies of local backends of SNAT'ed flows, and
//!    hairpin replies (M4);
//! 3. service lookup; not a service: pass unchanged;
//! 4. new flow: source ranges (F7), reject when the port has no endpoint
//!    at all (E1), pick a backend, decide on masquerade (M1, M2, M4), create
//!    both conntrack entries, DNAT (and SNAT + forward ourselves).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_boot_ns,
    programs::TcContext,
};
use lb_common::{
    backend_flags, ct_flags, service_flags, BackendValue, ConntrackEntry, DatapathConfig,
    ServiceValue, StatReason, CT_DIR_FORWARD, CT_DIR_REPLY,
};

use crate::{
    backend, conntrack,
    maps::{config, LB_CONNTRACK},
    nat,
    parse::{parse, Packet},
    reject, service,
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
        if conntrack::expired(&cfg, pkt.proto, &entry, now) {
            count(StatReason::ConntrackExpired);
        } else if conntrack::flow_moved(pkt.proto, &entry) {
            count(StatReason::FlowMoved);
        } else {
            conntrack::touch_forward(ptr, &entry, &pkt, now);
            return forward(ctx, &mut pkt, &entry);
        }
    }

    // 2. A reply of a SNAT'ed flow, backend -> SNAT address:SNAT port. Every
    // such reply is addressed to a port of the SNAT range, so other traffic
    // (most of it) skips the lookup. On the uplink these are replies of
    // remote backends; on a pod's interface, of this pod as a local backend
    // (or as its own client, M4).
    if conntrack::in_snat_range(&cfg, pkt.dport) {
        let rkey = conntrack::key_of(&pkt, CT_DIR_REPLY);
        if let Some(ptr) = LB_CONNTRACK.get_ptr_mut(rkey) {
            // SAFETY: a valid map value pointer; copied out at once.
            let entry = unsafe { *ptr };
            // A REPLY entry without SNAT is a reply the client's own
            // interface translates (egress); not ours here.
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

/// Sends a SNAT'ed packet on its way: back out of the interface it came in
/// on when it goes to the pod that sent it (M4 hairpin), otherwise where
/// the FIB says.
#[inline(always)]
fn send(ctx: &TcContext, pkt: &Packet, hairpin: bool) -> i32 {
    if hairpin {
        nat::reflect(ctx, pkt)
    } else {
        nat::fib_redirect(ctx, pkt)
    }
}

/// Applies a FORWARD entry's translation.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &mut Packet, entry: &ConntrackEntry) -> i32 {
    // The flow's client is its own backend: M4 hairpin.
    let hairpin = entry.nat_addr == pkt.saddr;
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
    send(ctx, pkt, hairpin)
}

/// Reverses both translations of a SNAT'ed flow's reply: source back to the
/// frontend, destination back to the client. Then forwards it ourselves:
/// its new source is a frontend the stack may own (a node address), and the
/// stack would drop it as martian.
#[inline(always)]
fn reply_snat(ctx: &TcContext, pkt: &mut Packet, entry: &ConntrackEntry) -> i32 {
    // The backend answers itself: M4 hairpin.
    let hairpin = entry.snat_addr == pkt.saddr;
    if nat::snat(ctx, pkt, entry.nat_addr, entry.nat_port).is_err()
        || nat::dnat(ctx, pkt, entry.snat_addr, entry.snat_port).is_err()
    {
        return drop(StatReason::DropRewriteFailed);
    }
    count(StatReason::ReplyTranslated);
    send(ctx, pkt, hairpin)
}

/// Whether a new flow of `svc` uses the node-local backend set: external
/// frontends with externalTrafficPolicy=Local for traffic from outside
/// (SEMANTICS M3; pods and the node itself use the cluster set), ClusterIPs
/// with internalTrafficPolicy=Local (E5).
#[inline(always)]
fn use_local_set(svc: &ServiceValue, hook: Hook) -> bool {
    (svc.flags & service_flags::EXTERNAL_LOCAL != 0 && is_external(svc) && hook == Hook::Uplink)
        || (svc.flags & service_flags::INTERNAL_LOCAL != 0
            && svc.flags & service_flags::CLUSTER_IP != 0)
}

/// NodePort, externalIP and LoadBalancer frontends.
#[inline(always)]
fn is_external(svc: &ServiceValue) -> bool {
    svc.flags
        & (service_flags::NODE_PORT | service_flags::EXTERNAL_IP | service_flags::LOAD_BALANCER)
        != 0
}

/// Whether a new flow that arrived on an uplink is SNAT'ed to the node, as
/// kube-proxy's iptables proxier decides it:
/// - M2: an external frontend with externalTrafficPolicy=Cluster, always
///   (kube-proxy marks everything that enters KUBE-EXT-* for masquerade),
///   whether the backend is local or not;
/// - M1: a ClusterIP reached from outside the cluster CIDR (with no
///   --cluster-cidr configured, never);
/// - and any flow to a backend on another node: its reply would go
///   straight back to the client, bypassing this node's reverse NAT.
///
/// externalTrafficPolicy=Local keeps the client's address (M3): its local
/// set holds local backends only.
#[inline(always)]
fn uplink_masquerade(
    svc: &ServiceValue,
    be: &BackendValue,
    saddr: u32,
    cfg: &DatapathConfig,
) -> bool {
    be.flags & backend_flags::LOCAL == 0
        || (is_external(svc) && svc.flags & service_flags::EXTERNAL_LOCAL == 0)
        || (svc.flags & service_flags::CLUSTER_IP != 0 && cfg.outside_cluster_cidr(saddr))
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
    // F7: sources outside a LoadBalancer's ranges never reach a backend
    // (nor learn whether it has any).
    if !service::source_allowed(svc, pkt.saddr) {
        return drop(StatReason::DropSourceRange);
    }
    let local = use_local_set(svc, hook);
    let members = if local {
        svc.local_backend_count
    } else {
        svc.backend_count
    };
    if members == 0 {
        // E1: no usable endpoint at all: refuse the connection, on every
        // frontend of the port. E2 (and internalTrafficPolicy=Local): the
        // port has endpoints, none on this node: drop, as kube-proxy does.
        if svc.backend_count == 0 && svc.local_backend_count == 0 {
            return reject::reject(ctx, pkt);
        }
        return drop(StatReason::DropNoBackend);
    }
    let (backend_id, be) = match backend::select(svc, local, pkt.saddr, now) {
        Ok(b) => b,
        Err(reason) => return drop(reason),
    };
    // M4: a pod that reaches itself through its Service gets the connection
    // from the hairpin address (its own address as source would make its
    // kernel drop the packet as martian), and its answers come back here.
    let hairpin = hook == Hook::Pod && be.addr == pkt.saddr && cfg.hairpin_addr != 0;
    let snat = match hook {
        Hook::Pod => hairpin,
        Hook::Uplink => uplink_masquerade(svc, &be, pkt.saddr, cfg),
    };
    let snat_addr = if hairpin {
        cfg.hairpin_addr
    } else if snat {
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
        let port = match conntrack::claim_snat_port(cfg, &be, snat_addr, pkt.proto, &rev) {
            Ok(p) => p,
            Err(reason) => return drop(reason),
        };
        fwd.snat_addr = snat_addr;
        fwd.snat_port = port;
        conntrack::key(be.addr, snat_addr, be.port, port, pkt.proto, CT_DIR_REPLY)
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
    // A SNAT'ed packet never goes up the stack: its source is a node address
    // (martian on arrival) or the hairpin address. To a local backend the
    // FIB gives the route to the pod (cni0 or its veth); to a remote one,
    // the route out.
    send(ctx, pkt, hairpin)
}
