//! E4 for the node's own connected UDP sockets (F2).
//!
//! Socket-level load balancing rewrites a connected socket once, at
//! connect(). A connected UDP socket (a resolver's, a metrics agent's) whose
//! backend then leaves the Service would keep sending to that address for
//! ever: the socket-LB form of the stale-conntrack DNS bug. kube-proxy's
//! answer is a conntrack flush, which has nothing to flush here; Cilium's,
//! which lb follows, is to destroy such sockets. After a plan that removed
//! or changed backends, the agent notes the endpoints (address, port) that
//! left a service port ([`SocketReaper::note_left`]); it then lists the
//! node's connected IPv4 UDP sockets with netlink sock_diag (one dump), and
//! for those connected to such an endpoint only, looks the socket up in
//! `LB_SOCK_REVNAT` by (socket cookie, peer) and sends `SOCK_DESTROY`
//! (CONFIG_INET_DIAG_DESTROY) when its backend is no longer an endpoint of
//! the service port it was sent to. The cost is one dump plus one map lookup
//! per socket connected to a departed endpoint, whatever else the node runs
//! (a QUIC server's thousands of connected sockets cost no lookup). The
//! departed endpoints are kept for [`RETAIN`] and swept again on the
//! conntrack-GC tick, which catches a connect() that raced the plan. The kernel aborts the socket: a blocked or the next recv()
//! fails with ECONNABORTED, the socket is disconnected (send() without an
//! address fails with EDESTADDRREQ), and the application's reconnect goes
//! through connect4 again, to a live backend. Unconnected UDP sockets need
//! nothing: every sendto() is translated anew.
//!
//! The agent runs in the node's network namespace, and a sock_diag socket
//! sees the sockets of its own namespace: exactly the ones the cgroup hooks
//! translate (pods' sockets never have an `LB_SOCK_REVNAT` entry).
//!
//! TCP sockets are left alone, as kube-proxy leaves established TCP
//! connections to a removed endpoint alone: a terminating pod may still
//! finish its requests, and a pod that is gone ends its connections by itself
//! (a reset, or a timeout). New connections go to live backends.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{map_names, BackendValue, SockRevNatKey, SockRevNatValue};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use super::maps::MapsError;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// struct inet_diag_sockid.
const SOCKID_LEN: usize = 48;
/// struct inet_diag_req_v2.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// struct inet_diag_msg.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// A connected UDP socket's sk_state.
const TCP_ESTABLISHED: u32 = 1;
const RECV_BUF: usize = 64 * 1024;

/// An IPv4 UDP socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// The interface it is bound to (0: none).
    pub ifindex: u32,
    /// The socket cookie (what `bpf_get_socket_cookie` returns).
    pub cookie: u64,
}

impl DiagSocket {
    /// Its `LB_SOCK_REVNAT` key: (cookie, the peer it is connected to).
    pub fn revnat_key(&self) -> SockRevNatKey {
        SockRevNatKey {
            cookie: self.cookie,
            addr: lb_common::ipv4_to_net(self.dst.ip().octets()),
            port: lb_common::port_to_net(self.dst.port()),
            _pad: 0,
        }
    }
}

/// struct inet_diag_sockid for `s` (all zero for a dump).
fn encode_sockid(s: Option<&DiagSocket>) -> [u8; SOCKID_LEN] {
    let mut id = [0u8; SOCKID_LEN];
    let Some(s) = s else {
        // INET_DIAG_NOCOOKIE: match any cookie.
        id[40..48].copy_from_slice(&[0xff; 8]);
        return id;
    };
    id[0..2].copy_from_slice(&s.src.port().to_be_bytes());
    id[2..4].copy_from_slice(&s.dst.port().to_be_bytes());
    id[4..8].copy_from_slice(&s.src.ip().octets());
    id[20..24].copy_from_slice(&s.dst.ip().octets());
    id[36..40].copy_from_slice(&s.ifindex.to_ne_bytes());
    id[40..44].copy_from_slice(&(s.cookie as u32).to_ne_bytes());
    id[44..48].copy_from_slice(&((s.cookie >> 32) as u32).to_ne_bytes());
    id
}

/// A netlink message: nlmsghdr + inet_diag_req_v2 (AF_INET, UDP).
fn request(msg_type: u16, flags: u16, seq: u32, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&msg_type.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    b.push(libc::AF_INET as u8); // sdiag_family
    b.push(libc::IPPROTO_UDP as u8); // sdiag_protocol
    b.push(0); // idiag_ext
    b.push(0); // pad
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(id);
    b
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn ip_at(b: &[u8], off: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

fn port_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

/// (state, socket) of a struct inet_diag_msg.
fn decode_msg(p: &[u8]) -> Option<(u8, DiagSocket)> {
    if p.len() < MSG_LEN || p[0] != libc::AF_INET as u8 {
        return None;
    }
    let id = &p[4..4 + SOCKID_LEN];
    let cookie = u64::from(u32_at(id, 40)?) | (u64::from(u32_at(id, 44)?) << 32);
    Some((
        p[1],
        DiagSocket {
            src: SocketAddrV4::new(ip_at(id, 4)?, port_at(id, 0)?),
            dst: SocketAddrV4::new(ip_at(id, 20)?, port_at(id, 2)?),
            ifindex: u32_at(id, 36)?,
            cookie,
        },
    ))
}

/// One message of a reply: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let len = u32_at(buf, off)? as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return None;
        }
        let t = u16::from_ne_bytes(buf.get(off + 4..off + 6)?.try_into().ok()?);
        let payload = &buf[off + NLMSG_HDRLEN..off + len];
        off += (len + 3) & !3;
        Some((t, payload))
    })
}

/// The errno of an NLMSG_ERROR payload (0: an ack).
fn nlmsg_errno(payload: &[u8]) -> i32 {
    payload
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map_or(libc::EINVAL, |b| -i32::from_ne_bytes(b))
}

fn open() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    Ok(s)
}

/// The connected IPv4 UDP sockets of this network namespace.
pub fn connected_udp4() -> io::Result<Vec<DiagSocket>> {
    let sock = open()?;
    let req = request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        1 << TCP_ESTABLISHED,
        &encode_sockid(None),
    );
    sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(RECV_BUF);
    loop {
        buf.clear();
        let n = sock.recv(&mut buf, libc::MSG_TRUNC)?;
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sock_diag: truncated reply",
            ));
        }
        for (t, payload) in messages(&buf[..n]) {
            match t {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => match nlmsg_errno(payload) {
                    0 => {}
                    e => return Err(io::Error::from_raw_os_error(e)),
                },
                SOCK_DIAG_BY_FAMILY => {
                    if let Some((state, s)) = decode_msg(payload) {
                        if u32::from(state) == TCP_ESTABLISHED {
                            out.push(s);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Destroys one UDP socket (SOCK_DESTROY; the cookie must match, so a new
/// socket with the same addresses is never hit). `Ok(false)`: it was gone.
pub fn destroy_udp4(s: &DiagSocket) -> io::Result<bool> {
    let sock = open()?;
    let req = request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        !0,
        &encode_sockid(Some(s)),
    );
    sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
    let mut buf = Vec::with_capacity(RECV_BUF);
    let n = sock.recv(&mut buf, 0)?;
    for (t, payload) in messages(&buf[..n.min(buf.len())]) {
        if t == NLMSG_ERROR {
            return match nlmsg_errno(payload) {
                0 => Ok(true),
                libc::ENOENT => Ok(false),
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "sock_diag: no answer to SOCK_DESTROY",
    ))
}

/// Whether the backend a socket was sent to (`key`, `value` of its
/// `LB_SOCK_REVNAT` entry) is no longer an endpoint of that service port:
/// its id is gone, names another address (ids are reused), or is in neither
/// of the port's sets. `backends` is `LB_BACKENDS` as the agent wrote it.
pub fn backend_gone(
    key: &SockRevNatKey,
    value: &SockRevNatValue,
    backends: &BTreeMap<u32, BackendValue>,
) -> bool {
    match backends.get(&value.backend_id) {
        Some(b) => b.addr != key.addr || b.port != key.port || !b.member_of(value.service_id),
        None => true,
    }
}

/// How long a departed endpoint is swept for (the plan's sweep, then the
/// GC ticks in this window).
pub const RETAIN: Duration = Duration::from_secs(120);

/// The endpoints (address, port, network order) among `touched` (backend
/// ids a plan deleted or rewrote, with their values before it) that are no
/// longer an endpoint of their service port in `after` (`LB_BACKENDS` after
/// the plan): the id is gone, names another address, or left both sets.
pub fn endpoints_left(
    touched: &[(u32, BackendValue)],
    after: &BTreeMap<u32, BackendValue>,
) -> Vec<(u32, u16)> {
    let mut out: Vec<(u32, u16)> = touched
        .iter()
        .filter(|(_, before)| before.member_of(before.service_id))
        .filter(|(id, before)| match after.get(id) {
            Some(now) => {
                now.addr != before.addr
                    || now.port != before.port
                    || !now.member_of(before.service_id)
            }
            None => true,
        })
        .map(|(_, before)| (before.addr, before.port))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What [`SocketReaper::destroy_stale_udp`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Connected UDP sockets connected to a departed endpoint.
    pub checked: usize,
    /// Of those, sent to a backend that is gone, and destroyed.
    pub destroyed: usize,
}

/// Finds and destroys the node's connected UDP sockets whose backend left.
pub struct SocketReaper {
    revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    /// Endpoints that left a service port, and when.
    departed: BTreeMap<(u32, u16), Instant>,
}

impl SocketReaper {
    /// Opens `LB_SOCK_REVNAT` pinned under `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let name = map_names::SOCK_REVNAT;
        let path = dir.join(name);
        let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let map = Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })?;
        let revnat = HashMap::try_from(map).map_err(|source| MapsError::Map { name, source })?;
        Ok(Self {
            revnat,
            departed: BTreeMap::new(),
        })
    }

    /// Notes the endpoints a plan took out of their service port (see
    /// [`endpoints_left`]); returns whether there were any.
    pub fn note_left(
        &mut self,
        touched: &[(u32, BackendValue)],
        after: &BTreeMap<u32, BackendValue>,
    ) -> bool {
        let now = Instant::now();
        let left = endpoints_left(touched, after);
        for e in &left {
            self.departed.insert(*e, now);
        }
        !left.is_empty()
    }

    /// Destroys every connected UDP socket of this network namespace that
    /// socket LB sent to an endpoint that departed within [`RETAIN`] and that
    /// [`backend_gone`] says is gone for that socket's service port. Without
    /// departed endpoints it does nothing (no dump).
    pub fn destroy_stale_udp(
        &mut self,
        backends: &BTreeMap<u32, BackendValue>,
    ) -> io::Result<Reaped> {
        self.departed.retain(|_, at| at.elapsed() < RETAIN);
        let mut r = Reaped::default();
        if self.departed.is_empty() {
            return Ok(r);
        }
        for s in connected_udp4()? {
            let key = s.revnat_key();
            if !self.departed.contains_key(&(key.addr, key.port)) {
                continue;
            }
            r.checked += 1;
            let value = match self.revnat.get(&key, 0) {
                Ok(v) => v,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(io::Error::other(e)),
            };
            if backend_gone(&key, &value, backends) && destroy_udp4(&s)? {
                tracing::info!(
                    socket = %s.src,
                    backend = %s.dst,
                    service_id = value.service_id,
                    "destroyed a connected UDP socket whose backend left the service (E4); its next receive fails and a reconnect picks a live backend"
                );
                r.destroyed += 1;
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{backend_flags, ipv4_to_net, port_to_net};

    fn sock() -> DiagSocket {
        DiagSocket {
            src: "198.18.0.11:40000".parse().unwrap(),
            dst: "10.244.2.3:53".parse().unwrap(),
            ifindex: 7,
            cookie: 0x1122_3344_5566_7788,
        }
    }

    #[test]
    fn sockid_round_trips_through_a_diag_message() {
        let s = sock();
        let mut msg = vec![libc::AF_INET as u8, TCP_ESTABLISHED as u8, 0, 0];
        msg.extend_from_slice(&encode_sockid(Some(&s)));
        msg.extend_from_slice(&[0u8; 20]);
        assert_eq!(decode_msg(&msg), Some((TCP_ESTABLISHED as u8, s)));
        assert_eq!(decode_msg(&msg[..MSG_LEN - 1]), None);
        let dump = encode_sockid(None);
        assert_eq!(&dump[40..], &[0xff; 8], "a dump matches any cookie");
    }

    #[test]
    fn requests_are_inet_diag_req_v2() {
        let r = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            !0,
            &encode_sockid(Some(&sock())),
        );
        assert_eq!(r.len(), 72);
        assert_eq!(u32_at(&r, 0), Some(72));
        assert_eq!(&r[4..6], &SOCK_DESTROY.to_ne_bytes());
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(r[17], libc::IPPROTO_UDP as u8);
        let ms: Vec<_> = messages(&r).collect();
        assert_eq!(ms.len(), 1);
        assert_eq!(ms[0].1.len(), REQ_LEN);
    }

    #[test]
    fn the_revnat_key_is_the_peer_in_network_order() {
        let k = sock().revnat_key();
        assert_eq!(k.addr, ipv4_to_net([10, 244, 2, 3]));
        assert_eq!(k.port, port_to_net(53));
        assert_eq!(k.cookie, 0x1122_3344_5566_7788);
    }

    #[test]
    fn a_backend_is_gone_when_it_left_the_service_port() {
        let key = sock().revnat_key();
        let value = SockRevNatValue {
            addr: ipv4_to_net([10, 96, 0, 10]),
            port: port_to_net(53),
            proto: lb_common::PROTO_UDP,
            _pad: 0,
            service_id: 4,
            backend_id: 17,
        };
        let live = BackendValue {
            addr: key.addr,
            port: key.port,
            proto: lb_common::PROTO_UDP,
            flags: backend_flags::IN_CLUSTER_SET,
            service_id: 4,
        };
        let with = |b: BackendValue| BTreeMap::from([(17, b)]);
        assert!(!backend_gone(&key, &value, &with(live)));
        let local_only = BackendValue {
            flags: backend_flags::IN_LOCAL_SET | backend_flags::LOCAL,
            ..live
        };
        assert!(!backend_gone(&key, &value, &with(local_only)));
        assert!(backend_gone(&key, &value, &BTreeMap::new()), "id gone");
        let reused = BackendValue {
            addr: ipv4_to_net([10, 244, 1, 9]),
            ..live
        };
        assert!(backend_gone(&key, &value, &with(reused)), "id reused");
        let other_port = BackendValue {
            service_id: 5,
            ..live
        };
        assert!(backend_gone(&key, &value, &with(other_port)), "other port");
        let out_of_sets = BackendValue { flags: 0, ..live };
        assert!(backend_gone(&key, &value, &with(out_of_sets)), "no set");
    }

    #[test]
    fn endpoints_that_left_their_service_port() {
        let b = |last: u8, service_id: u32, flags: u8| BackendValue {
            addr: ipv4_to_net([10, 244, 1, last]),
            port: port_to_net(53),
            proto: lb_common::PROTO_UDP,
            flags,
            service_id,
        };
        let (cluster, local) = (backend_flags::IN_CLUSTER_SET, backend_flags::IN_LOCAL_SET);
        let touched = [
            (1, b(1, 7, cluster)), // deleted
            (2, b(2, 7, cluster)), // left the sets
            (3, b(3, 7, cluster)), // id reused for another address
            (4, b(4, 7, cluster)), // moved to the local set only: still in
            (5, b(5, 7, 0)),       // was in no set: nothing left
        ];
        let after = BTreeMap::from([
            (2, b(2, 7, 0)),
            (3, b(9, 7, cluster)),
            (4, b(4, 7, local)),
            (5, b(5, 7, 0)),
        ]);
        let addr = |last: u8| (ipv4_to_net([10, 244, 1, last]), port_to_net(53));
        let mut want = vec![addr(1), addr(2), addr(3)];
        want.sort_unstable();
        assert_eq!(endpoints_left(&touched, &after), want);
        assert!(endpoints_left(&[], &after).is_empty());
    }

    #[test]
    fn lists_connected_udp_sockets_of_this_namespace() {
        // Unprivileged: sock_diag dumps are open to everyone.
        let v4 = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound to 127.0.0.1"),
        };
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let (src, dst) = (
            v4(client.local_addr().unwrap()),
            v4(server.local_addr().unwrap()),
        );
        let Ok(all) = connected_udp4() else { return };
        assert!(
            all.iter()
                .any(|s| s.src == src && s.dst == dst && s.cookie != 0),
            "{all:?}"
        );
        assert!(
            !all.iter().any(|s| s.src == dst),
            "the unconnected server socket is not listed: {all:?}"
        );
    }
}
