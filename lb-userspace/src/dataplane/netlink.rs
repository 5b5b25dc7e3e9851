//! A small rtnetlink client: list links and IPv4 addresses of the current
//! network namespace, and a subscription that wakes the agent when either
//! changes.
//!
//! Netlink rather than /sys/class/net: the agent may run with the network
//! namespace of a node but the mount namespace of the host (as an emulated
//! node does, and as a hostNetwork pod does with a host /sys), and sysfs shows
//! the interfaces of whoever mounted it. Netlink sockets always speak for the
//! caller's network namespace (the one the calling thread is in when the
//! socket is opened; each dump opens its own).
//!
//! Messages are built and parsed by the rust-netlink crates
//! (`netlink-packet-route` over `netlink-packet-core`), the socket is
//! `netlink-sys`'s synchronous one. Only the dump loop (read datagrams until
//! NLMSG_DONE, turn NLMSG_ERROR into an error) and the selection of what the
//! agent needs are ours.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer,
    NlasIterator, Parseable, ParseableParametrized, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeader, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkAttribute, LinkHeader, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteLwEnCapType, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("netlink {op}: kernel returned error {errno}")]
    Kernel { op: &'static str, errno: i32 },
    #[error("netlink {op}: malformed message")]
    Malformed { op: &'static str },
}

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Link {
    pub index: u32,
    pub name: String,
}

/// An IPv4 address assigned to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceAddr {
    pub index: u32,
    pub addr: Ipv4Addr,
    /// IFA_F_SECONDARY: not the interface's primary address in its subnet.
    pub secondary: bool,
}

/// Link, IPv4 address and IPv4 route changes: the first two are what the
/// agent attaches to and answers on; the routes say which link is the uplink
/// when none is configured.
const CHANGE_GROUPS: u32 =
    (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV4_ROUTE) as u32;
/// One dump datagram is at most a few pages; more than enough.
const RECV_BUF: usize = 64 * 1024;
/// `wait()` drains at most this many queued datagrams before returning (a
/// steady storm must not keep it from waking the agent).
const DRAIN_MAX: usize = 1024;
const NLMSG_HDRLEN: usize = 16;
const RTM_NEWLINK: u16 = libc::RTM_NEWLINK;
const RTM_NEWADDR: u16 = libc::RTM_NEWADDR;
const RTM_NEWROUTE: u16 = libc::RTM_NEWROUTE;

fn open_socket(op: &'static str, groups: u32) -> Result<Socket, NetlinkError> {
    let io = |source| NetlinkError::Io { op, source };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(io)?;
    sock.bind(&SocketAddr::new(0, groups)).map_err(io)?;
    Ok(sock)
}

/// The bytes of a dump request for `msg`.
fn dump_request(msg: RouteNetlinkMessage, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    buf
}

/// What one netlink message of a dump reply means to the dump loop.
#[derive(Debug, PartialEq)]
enum Reply {
    Done,
    /// NLMSG_ERROR with a non-zero code: the positive errno.
    Failed(i32),
    Message(RouteNetlinkMessage),
    /// An ack, a no-op, or a message the crate could not make sense of even
    /// leniently: nothing for us.
    Skip,
}

/// Decodes one netlink message (`buf` is exactly its length).
fn decode(buf: &[u8]) -> Result<Reply, DecodeError> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) {
        Ok(msg) => Ok(match msg.payload {
            NetlinkPayload::Done(_) => Reply::Done,
            NetlinkPayload::Error(e) => match e.code {
                Some(code) => Reply::Failed(-code.get()),
                None => Reply::Skip, // an ack
            },
            NetlinkPayload::InnerMessage(m) => Reply::Message(m),
            _ => Reply::Skip,
        }),
        Err(e) => {
            let nl = NetlinkBuffer::new_checked(buf)?;
            match nl.message_type() {
                // The framing the dump loop relies on is broken.
                NLMSG_DONE | NLMSG_ERROR => Err(e),
                // One attribute the crate rejects (a kernel newer than the
                // crate, say) must not hide a link or an address.
                t => Ok(lenient(t, nl.payload()).map_or(Reply::Skip, Reply::Message)),
            }
        }
    }
}

/// The attributes of `buf` that parse; the ones that do not are left out.
fn lenient_nlas<A>(
    buf: &[u8],
    parse: impl Fn(&NlaBuffer<&[u8]>) -> Result<A, DecodeError>,
) -> Vec<A> {
    NlasIterator::new(buf)
        .map_while(Result::ok)
        .filter_map(|nla| parse(&nla).ok())
        .collect()
}

/// Parses the messages we dump with only the attributes that parse.
fn lenient(msg_type: u16, payload: &[u8]) -> Option<RouteNetlinkMessage> {
    match msg_type {
        RTM_NEWLINK => {
            let mut m = LinkMessage::default();
            m.header = LinkHeader::parse(payload).ok()?;
            let family = m.header.interface_family;
            m.attributes = lenient_nlas(payload.get(m.header.buffer_len()..)?, |nla| {
                LinkAttribute::parse_with_param(nla, family)
            });
            Some(RouteNetlinkMessage::NewLink(m))
        }
        RTM_NEWADDR => {
            let mut m = AddressMessage::default();
            m.header = AddressHeader::parse(payload).ok()?;
            m.attributes = lenient_nlas(payload.get(m.header.buffer_len()..)?, |nla| {
                AddressAttribute::parse(nla)
            });
            Some(RouteNetlinkMessage::NewAddress(m))
        }
        RTM_NEWROUTE => {
            let mut m = RouteMessage::default();
            m.header = RouteHeader::parse(payload).ok()?;
            let param = (
                m.header.address_family,
                m.header.kind,
                RouteLwEnCapType::None,
            );
            m.attributes = lenient_nlas(payload.get(m.header.buffer_len()..)?, |nla| {
                RouteAttribute::parse_with_param(nla, param)
            });
            Some(RouteNetlinkMessage::NewRoute(m))
        }
        _ => None,
    }
}

/// Sends a dump request and calls `each` for every message of the answer,
/// reading datagrams until NLMSG_DONE.
fn dump(
    op: &'static str,
    request: RouteNetlinkMessage,
    mut each: impl FnMut(RouteNetlinkMessage),
) -> Result<(), NetlinkError> {
    let io = |source| NetlinkError::Io { op, source };
    let sock = open_socket(op, 0)?;
    sock.send_to(&dump_request(request, 1), &SocketAddr::new(0, 0), 0)
        .map_err(io)?;
    let mut buf = Vec::with_capacity(RECV_BUF);
    loop {
        buf.clear();
        // MSG_TRUNC: the datagram's real length, to notice a truncated one.
        let n = sock.recv(&mut buf, libc::MSG_TRUNC).map_err(io)?;
        if n > buf.len() {
            return Err(NetlinkError::Malformed { op });
        }
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let len = NetlinkBuffer::new_checked(&buf[off..n])
                .map_err(|_| NetlinkError::Malformed { op })?
                .length() as usize;
            match decode(&buf[off..off + len]).map_err(|_| NetlinkError::Malformed { op })? {
                Reply::Done => return Ok(()),
                Reply::Failed(errno) => return Err(NetlinkError::Kernel { op, errno }),
                Reply::Message(m) => each(m),
                Reply::Skip => {}
            }
            off += (len + 3) & !3;
        }
    }
}

fn link_from_message(m: &LinkMessage) -> Option<Link> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(Link {
        index: m.header.index,
        name,
    })
}

fn addr_from_message(m: &AddressMessage) -> Option<InterfaceAddr> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(v)) => local = Some(*v),
            AddressAttribute::Address(IpAddr::V4(v)) => address = Some(*v),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address on point-to-point links, where
    // IFA_ADDRESS is the peer's; elsewhere both are the same.
    Some(InterfaceAddr {
        index: m.header.index,
        addr: local.or(address)?,
        secondary: m.header.flags.contains(AddressHeaderFlags::Secondary),
    })
}

/// The output interfaces of `m` if it is an IPv4 default route of the main
/// table: RTA_OIF, and those of the nexthops of a multipath route.
fn default_route_oifs(m: &RouteMessage) -> Vec<u32> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if m.header.address_family != AddressFamily::Inet
        || m.header.destination_prefix_length != 0
        || table != u32::from(RouteHeader::RT_TABLE_MAIN)
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => out.push(*i),
            RouteAttribute::MultiPath(hops) => out.extend(hops.iter().map(|h| h.interface_index)),
            _ => {}
        }
    }
    out
}

/// All interfaces of the current network namespace.
pub fn list_links() -> Result<Vec<Link>, NetlinkError> {
    let mut out = Vec::new();
    let request = RouteNetlinkMessage::GetLink(LinkMessage::default()); // AF_UNSPEC
    dump("list links", request, |m| {
        if let RouteNetlinkMessage::NewLink(l) = m {
            out.extend(link_from_message(&l));
        }
    })?;
    out.sort();
    Ok(out)
}

/// All IPv4 addresses of the current network namespace.
pub fn list_ipv4_addrs() -> Result<Vec<InterfaceAddr>, NetlinkError> {
    let mut out = Vec::new();
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet;
    dump(
        "list addresses",
        RouteNetlinkMessage::GetAddress(request),
        |m| {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                out.extend(addr_from_message(&a));
            }
        },
    )?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Interface indexes that carry an IPv4 default route (main table): the
/// uplink when none is given on the command line.
pub fn default_route_interfaces() -> Result<Vec<u32>, NetlinkError> {
    let mut out = Vec::new();
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    dump("list routes", RouteNetlinkMessage::GetRoute(request), |m| {
        if let RouteNetlinkMessage::NewRoute(r) = m {
            out.extend(default_route_oifs(&r));
        }
    })?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// A socket subscribed to link, IPv4 address and IPv4 route changes.
pub struct ChangeSubscription {
    sock: Socket,
}

impl ChangeSubscription {
    pub fn new() -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: open_socket("subscribe to changes", CHANGE_GROUPS)?,
        })
    }

    /// Blocks until the kernel reports a change (or the socket overflowed,
    /// which also means "something changed": the caller re-lists anyway),
    /// then drains what else is queued so that a burst wakes the caller once.
    pub fn wait(&self) -> Result<(), NetlinkError> {
        let mut buf = Vec::with_capacity(RECV_BUF);
        match self.sock.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(source) => {
                return Err(NetlinkError::Io {
                    op: "wait for changes",
                    source,
                })
            }
        }
        for _ in 0..DRAIN_MAX {
            buf.clear();
            match self.sock.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Empty (EAGAIN), or an error the next wait() reports.
                Err(_) => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteNextHop;

    use crate::dataplane::test_support::rtattr;

    /// A netlink message of `msg_type` around `payload`.
    fn nlmsg(msg_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&msg_type.to_ne_bytes());
        v.extend_from_slice(&[0; 10]); // flags, seq, pid
        v.extend_from_slice(payload);
        v
    }

    fn link_message(index: u32, name: Option<&str>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Mtu(1500));
        m.attributes
            .extend(name.map(|n| LinkAttribute::IfName(n.into())));
        m
    }

    fn addr_message(
        family: AddressFamily,
        index: u32,
        attrs: Vec<AddressAttribute>,
    ) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = family;
        m.header.index = index;
        m.attributes = attrs;
        m
    }

    fn route_message(prefix: u8, table: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix;
        m.header.table = table;
        m.attributes = attrs;
        m
    }

    fn hop(index: u32) -> RouteNextHop {
        let mut h = RouteNextHop::default();
        h.interface_index = index;
        h
    }

    const MAIN: u8 = RouteHeader::RT_TABLE_MAIN;

    #[test]
    fn requests_are_the_classic_dump_requests() {
        let req = dump_request(RouteNetlinkMessage::GetLink(LinkMessage::default()), 1);
        let mut want = nlmsg(libc::RTM_GETLINK, &[0; 16]);
        want[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        want[8..12].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(req, want);

        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        let req = dump_request(RouteNetlinkMessage::GetAddress(a), 1);
        assert_eq!(req.len(), NLMSG_HDRLEN + 8);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), libc::RTM_GETADDR);
        assert_eq!(&req[16..], &[libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0]);

        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        let req = dump_request(RouteNetlinkMessage::GetRoute(r), 1);
        assert_eq!(req.len(), NLMSG_HDRLEN + 12);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), libc::RTM_GETROUTE);
        let mut rtmsg = [0u8; 12];
        rtmsg[0] = libc::AF_INET as u8;
        assert_eq!(&req[16..], &rtmsg);
    }

    #[test]
    fn link_needs_a_name() {
        assert_eq!(
            link_from_message(&link_message(7, Some("veth1234"))),
            Some(Link {
                index: 7,
                name: "veth1234".into()
            })
        );
        assert_eq!(link_from_message(&link_message(7, None)), None);
    }

    #[test]
    fn prefers_ifa_local_and_skips_other_families() {
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        // Point-to-point: IFA_ADDRESS is the peer.
        let attrs = vec![
            AddressAttribute::Address(v4(10, 0, 0, 2)),
            AddressAttribute::Local(v4(10, 0, 0, 1)),
        ];
        let want = InterfaceAddr {
            index: 3,
            addr: Ipv4Addr::new(10, 0, 0, 1),
            secondary: false,
        };
        let mut m = addr_message(AddressFamily::Inet, 3, attrs.clone());
        assert_eq!(addr_from_message(&m), Some(want));
        m.attributes.reverse();
        assert_eq!(addr_from_message(&m), Some(want));
        // Only IFA_ADDRESS.
        let only = addr_message(
            AddressFamily::Inet,
            3,
            vec![AddressAttribute::Address(v4(10, 0, 0, 2))],
        );
        assert_eq!(
            addr_from_message(&only).map(|a| a.addr),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        // Neither, or another family.
        assert_eq!(
            addr_from_message(&addr_message(AddressFamily::Inet, 3, vec![])),
            None
        );
        assert_eq!(
            addr_from_message(&addr_message(AddressFamily::Inet6, 3, attrs)),
            None
        );
    }

    #[test]
    fn flags_secondary_addresses() {
        let mut m = addr_message(
            AddressFamily::Inet,
            2,
            vec![AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                192, 0, 2, 9,
            )))],
        );
        m.header.flags = AddressHeaderFlags::Secondary | AddressHeaderFlags::Permanent;
        assert!(addr_from_message(&m).unwrap().secondary);
        m.header.flags = AddressHeaderFlags::Permanent;
        assert!(!addr_from_message(&m).unwrap().secondary);
    }

    #[test]
    fn default_routes_of_the_main_table_only() {
        let oif = |prefix, table, i| {
            default_route_oifs(&route_message(prefix, table, vec![RouteAttribute::Oif(i)]))
        };
        assert_eq!(oif(0, MAIN, 4), vec![4]);
        assert_eq!(oif(24, MAIN, 4), Vec::<u32>::new());
        assert_eq!(oif(0, 255, 4), Vec::<u32>::new()); // local table
        assert_eq!(oif(0, 100, 4), Vec::<u32>::new());
        // RTA_TABLE says which table when the header cannot (ids over 255).
        let big = route_message(
            0,
            252,
            vec![RouteAttribute::Table(1000), RouteAttribute::Oif(4)],
        );
        assert_eq!(default_route_oifs(&big), Vec::<u32>::new());
        let main = route_message(
            0,
            MAIN,
            vec![RouteAttribute::Table(254), RouteAttribute::Oif(4)],
        );
        assert_eq!(default_route_oifs(&main), vec![4]);
        // IPv6 never.
        let mut v6 = route_message(0, MAIN, vec![RouteAttribute::Oif(4)]);
        v6.header.address_family = AddressFamily::Inet6;
        assert_eq!(default_route_oifs(&v6), Vec::<u32>::new());
        // Blackhole: no interface.
        assert_eq!(
            default_route_oifs(&route_message(0, MAIN, vec![])),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn multipath_default_route_gives_every_nexthop() {
        let m = route_message(
            0,
            MAIN,
            vec![RouteAttribute::MultiPath(vec![hop(2), hop(5)])],
        );
        assert_eq!(default_route_oifs(&m), vec![2, 5]);
    }

    #[test]
    fn decodes_done_errors_and_acks() {
        assert_eq!(decode(&nlmsg(NLMSG_DONE, &[0; 4])).unwrap(), Reply::Done);
        assert_eq!(decode(&nlmsg(NLMSG_DONE, &[])).unwrap(), Reply::Done);
        let mut err = (-libc::EPERM).to_ne_bytes().to_vec();
        err.extend(nlmsg(libc::RTM_GETLINK, &[0; 16])); // the request echoed
        assert_eq!(
            decode(&nlmsg(NLMSG_ERROR, &err)).unwrap(),
            Reply::Failed(libc::EPERM)
        );
        assert_eq!(decode(&nlmsg(NLMSG_ERROR, &[0; 20])).unwrap(), Reply::Skip);
        assert!(decode(&nlmsg(NLMSG_ERROR, &[0; 2])).is_err());
        assert!(decode(&[0; 8]).is_err());
    }

    #[test]
    fn decodes_kernel_link_and_address_bytes() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&7u32.to_ne_bytes());
        p.extend(rtattr(libc::IFLA_MTU, &1500u32.to_ne_bytes()));
        p.extend(rtattr(libc::IFLA_IFNAME, b"veth1234\0"));
        let Reply::Message(RouteNetlinkMessage::NewLink(l)) =
            decode(&nlmsg(RTM_NEWLINK, &p)).unwrap()
        else {
            panic!("not a link");
        };
        assert_eq!(link_from_message(&l).unwrap().name, "veth1234");

        let mut p = vec![libc::AF_INET as u8, 32, libc::IFA_F_SECONDARY as u8, 0];
        p.extend_from_slice(&3u32.to_ne_bytes());
        p.extend(rtattr(libc::IFA_ADDRESS, &[10, 0, 0, 2]));
        p.extend(rtattr(libc::IFA_LOCAL, &[10, 0, 0, 1]));
        let Reply::Message(RouteNetlinkMessage::NewAddress(a)) =
            decode(&nlmsg(RTM_NEWADDR, &p)).unwrap()
        else {
            panic!("not an address");
        };
        assert_eq!(
            addr_from_message(&a),
            Some(InterfaceAddr {
                index: 3,
                addr: Ipv4Addr::new(10, 0, 0, 1),
                secondary: true,
            })
        );
    }

    #[test]
    fn an_attribute_the_crate_rejects_does_not_hide_the_link() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&9u32.to_ne_bytes());
        p.extend(rtattr(libc::IFLA_MTU, &[1, 2])); // u32 expected
        p.extend(rtattr(libc::IFLA_IFNAME, b"eth9\0"));
        let msg = nlmsg(RTM_NEWLINK, &p);
        assert!(NetlinkMessage::<RouteNetlinkMessage>::deserialize(&msg).is_err());
        let Reply::Message(RouteNetlinkMessage::NewLink(l)) = decode(&msg).unwrap() else {
            panic!("not a link");
        };
        assert_eq!(
            link_from_message(&l),
            Some(Link {
                index: 9,
                name: "eth9".into()
            })
        );
    }

    #[test]
    fn truncated_messages_do_not_panic() {
        let mut p = vec![0u8; 16];
        p.extend_from_slice(&[200, 0, 3, 0, b'e']); // rtattr longer than the message
        let Reply::Message(RouteNetlinkMessage::NewLink(l)) =
            decode(&nlmsg(RTM_NEWLINK, &p)).unwrap()
        else {
            panic!("not a link");
        };
        assert_eq!(link_from_message(&l), None);
        assert_eq!(decode(&nlmsg(RTM_NEWADDR, &[2, 0])).unwrap(), Reply::Skip);
        assert_eq!(
            decode(&nlmsg(RTM_NEWROUTE, &[2, 0, 0])).unwrap(),
            Reply::Skip
        );
    }

    /// Reads the namespace the test runs in (no privilege needed, nothing
    /// changed): loopback is always index 1.
    #[test]
    fn live_dumps_of_this_namespace() {
        let links = list_links().expect("list links");
        assert!(links.contains(&Link {
            index: 1,
            name: "lo".into()
        }));
        let addrs = list_ipv4_addrs().expect("list addresses");
        assert!(addrs
            .iter()
            .all(|a| links.iter().any(|l| l.index == a.index)));
        // A namespace whose lo was never brought up has no address on it.
        if addrs.iter().any(|a| a.index == 1) {
            assert!(addrs.contains(&InterfaceAddr {
                index: 1,
                addr: Ipv4Addr::LOCALHOST,
                secondary: false,
            }));
        }
        let uplinks = default_route_interfaces().expect("list routes");
        assert!(uplinks.iter().all(|i| links.iter().any(|l| l.index == *i)));
        ChangeSubscription::new().expect("subscribe");
    }

    use crate::dataplane::test_support::in_new_netns;

    fn ip(args: &str) {
        let st = std::process::Command::new("ip")
            .args(args.split(' '))
            .status()
            .expect("run ip");
        assert!(st.success(), "ip {args}: {st}");
    }

    fn operstate_up(dev: &str) {
        for _ in 0..100 {
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", "dev", dev])
                .output()
                .expect("run ip");
            if String::from_utf8_lossy(&out.stdout).contains(" state UP ") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{dev} did not come up");
    }

    /// Whether a notification is queued on the subscription (takes it).
    fn pending(sub: &ChangeSubscription) -> bool {
        let mut buf = Vec::with_capacity(RECV_BUF);
        match sub.sock.recv(&mut buf, libc::MSG_DONTWAIT) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Dumps and notifications of a namespace the test makes: veth ends,
    /// a secondary and a point-to-point address, a multipath default route,
    /// a default route in another table.
    #[test]
    fn live_private_namespace() {
        in_new_netns("live_private_namespace", || {
            // A new namespace: lo, down, so no address and no route.
            let lo = Link {
                index: 1,
                name: "lo".into(),
            };
            assert_eq!(list_links().unwrap(), vec![lo.clone()]);
            assert_eq!(list_ipv4_addrs().unwrap(), vec![]);
            assert_eq!(default_route_interfaces().unwrap(), Vec::<u32>::new());

            ip("link add d0 type veth peer name d1");
            ip("link set d0 up");
            ip("link set d1 up");
            // The carrier comes up later (linkwatch): let that settle before
            // subscribing, so that only the changes below are queued.
            operstate_up("d0");
            operstate_up("d1");
            let sub = ChangeSubscription::new().unwrap();
            assert!(!pending(&sub));
            ip("addr add 10.0.0.1/24 dev d0");
            ip("addr add 10.0.0.5/24 dev d0");
            ip("addr add 10.0.1.1/24 dev d1");
            ip("addr add 10.9.0.1 peer 10.9.0.2 dev d1");
            ip("route add default nexthop via 10.0.0.2 dev d0 nexthop via 10.0.1.2 dev d1");
            ip("route add default via 10.0.1.2 dev d1 table 100");
            // Queued already: returns at once, and takes the whole burst.
            sub.wait().unwrap();
            assert!(!pending(&sub));

            let links = list_links().unwrap();
            let index = |name: &str| links.iter().find(|l| l.name == name).unwrap().index;
            let (d0, d1) = (index("d0"), index("d1"));
            assert_eq!(links.len(), 3);
            assert!(links.contains(&lo));
            let addr = |index, a: [u8; 4], secondary| InterfaceAddr {
                index,
                addr: Ipv4Addr::from(a),
                secondary,
            };
            let mut want = vec![
                addr(d0, [10, 0, 0, 1], false),
                addr(d0, [10, 0, 0, 5], true),
                addr(d1, [10, 0, 1, 1], false),
                addr(d1, [10, 9, 0, 1], false), // IFA_LOCAL, not the peer
            ];
            want.sort();
            assert_eq!(list_ipv4_addrs().unwrap(), want);
            let mut both = vec![d0, d1];
            both.sort();
            assert_eq!(default_route_interfaces().unwrap(), both);

            // A route change alone is reported; table 100 does not count.
            ip("route del default table main");
            assert!(pending(&sub));
            assert_eq!(default_route_interfaces().unwrap(), Vec::<u32>::new());
            ip("route add default via 10.0.0.2 dev d0");
            assert_eq!(default_route_interfaces().unwrap(), vec![d0]);
            sub.wait().unwrap();
            assert!(!pending(&sub));

            // wait() blocks until a change comes.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(sub.wait().map_err(|e| e.to_string())));
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(
                rx.try_recv().is_err(),
                "wait() returned with nothing queued"
            );
            ip("link set d1 down");
            let woke = rx.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(woke, Ok(Ok(())));
        });
    }
}
