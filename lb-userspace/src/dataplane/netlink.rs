//! A small rtnetlink client: list links and IPv4 addresses of the current
//! network namespace, and a subscription that wakes the agent when either
//! changes.
//!
//! Netlink rather than /sys/class/net: the agent may run with the network
//! namespace of a node but the mount namespace of the host (as an emulated
//! node does, and as a hostNetwork pod does with a host /sys), and sysfs shows
//! the interfaces of whoever mounted it. Netlink sockets always speak for the
//! caller's network namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const RTM_GETADDR: u16 = 22;
const RTM_NEWADDR: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const IFINFOMSG_LEN: usize = 16;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWROUTE: u16 = 24;
const RTMSG_LEN: usize = 12;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const IFADDRMSG_LEN: usize = 8;
const IFA_F_SECONDARY: u8 = 0x01;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn open_socket(groups: u32) -> Result<OwnedFd, NetlinkError> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(NetlinkError::Io {
            op: "socket",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    // SAFETY: sa is a valid sockaddr_nl of the size we pass.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(NetlinkError::Io {
            op: "bind",
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends a dump request and calls `each(msg_type, payload)` for every answer.
fn dump(
    op: &'static str,
    msg_type: u16,
    family_payload: &[u8],
    mut each: impl FnMut(u16, &[u8]),
) -> Result<(), NetlinkError> {
    let fd = open_socket(0)?;
    let len = NLMSG_HDR_LEN + family_payload.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&msg_type.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: kernel fills in
    req.extend_from_slice(family_payload);
    // SAFETY: req is valid for reads of req.len() bytes.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(NetlinkError::Io {
            op,
            source: io::Error::last_os_error(),
        });
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&fd, &mut buf).map_err(|source| NetlinkError::Io { op, source })?;
        let mut off = 0;
        while off + NLMSG_HDR_LEN <= n {
            let h = &buf[off..];
            let mlen = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let mtype = u16::from_ne_bytes([h[4], h[5]]);
            if mlen < NLMSG_HDR_LEN || off + mlen > n {
                return Err(NetlinkError::Malformed { op });
            }
            match mtype {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = h
                        .get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or(NetlinkError::Malformed { op })?;
                    if errno != 0 {
                        return Err(NetlinkError::Kernel { op, errno: -errno });
                    }
                }
                _ => each(mtype, &h[NLMSG_HDR_LEN..mlen]),
            }
            off += align4(mlen);
        }
    }
}

/// Iterates the rtattrs in `data`: (type, payload).
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((ty, payload))
    })
}

/// Parses the payload of an RTM_NEWLINK message.
fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let name = attrs(payload.get(IFINFOMSG_LEN..)?)
        .find(|(t, _)| *t == IFLA_IFNAME)
        .map(|(_, p)| {
            let end = p.iter().position(|b| *b == 0).unwrap_or(p.len());
            String::from_utf8_lossy(&p[..end]).into_owned()
        })?;
    Some(Link { index, name })
}

/// Parses the payload of an RTM_NEWADDR message (IPv4 only).
fn parse_addr(payload: &[u8]) -> Option<InterfaceAddr> {
    if *payload.first()? != libc::AF_INET as u8 {
        return None;
    }
    let secondary = payload.get(2)? & IFA_F_SECONDARY != 0;
    let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let mut local = None;
    let mut address = None;
    for (t, p) in attrs(payload.get(IFADDRMSG_LEN..)?) {
        let a: Option<[u8; 4]> = p.try_into().ok();
        match t {
            IFA_LOCAL => local = a,
            IFA_ADDRESS => address = a,
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address on point-to-point links.
    let octets = local.or(address)?;
    Some(InterfaceAddr {
        index,
        addr: Ipv4Addr::from(octets),
        secondary,
    })
}

/// All interfaces of the current network namespace.
pub fn list_links() -> Result<Vec<Link>, NetlinkError> {
    let mut out = Vec::new();
    let ifinfo = [0u8; IFINFOMSG_LEN]; // AF_UNSPEC
    dump("list links", RTM_GETLINK, &ifinfo, |t, p| {
        if t == RTM_NEWLINK {
            if let Some(l) = parse_link(p) {
                out.push(l);
            }
        }
    })?;
    out.sort();
    Ok(out)
}

/// All IPv4 addresses of the current network namespace.
pub fn list_ipv4_addrs() -> Result<Vec<InterfaceAddr>, NetlinkError> {
    let mut out = Vec::new();
    let mut ifaddr = [0u8; IFADDRMSG_LEN];
    ifaddr[0] = libc::AF_INET as u8;
    dump("list addresses", RTM_GETADDR, &ifaddr, |t, p| {
        if t == RTM_NEWADDR {
            if let Some(a) = parse_addr(p) {
                out.push(a);
            }
        }
    })?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Interface indexes that carry an IPv4 default route (main table): the
/// uplink when none is given on the command line.
pub fn default_route_interfaces() -> Result<Vec<u32>, NetlinkError> {
    let mut out = Vec::new();
    let mut rtmsg = [0u8; RTMSG_LEN];
    rtmsg[0] = libc::AF_INET as u8;
    dump("list routes", RTM_GETROUTE, &rtmsg, |t, p| {
        if t != RTM_NEWROUTE || p.len() < RTMSG_LEN {
            return;
        }
        let (dst_len, table) = (p[1], p[4]);
        if dst_len != 0 || table != RT_TABLE_MAIN {
            return;
        }
        for (ty, payload) in attrs(&p[RTMSG_LEN..]) {
            if ty == RTA_OIF {
                if let Ok(b) = <[u8; 4]>::try_from(payload) {
                    out.push(u32::from_ne_bytes(b));
                }
            }
        }
    })?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// A socket subscribed to link and IPv4 address changes.
pub struct ChangeSubscription {
    fd: OwnedFd,
}

impl ChangeSubscription {
    pub fn new() -> Result<Self, NetlinkError> {
        Ok(Self {
            fd: open_socket(RTMGRP_LINK | RTMGRP_IPV4_IFADDR)?,
        })
    }

    /// Blocks until the kernel reports a change (or the socket overflowed,
    /// which also means "something changed": the caller re-lists anyway).
    pub fn wait(&self) -> Result<(), NetlinkError> {
        let mut buf = vec![0u8; 64 * 1024];
        match recv(&self.fd, &mut buf) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(source) => Err(NetlinkError::Io {
                op: "wait for changes",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtattr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn parses_link_name_and_index() {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p[4..8].copy_from_slice(&7u32.to_ne_bytes());
        p.extend(rtattr(4, &1500u32.to_ne_bytes())); // IFLA_MTU, skipped
        p.extend(rtattr(IFLA_IFNAME, b"veth1234\0"));
        assert_eq!(
            parse_link(&p),
            Some(Link {
                index: 7,
                name: "veth1234".into()
            })
        );
    }

    #[test]
    fn prefers_ifa_local_and_skips_other_families() {
        let mut p = vec![0u8; IFADDRMSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[4..8].copy_from_slice(&3u32.to_ne_bytes());
        p.extend(rtattr(IFA_ADDRESS, &[10, 0, 0, 2]));
        p.extend(rtattr(IFA_LOCAL, &[10, 0, 0, 1]));
        assert_eq!(
            parse_addr(&p),
            Some(InterfaceAddr {
                index: 3,
                addr: Ipv4Addr::new(10, 0, 0, 1),
                secondary: false,
            })
        );
        p[0] = libc::AF_INET6 as u8;
        assert_eq!(parse_addr(&p), None);
    }

    #[test]
    fn truncated_attributes_do_not_panic() {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p.extend_from_slice(&[200, 0, 3, 0, b'e']);
        assert_eq!(parse_link(&p), None);
        assert_eq!(parse_addr(&[2, 0]), None);
    }
}
