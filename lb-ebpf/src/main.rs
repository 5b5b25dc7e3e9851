//! lb kernel datapath: four TC programs that translate Service traffic, and
//! four cgroup sock_addr programs that translate the node's own sockets (F2).
//!
//! The entry points are thin; every concern lives in its own module, in the
//! style of Cilium's bpf/lib:
//!
//! | module      | concern                                                   |
//! |-------------|-----------------------------------------------------------|
//! | `parse`     | Ethernet/IPv4/TCP/UDP parsing into [`parse::Packet`]      |
//! | `csum`      | header offsets, incremental L3/L4 checksum rewrites       |
//! | `maps`      | every map and the `LB_CONFIG` global                      |
//! | `monitor`   | `lbctl monitor` events and debug lines (load-time switch) |
//! | `stats`     | per-CPU counters by `lb_common::StatReason`               |
//! | `conntrack` | keys, expiry, TCP state bits, entry updates, SNAT ports   |
//! | `service`   | frontend lookup (exact, then NodePort wildcard)           |
//! | `backend`   | backend selection (random slot, session affinity)         |
//! | `nat`       | DNAT/SNAT/reverse rewrites, FIB lookup + redirect         |
//! | `reject`    | E1: TCP reset / ICMP port unreachable for empty services  |
//! | `icmp`      | C3: ICMP errors of translated flows translated back       |
//! | `frag`      | C4: later IP fragments get what their first one got       |
//! | `ingress`   | the ingress pipeline (pod and uplink)                     |
//! | `egress`    | the egress pipeline (reverse NAT of replies)              |
//! | `sock`      | F2: socket-level LB for the node's own processes (cgroup) |
#![no_std]
#![no_main]

mod backend;
mod conntrack;
mod csum;
mod egress;
mod frag;
mod icmp;
mod ingress;
mod maps;
mod monitor;
mod nat;
mod parse;
mod reject;
mod service;
mod sock;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use lb_common::monitor::hook;

/// Where a program is attached. Passed as a constant so every program is
/// specialised at compile time.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A pod's host-side interface.
    Pod,
    /// A node uplink.
    Uplink,
}

/// TC ingress on a pod's host-side veth: packets sent by the pod.
#[classifier]
pub fn lb_pod_ingress(ctx: TcContext) -> i32 {
    maps::keep_unread_maps();
    monitor::begin(&ctx, hook::POD_INGRESS);
    let verdict = ingress::run(&ctx, Hook::Pod);
    monitor::finish(&ctx, verdict);
    verdict
}

/// TC egress on a pod's host-side veth: packets delivered to the pod.
#[classifier]
pub fn lb_pod_egress(ctx: TcContext) -> i32 {
    maps::keep_unread_maps();
    monitor::begin(&ctx, hook::POD_EGRESS);
    let verdict = egress::run(&ctx);
    monitor::finish(&ctx, verdict);
    verdict
}

/// TC ingress on an uplink: packets from outside the node.
#[classifier]
pub fn lb_uplink_ingress(ctx: TcContext) -> i32 {
    maps::keep_unread_maps();
    monitor::begin(&ctx, hook::UPLINK_INGRESS);
    let verdict = ingress::run(&ctx, Hook::Uplink);
    monitor::finish(&ctx, verdict);
    verdict
}

/// TC egress on an uplink: packets leaving the node.
#[classifier]
pub fn lb_uplink_egress(ctx: TcContext) -> i32 {
    maps::keep_unread_maps();
    monitor::begin(&ctx, hook::UPLINK_EGRESS);
    let verdict = egress::run(&ctx);
    monitor::finish(&ctx, verdict);
    verdict
}

/// cgroup/connect4 (F2): a host-network socket's connect() to a frontend
/// goes to a backend.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx)
}

/// cgroup/sendmsg4 (F2): an unconnected UDP socket's sendto() to a frontend.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx)
}

/// cgroup/recvmsg4 (F2): recvfrom() reports the frontend as the source.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup/getpeername4 (F2): getpeername() reports the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Every panic path must be optimised away (the verifier would reject the
    // program otherwise); this tells the compiler that none is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}
