//! Ingress pipeline (pod and uplink). Per packet, in this order, each step a
//! bounded number of hash lookups:
//!
//! 0. ICMP errors about translated flows are translated (C3, see `icmp`);
//!    other ICMP passes;
//! 1. conntrack FORWARD: a known flow gets its stored translation (a UDP
//!    flow whose backend left its service port is re-created: E4); its
//!    REPLY direction is checked, refreshed or repaired with it (C1);
//! 2. conntrack REPLY of a SNAT'ed flow, looked up only when the destination
//!    port is in the SNAT port range: reverse both translations and forward
//!    the reply ourselves. On the uplink: replies of remote backends. On a
//!    pod's interface: replies of local backends of SNAT'ed flows, and
//!    hairpin replies (M4);
//! 3. service lookup; not a service: pass unchanged, unless the packet opens
//!    a direct flow whose replies a translated flow would take (C2);
//! 4. new flow: source ranges (F7), reject when the port has no endpoint
//!    at all (E1), pick a backend, decide on masquerade (M1, M2, M4), create
//!    both conntrack entries (the REPLY key claimed atomically, the client's
//!    port remapped on a clash: C2), DNAT (and SNAT + forward ourselves).
//!
//! The steps only decide: they leave a [`Plan`] (the addresses and ports the
//! packet leaves with, and which way it goes), which [`run`] carries out in
//! one place: a packet the datapath forwards itself is routed **before** it
//! is translated (`nat::route`), so that what cannot be forwarded (TTL,
//! MTU) is answered with an ICMP error about the packet as its sender sent
//! it (C3); then it is rewritten and sent. The heavy steps are BPF
//! functions of their own (new flows, routing, ICMP answers, rejects),
//! each called from `run` only, so no call chain is deeper than two frames
//! and the stack stays within the verifier's 512 bytes.

use aya_ebpf::programs::TcContext;
use lb_common::{
    backend_flags, ct_flags, service_flags, BackendValue, ConntrackEntry, DatapathConfig,
    ServiceValue, StatReason, CT_DIR_FORWARD, CT_DIR_REPLY, FRAG_DIR_INGRESS, PROTO_TCP,
};

use crate::{
    backend,
    conntrack::{self, Forward},
    frag,
    icmp::{self, Related, Rewrite},
    maps::{config, LB_CONNTRACK},
    nat::{self, Route},
    parse::{self, Frag, IcmpError, Packet, PROTO_ICMP, TCP_SYN},
    reject, service,
    stats::{count, drop, pass},
    Hook,
};

/// Return codes of the deciding steps besides verdicts (the TC verdicts lb
/// uses are -1, 2 and 7): the plan is made; the packet is to be rejected
/// (E1).
const PLANNED: i32 = 0;
const REJECT: i32 = 100;
/// `decide`: a new flow to the frontend in its `svc` out-parameter.
const NEW_FLOW: i32 = 101;
/// `decide`: a direct flow whose reply tuple a translated flow has (C2).
const DIRECT_CLASH: i32 = 102;

/// Which way a translated packet leaves.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Via {
    /// Up the stack (TCX_NEXT).
    #[default]
    Stack,
    /// Back out of the interface it came in on (M4 hairpin).
    Reflect,
    /// Forwarded by the datapath along the route the FIB gives (SNAT'ed
    /// packets: their source is a node address, martian on arrival).
    Fib,
}

/// What counts the translation of a plan.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Event {
    /// Counted already (a new flow).
    #[default]
    None,
    Forward,
    Reply,
}

/// A translation decided for a packet: the addresses and ports it leaves
/// with, which way, and the node address an ICMP error about it comes from.
#[derive(Clone, Copy, Default)]
struct Plan {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    node: u32,
    via: Via,
    event: Event,
}

#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook) -> i32 {
    count(StatReason::Packets);
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(reason) => return pass(reason),
    };
    // C4: a later fragment gets what its first fragment got.
    if ip.frag == Frag::Later {
        return frag::later(ctx, &ip, FRAG_DIR_INGRESS);
    }
    let mut pkt = parse::unparsed(&ip);
    let verdict = if ip.proto == PROTO_ICMP {
        match parse::icmp_error(ctx, &ip) {
            Some(mut e) => icmp_error(ctx, &mut e),
            None => pass(StatReason::PassOtherProto),
        }
    } else {
        match parse::l4(ctx, &ip) {
            Ok(p) => {
                pkt = p;
                l4(ctx, &mut pkt, hook)
            }
            Err(reason) => pass(reason),
        }
    };
    if ip.frag == Frag::First {
        frag::record(&ip, FRAG_DIR_INGRESS, verdict, &pkt);
    }
    verdict
}

/// Steps 1-4 for a TCP or UDP packet (the first fragment of a datagram
/// too), each deciding step a BPF function of its own.
#[inline(always)]
fn l4(ctx: &TcContext, pkt: &mut Packet, hook: Hook) -> i32 {
    let mut plan = Plan::default();
    let mut svc = ServiceValue::default();
    // Every step that needs much stack is a BPF function called from here
    // only: no call chain is deeper than two frames (see the module doc).
    let mut code = decide(pkt, &mut plan, &mut svc);
    if code == NEW_FLOW {
        code = new_flow(ctx, pkt, &svc, hook, &mut plan);
    } else if code == DIRECT_CLASH {
        code = direct_clash(pkt, &mut plan);
    }
    if code == PLANNED {
        code = execute(ctx, pkt, &plan);
    }
    if code >= nat::ANSWER {
        return reject::router_error(ctx, pkt, (code - nat::ANSWER) as u16, plan.node);
    }
    if code == REJECT {
        return reject::reject(ctx, pkt);
    }
    code
}

/// Steps 1-3 for a TCP or UDP packet: a verdict, a plan, or `NEW_FLOW` to
/// `svc`. A BPF function of its own, to keep the stack of `run` small.
#[inline(never)]
fn decide(pkt: &mut Packet, plan: &mut Plan, svc: &mut ServiceValue) -> i32 {
    let cfg = config();
    // 1. A known flow, client -> frontend (both directions checked and
    // refreshed: C1). An expired or moved flow is handled as a new one; its
    // old FORWARD entry goes first, so that the new one is inserted like
    // any other (BPF_NOEXIST, C2).
    match conntrack::lookup_forward(cfg, pkt) {
        Some(Forward::Use(entry)) => {
            plan_forward(pkt, &entry, plan);
            return PLANNED;
        }
        Some(Forward::Recreate) => conntrack::remove(&conntrack::key_of(pkt, CT_DIR_FORWARD)),
        None => {}
    }

    // 2. A reply of a SNAT'ed flow, backend -> SNAT address:SNAT port. Every
    // such reply is addressed to a port of the SNAT range, so other traffic
    // (most of it) skips the lookup. On the uplink these are replies of
    // remote backends; on a pod's interface, of this pod as a local backend
    // (or as its own client, M4).
    if conntrack::in_snat_range(cfg, pkt.dport) {
        let rkey = conntrack::key_of(pkt, CT_DIR_REPLY);
        if let Some(ptr) = LB_CONNTRACK.get_ptr_mut(rkey) {
            // SAFETY: a valid map value pointer; copied out at once.
            let entry = unsafe { *ptr };
            // A REPLY entry without SNAT, or with only the client's port
            // remapped (C2), is a reply the client's own interface
            // translates (egress); not ours here.
            if entry.flags & (ct_flags::SNAT | ct_flags::PORT_REMAP) == ct_flags::SNAT {
                conntrack::touch_reply(ptr, &entry, pkt);
                *plan = Plan {
                    saddr: entry.nat_addr,
                    sport: entry.nat_port,
                    daddr: entry.snat_addr,
                    dport: entry.snat_port,
                    // The backend answers itself: M4 hairpin.
                    via: if entry.snat_addr == pkt.saddr {
                        Via::Reflect
                    } else {
                        Via::Fib
                    },
                    node: pkt.daddr,
                    event: Event::Reply,
                };
                return PLANNED;
            }
        }
    }

    // 3. A frontend? If not, the packet passes unchanged, unless it opens
    // a direct flow whose replies a translated flow's REPLY entry would
    // take (C2): that flow gets its source port remapped.
    let Some(found) = service::lookup(pkt) else {
        if conntrack::reply_tuple_taken(pkt) {
            return DIRECT_CLASH;
        }
        return pass(StatReason::PassNotService);
    };

    // 4. A new flow.
    *svc = found;
    NEW_FLOW
}

/// C2: a direct flow (no service) whose replies a translated flow's REPLY
/// entry would take gets its source port remapped.
#[inline(never)]
fn direct_clash(pkt: &mut Packet, plan: &mut Plan) -> i32 {
    match conntrack::remap_direct(pkt, conntrack::now()) {
        Ok(entry) => {
            plan_forward(pkt, &entry, plan);
            PLANNED
        }
        Err(reason) => drop(reason),
    }
}

/// The plan of a packet of a known flow (its FORWARD entry).
#[inline(always)]
fn plan_forward(pkt: &Packet, entry: &ConntrackEntry, plan: &mut Plan) {
    let snat = entry.flags & ct_flags::SNAT != 0;
    // Only the client's port remapped (C2): the stack may see it.
    let remap = entry.flags & ct_flags::PORT_REMAP != 0;
    let (saddr, sport) = if snat {
        (entry.snat_addr, entry.snat_port)
    } else {
        (pkt.saddr, pkt.sport)
    };
    *plan = Plan {
        saddr,
        sport,
        daddr: entry.nat_addr,
        dport: entry.nat_port,
        via: if !snat || remap {
            Via::Stack
        } else if entry.nat_addr == pkt.saddr {
            // The flow's client is its own backend: M4 hairpin.
            Via::Reflect
        } else {
            Via::Fib
        },
        node: entry.snat_addr,
        event: Event::Forward,
    };
}

/// Sends a translated packet on its way.
#[inline(always)]
fn send(ctx: &TcContext, pkt: &mut Packet, via: Via, route: &Route) -> i32 {
    match via {
        Via::Stack => pass(StatReason::PassTranslated),
        Via::Reflect => nat::reflect(ctx, pkt),
        Via::Fib => nat::fib_redirect(ctx, pkt, route),
    }
}

/// Carries out a plan: routes (before the rewrite), rewrites, sends. A
/// verdict, or `nat::ANSWER` + MTU when the packet is to be answered with
/// an ICMP error instead (by `run`).
#[inline(never)]
fn execute(ctx: &TcContext, pkt: &mut Packet, plan: &Plan) -> i32 {
    let mut r = Route::default();
    if plan.via == Via::Fib {
        let out = Packet {
            saddr: plan.saddr,
            daddr: plan.daddr,
            sport: plan.sport,
            dport: plan.dport,
            ..*pkt
        };
        let code = nat::route(ctx, pkt, &out, plan.node, &mut r);
        if code != nat::ROUTED {
            return code;
        }
    }
    if nat::snat(ctx, pkt, plan.saddr, plan.sport).is_err()
        || nat::dnat(ctx, pkt, plan.daddr, plan.dport).is_err()
    {
        return drop(StatReason::DropRewriteFailed);
    }
    match plan.event {
        Event::Forward => count(StatReason::ForwardTranslated),
        Event::Reply => count(StatReason::ReplyTranslated),
        Event::None => {}
    }
    send(ctx, pkt, plan.via, &r)
}

/// Step 0 (C3): an ICMP error at ingress. About a reply (from the client,
/// toward the backend) or about a SNAT'ed flow's forward packet (toward the
/// client); translated and sent the way that flow's packets go (SNAT'ed:
/// forwarded by the datapath, never answered with another ICMP error).
/// Errors toward clients of plain DNAT flows are translated at the
/// client's egress; everything else passes unchanged.
#[inline(never)]
fn icmp_error(ctx: &TcContext, e: &mut IcmpError) -> i32 {
    let cfg = config();
    let snat_port = conntrack::in_snat_range(cfg, e.inner_sport);
    let mut w = Rewrite::default();
    let snat = match icmp::related_at_ingress(e, snat_port, &mut w) {
        Related::ToBackend { snat } => snat,
        Related::ToClient => true,
        Related::No => return pass(StatReason::PassOtherProto),
    };
    let via = if !snat {
        Via::Stack
    } else if w.outer_daddr == e.outer.saddr {
        Via::Reflect
    } else {
        Via::Fib
    };
    let mut r = Route::default();
    if via == Via::Fib {
        let out = Packet {
            saddr: w.outer_saddr,
            daddr: w.outer_daddr,
            ..e.outer
        };
        let code = nat::route(ctx, &e.outer, &out, 0, &mut r);
        if code != nat::ROUTED {
            return code;
        }
    }
    if icmp::apply(ctx, e, &w).is_err() {
        return drop(StatReason::DropRewriteFailed);
    }
    icmp::translated();
    send(ctx, &mut e.outer, via, &r)
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

/// Step 4: a new flow to frontend `svc`. Creates both conntrack entries and
/// plans the first packet's translation; or a verdict, or `REJECT` (E1).
/// A BPF function of its own: it keeps the stack of the common path small.
#[inline(never)]
fn new_flow(
    ctx: &TcContext,
    pkt: &mut Packet,
    svc: &ServiceValue,
    hook: Hook,
    plan: &mut Plan,
) -> i32 {
    let cfg = config();
    let now = conntrack::now();
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
            return REJECT;
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
        // M2: a remote backend must reach the SNAT address: the uplink the
        // route to it leaves by; a local one answers any node address.
        let egress = if be.flags & backend_flags::LOCAL == 0 {
            nat::egress_uplink_addr(ctx, be.addr)
        } else {
            0
        };
        // SAFETY: the context's skb is valid for the program's run.
        match service::snat_source(pkt, unsafe { (*ctx.skb.skb).ifindex }) {
            _ if egress != 0 => egress,
            Some(a) => a,
            None => return drop(StatReason::DropNoSnatAddress),
        }
    } else {
        0
    };
    let flags =
        conntrack::tcp_bits(pkt, ct_flags::FIN_FORWARD) | if snat { ct_flags::SNAT } else { 0 };

    let mut fwd = ConntrackEntry {
        nat_addr: be.addr,
        snat_addr: 0,
        nat_port: be.port,
        snat_port: 0,
        backend_id,
        service_id: svc.service_id,
        flags,
        created_s: lb_common::created_s(now),
        last_seen_ns: now,
    };
    let mut rev = ConntrackEntry {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..fwd
    };
    let fkey = conntrack::key_of(pkt, CT_DIR_FORWARD);

    // Both entries exist before the first packet leaves: the REPLY entry
    // first, with its key claimed atomically (BPF_NOEXIST), then the
    // FORWARD entry.
    let rkey = if snat {
        rev.snat_addr = pkt.saddr;
        rev.snat_port = pkt.sport;
        let port = match conntrack::claim_snat_port(&be, snat_addr, pkt.proto, &rev) {
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
        match conntrack::claim_reply(cfg, &k, &rev, &fkey, now) {
            Ok(false) => k,
            Ok(true) => {
                // C2: another live flow has this reply tuple (the same
                // client port to another frontend of this backend, or to
                // the backend directly): remap the client's source port,
                // keeping its address, as netfilter does.
                let bits = ct_flags::SNAT | ct_flags::PORT_REMAP;
                rev.flags |= bits;
                rev.snat_addr = pkt.saddr;
                rev.snat_port = pkt.sport;
                let port = match conntrack::claim_snat_port(&be, pkt.saddr, pkt.proto, &rev) {
                    Ok(p) => p,
                    Err(reason) => return drop(reason),
                };
                count(StatReason::PortRemapped);
                fwd.flags |= bits;
                fwd.snat_addr = pkt.saddr;
                fwd.snat_port = port;
                conntrack::key(be.addr, pkt.saddr, be.port, port, pkt.proto, CT_DIR_REPLY)
            }
            Err(reason) => return drop(reason),
        }
    };
    match conntrack::insert_forward(&fkey, &fwd) {
        Ok(None) => {}
        Ok(Some(winner)) => {
            // Another CPU created this flow first (C2): its entry is used
            // (it wrote its REPLY entry before it); the REPLY entry written
            // here goes unless it is the winner's too (same backend, port).
            if fkey.peer(&winner) != rkey {
                conntrack::remove(&rkey);
            }
            count(StatReason::ConntrackRaceLost);
            plan_forward(pkt, &winner, plan);
            return PLANNED;
        }
        Err(reason) => {
            conntrack::remove(&rkey);
            return drop(reason);
        }
    }
    count(StatReason::NewFlow);
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN == 0 {
        count(StatReason::NewFlowWithoutSyn);
    }
    plan_forward(pkt, &fwd, plan);
    plan.event = Event::None;
    PLANNED
}
