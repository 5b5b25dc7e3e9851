//! F2: socket-level load balancing for the node's own processes
//! (cgroup/connect4, sendmsg4, recvmsg4, getpeername4).
//!
//! A process in the node's network namespace (hostNetwork pods, node
//! daemons, the agent itself) never crosses a pod interface, and its packets
//! to a ClusterIP would leave through the uplink untranslated. So the
//! translation happens once per socket, in the system call, the way Cilium's
//! socket LB does it:
//!
//! - `connect4` (TCP and UDP connect()) and `sendmsg4` (UDP sendto() on an
//!   unconnected socket): look the destination up like the TC path does
//!   (exact frontend, else the NodePort wildcard when the destination is one
//!   of this node's addresses; another node's address passes untouched, that
//!   node translates it at its uplink), pick a backend by the TC path's rules,
//!   rewrite the address the kernel uses and remember the socket's frontend in
//!   `LB_SOCK_REVNAT` under (socket cookie, backend).
//! - `recvmsg4` (the source address recvfrom() reports) and `getpeername4`:
//!   show the frontend instead of the backend, so the application sees the
//!   address it asked for (resolvers check the source of a DNS answer).
//!
//! No packet is rewritten and there is no conntrack entry: the kernel only
//! ever sees the backend's address. A connected socket keeps its backend for
//! its life; the agent destroys connected UDP sockets whose backend left the
//! service (E4, lb-userspace `dataplane::sockets`).
//!
//! Only sockets of the node's own network namespace are translated
//! (`bpf_get_netns_cookie` == `LB_CONFIG.netns_cookie`). The hooks sit on the
//! node's cgroup v2 root, so every pod's processes run them too, but a pod's
//! traffic is translated at its interface by the TC programs, which give it
//! what the contract asks for a pod: conntrack, affinity keyed by the pod's
//! own address, the hairpin SNAT (M4). Translating it here as well would
//! change those (and the TC hooks would then see a flow to a backend they
//! never translated). With cookie 0 (socket LB off) nothing matches.
//!
//! Return codes: 1 lets the system call go on; 0 fails it, with the error set
//! by `bpf_set_retval` (EPERM when none is set).

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    service_flags, ServiceValue, SockRevNatKey, SockRevNatValue, StatReason, PROTO_TCP, PROTO_UDP,
};

use crate::{
    backend,
    maps::{config, LB_SOCK_REVNAT},
    service,
    stats::count,
};

/// Let the system call proceed.
const PROCEED: i32 = 1;
/// Fail the system call (with the error given to `bpf_set_retval`).
const REJECT: i32 = 0;

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// The session-affinity client of every socket of the node: 0.0.0.0, "this
/// host" (RFC 1122), an address no client of the TC path sends from. The
/// source address of a socket is not known at connect() time (the route
/// picks it later), so the node is one client, as Cilium keys socket-LB
/// affinity by the network namespace.
pub const NODE_AFFINITY_CLIENT: u32 = 0;

/// Whether the socket belongs to the node's own network namespace.
#[inline(always)]
fn node_socket(ctx: &SockAddrContext) -> bool {
    let want = config().netns_cookie;
    // SAFETY: the program's context pointer, which the helper accepts.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == want
}

/// The socket's cookie (unique per socket for the whole boot).
#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the program's context pointer, which the helper accepts.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// (destination address, port, protocol) of an IPv4 TCP or UDP socket
/// address; `None` for anything else.
#[inline(always)]
fn user_addr(ctx: &SockAddrContext) -> Option<(u32, u16, u8)> {
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for the program's run; these fields are
    // readable by every sock_addr attach type.
    let (family, ip, port, proto) = unsafe {
        (
            (*sa).user_family,
            (*sa).user_ip4,
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    if family != AF_INET {
        return None;
    }
    let proto = match proto {
        p if p == u32::from(PROTO_TCP) => PROTO_TCP,
        p if p == u32::from(PROTO_UDP) => PROTO_UDP,
        _ => return None,
    };
    // user_port holds the port in network order in its low 16 bits.
    Some((ip, port as u16, proto))
}

/// Rewrites the address the system call uses (4-byte stores, the only width
/// the verifier accepts for writes).
#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, addr: u32, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for the program's run; user_ip4 and
    // user_port are writable by connect4, sendmsg4, recvmsg4, getpeername4.
    unsafe {
        (*sa).user_ip4 = addr;
        (*sa).user_port = u32::from(port);
    }
}

/// Fails the system call with `-errno`.
#[inline(always)]
fn reject(errno: i32) -> i32 {
    // SAFETY: no preconditions; connect4 and sendmsg4 may set the return
    // value (kernel 5.18+).
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// Whether a new socket of the node to `svc` uses the node-local set: the
/// node is an in-cluster client like a pod, so internalTrafficPolicy=Local
/// applies to ClusterIPs (E5), and externalTrafficPolicy=Local does not
/// (M3: the node itself is short-circuited to the cluster-wide set).
#[inline(always)]
fn use_local_set(svc: &ServiceValue) -> bool {
    svc.flags & service_flags::INTERNAL_LOCAL != 0 && svc.flags & service_flags::CLUSTER_IP != 0
}

/// connect4 and sendmsg4: send the socket to a backend of the frontend it
/// addresses.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext) -> i32 {
    if !node_socket(ctx) {
        return PROCEED;
    }
    let Some((daddr, dport, proto)) = user_addr(ctx) else {
        return PROCEED;
    };
    let Some(svc) = service::lookup_dest(daddr, dport, proto) else {
        return PROCEED;
    };
    // F7: a LoadBalancer with source ranges admits the node's own
    // connections only when a range holds a node address (kube-proxy's
    // allowFromNode). The source is not known yet, so this is the test.
    if svc.flags & service_flags::LOAD_BALANCER != 0
        && svc.flags & service_flags::SOURCE_RANGES != 0
        && svc.flags & service_flags::SOURCE_RANGES_ALLOW_NODE == 0
    {
        count(StatReason::DropSourceRange);
        // EPERM: what a REJECT without an error code reports.
        return REJECT;
    }
    // E1: no usable endpoint at all: connection refused, at once (what
    // kube-proxy's REJECT gives a TCP or a UDP client).
    if svc.backend_count == 0 {
        count(StatReason::SockRejected);
        return reject(ECONNREFUSED);
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // The TC path's choice (a random slot of the set, or the affinity entry
    // while it is young and its backend still serves the set: C6), with the
    // node as one client.
    let (backend_id, be) =
        match backend::select(&svc, use_local_set(&svc), NODE_AFFINITY_CLIENT, now) {
            Ok(b) => b,
            // E2 (internalTrafficPolicy=Local, no endpoint on this node) or a set
            // the agent is rewriting: the TC path drops; a socket can only fail.
            // No route to the service from here, as Cilium answers.
            Err(reason) => {
                count(reason);
                return reject(EHOSTUNREACH);
            }
        };
    let key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        addr: be.addr,
        port: be.port,
        _pad: 0,
    };
    let value = SockRevNatValue {
        addr: daddr,
        port: dport,
        proto,
        _pad: 0,
        service_id: svc.service_id,
        backend_id,
    };
    // An LRU insert fails only when the kernel cannot allocate; the socket
    // still works then, recvfrom/getpeername would show the backend.
    let _ = LB_SOCK_REVNAT.insert(key, value, BPF_ANY as u64);
    set_user_addr(ctx, be.addr, be.port);
    count(StatReason::SockTranslated);
    PROCEED
}

/// recvmsg4 and getpeername4: a peer that is a backend this socket was sent
/// to by [`forward`] shows as the frontend the socket asked for.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    if !node_socket(ctx) {
        return PROCEED;
    }
    let Some((addr, port, proto)) = user_addr(ctx) else {
        return PROCEED;
    };
    let key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: a valid map value pointer; copied out at once.
    let Some(front) = LB_SOCK_REVNAT.get_ptr(key).map(|p| unsafe { *p }) else {
        return PROCEED;
    };
    if front.proto == proto {
        set_user_addr(ctx, front.addr, front.port);
        count(StatReason::SockRevTranslated);
    }
    PROCEED
}
