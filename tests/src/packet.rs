//! Packet builders and checksum verification for BPF_PROG_TEST_RUN tests
//! (owned by the datapath work).
//!
//! Builders compute every checksum from scratch, so "the datapath's output
//! equals the builder's packet with the translated addresses" proves the
//! incremental checksum updates right. [`verify_checksums`] recomputes the
//! IPv4, TCP and UDP checksums of any frame independently.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Offsets in a frame with an option-less IPv4 header.
pub mod off {
    pub const IP: usize = super::ETH_HLEN;
    pub const IP_TTL: usize = IP + 8;
    pub const IP_CSUM: usize = IP + 10;
    pub const IP_SRC: usize = IP + 12;
    pub const IP_DST: usize = IP + 16;
    pub const L4: usize = IP + 20;
    pub const TCP_CSUM: usize = L4 + 16;
    pub const UDP_CSUM: usize = L4 + 6;
}

pub const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0b];

/// One's-complement sum of `data` (big-endian 16-bit words) added to `init`,
/// not folded.
fn sum16(data: &[u8], init: u32) -> u32 {
    let mut sum = init;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(&src);
    ph.extend_from_slice(&dst);
    ph.push(0);
    ph.push(proto);
    ph.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&ph, 0)
}

/// Checksum of a TCP/UDP segment `l4` (its checksum field must be zero).
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> u16 {
    !fold(sum16(l4, pseudo_header_sum(src, dst, proto, l4.len())))
}

/// The transport part of an IPv4 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        /// TCP options (padded to a multiple of 4 bytes by the builder).
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        /// Send with checksum 0 ("no checksum", RFC 768).
        zero_checksum: bool,
        payload: Vec<u8>,
    },
    /// ICMP echo request.
    IcmpEcho { id: u16, seq: u16, payload: Vec<u8> },
    /// An ICMP error (destination unreachable, time exceeded, ...): type,
    /// code, the 4-byte rest of the header, and the quoted datagram.
    IcmpError {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quote: Vec<u8>,
    },
    /// Anything else, bytes as given.
    Raw { proto: u8, bytes: Vec<u8> },
}

/// An Ethernet II + IPv4 frame description; [`Ipv4Frame::build`] makes the
/// bytes with correct checksums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset, host order (0x4000 = DF).
    pub frag: u16,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes makes a valid header).
    pub options: Vec<u8>,
    pub l4: L4,
}

impl Ipv4Frame {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            dst_mac: MAC_B,
            src_mac: MAC_A,
            src,
            dst,
            tos: 0,
            id: 0x1234,
            frag: 0x4000,
            ttl: 64,
            options: Vec::new(),
            l4,
        }
    }

    pub fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::IcmpEcho { .. } | L4::IcmpError { .. } => PROTO_ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    pub fn sport(&self) -> u16 {
        match &self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport,
            _ => 0,
        }
    }

    pub fn dport(&self) -> u16 {
        match &self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport,
            _ => 0,
        }
    }

    pub fn source(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src, self.sport())
    }

    pub fn destination(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.dport())
    }

    /// The same frame with another source address:port.
    pub fn with_source(mut self, s: SocketAddrV4) -> Self {
        self.src = *s.ip();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = s.port(),
            _ => {}
        }
        self
    }

    /// The same frame with another destination address:port.
    pub fn with_destination(mut self, d: SocketAddrV4) -> Self {
        self.dst = *d.ip();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = d.port(),
            _ => {}
        }
        self
    }

    pub fn with_tcp_flags(mut self, f: u8) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = f;
        }
        self
    }

    /// The same TCP segment with other sequence and acknowledgment numbers.
    pub fn with_seq_ack(mut self, s: u32, a: u32) -> Self {
        if let L4::Tcp { seq, ack, .. } = &mut self.l4 {
            *seq = s;
            *ack = a;
        }
        self
    }

    /// The same TCP/UDP packet with another payload.
    pub fn with_payload(mut self, p: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } => *payload = p.to_vec(),
            _ => {}
        }
        self
    }

    /// The same TCP segment with TCP options.
    pub fn with_tcp_options(mut self, o: &[u8]) -> Self {
        if let L4::Tcp { options, .. } = &mut self.l4 {
            *options = o.to_vec();
        }
        self
    }

    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn with_macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    /// The transport bytes with their checksum filled in.
    fn l4_bytes(&self) -> Vec<u8> {
        let (src, dst) = (self.src.octets(), self.dst.octets());
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
                options,
                payload,
            } => {
                let olen = options.len().div_ceil(4) * 4;
                let mut b = Vec::with_capacity(20 + olen + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&ack.to_be_bytes());
                b.push((((20 + olen) / 4) as u8) << 4);
                b.push(*flags);
                b.extend_from_slice(&window.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                b.extend_from_slice(options);
                b.resize(20 + olen, 0);
                b.extend_from_slice(payload);
                let c = l4_checksum(src, dst, PROTO_TCP, &b);
                b[16..18].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Udp {
                sport,
                dport,
                zero_checksum,
                payload,
            } => {
                let len = (8 + payload.len()) as u16;
                let mut b = Vec::with_capacity(len as usize);
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                if !zero_checksum {
                    let mut c = l4_checksum(src, dst, PROTO_UDP, &b);
                    if c == 0 {
                        c = 0xffff;
                    }
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
                b
            }
            L4::IcmpEcho { id, seq, payload } => {
                let mut b = vec![8, 0, 0, 0];
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(payload);
                let c = internet_checksum(&b);
                b[2..4].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::IcmpError {
                icmp_type,
                code,
                rest,
                quote,
            } => {
                let mut b = vec![*icmp_type, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(quote);
                let c = internet_checksum(&b);
                b[2..4].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }

    /// The frame's bytes, every checksum computed from scratch.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ihl = 5 + self.options.len().div_ceil(4);
        let hlen = ihl * 4;
        let tot_len = (hlen + l4.len()) as u16;
        let mut ip = Vec::with_capacity(hlen);
        ip.push(0x40 | ihl as u8);
        ip.push(self.tos);
        ip.extend_from_slice(&tot_len.to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        ip.resize(hlen, 0);
        let c = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut f = ethernet(self.dst_mac, self.src_mac, ETH_P_IP);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// A TCP segment from `src` to `dst` with `flags` and a small payload.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Ipv4Frame {
    Ipv4Frame::new(
        *src.ip(),
        *dst.ip(),
        L4::Tcp {
            sport: src.port(),
            dport: dst.port(),
            seq: 0x0102_0304,
            ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
            flags,
            window: 64240,
            options: Vec::new(),
            payload: if flags & TCP_SYN != 0 {
                Vec::new()
            } else {
                b"GET / HTTP/1.0\r\n\r\n".to_vec()
            },
        },
    )
}

/// A UDP datagram from `src` to `dst` with a checksum.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Ipv4Frame {
    Ipv4Frame::new(
        *src.ip(),
        *dst.ip(),
        L4::Udp {
            sport: src.port(),
            dport: dst.port(),
            zero_checksum: false,
            payload: b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00".to_vec(),
        },
    )
}

/// A UDP datagram with checksum 0 ("none").
pub fn udp_no_checksum(src: SocketAddrV4, dst: SocketAddrV4) -> Ipv4Frame {
    let mut f = udp(src, dst);
    if let L4::Udp { zero_checksum, .. } = &mut f.l4 {
        *zero_checksum = true;
    }
    f
}

/// An ICMP echo request.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4Frame {
    Ipv4Frame::new(
        src,
        dst,
        L4::IcmpEcho {
            id: 0x4242,
            seq: 1,
            payload: b"ping".to_vec(),
        },
    )
}

/// An ICMP destination unreachable / port unreachable (type 3, code 3) from
/// `src` to `dst` quoting `quote` (the offending IPv4 header and the first
/// 8 bytes of its payload).
pub fn icmp_port_unreachable(src: Ipv4Addr, dst: Ipv4Addr, quote: &[u8]) -> Ipv4Frame {
    Ipv4Frame::new(
        src,
        dst,
        L4::IcmpError {
            icmp_type: 3,
            code: 3,
            rest: [0; 4],
            quote: quote.to_vec(),
        },
    )
}

/// Splits an Ethernet/IPv4 frame (IHL 5) into IP fragments carrying at
/// most `chunk` bytes of the IP payload each (rounded down to a multiple of
/// 8): every fragment has the original's header with its own total length,
/// MF flag and offset (DF cleared) and a recomputed header checksum.
pub fn fragments(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let chunk = chunk / 8 * 8;
    assert!(chunk >= 8);
    let hdr = &frame[..ETH_HLEN + 20];
    let payload = &frame[ETH_HLEN + 20..];
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < payload.len() {
        let end = (offset + chunk).min(payload.len());
        let more = end < payload.len();
        let mut f = hdr.to_vec();
        f.extend_from_slice(&payload[offset..end]);
        let tot = (20 + end - offset) as u16;
        f[off::IP + 2..off::IP + 4].copy_from_slice(&tot.to_be_bytes());
        let word = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
        f[off::IP + 6..off::IP + 8].copy_from_slice(&word.to_be_bytes());
        f[off::IP_CSUM..off::IP_CSUM + 2].copy_from_slice(&[0, 0]);
        let c = internet_checksum(&f[off::IP..off::IP + 20]);
        f[off::IP_CSUM..off::IP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
        out.push(f);
        offset = end;
    }
    out
}

/// Puts fragments (in any order) back together into one frame, as the
/// receiver's reassembly would: the first fragment's Ethernet and IPv4
/// header (offset 0, MF cleared, total length and checksum recomputed) and
/// the payloads at their offsets. Panics if the fragments disagree on the
/// addresses, protocol or id, or leave a hole.
pub fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let word = |f: &[u8]| u16::from_be_bytes([f[off::IP + 6], f[off::IP + 7]]);
    let first = frags
        .iter()
        .find(|f| word(f) & 0x1fff == 0)
        .expect("no first fragment");
    let mut payload: Vec<u8> = Vec::new();
    let mut parts: Vec<(usize, &[u8])> = frags
        .iter()
        .map(|f| {
            assert_eq!(
                (
                    &f[off::IP_SRC..off::IP_DST + 4],
                    f[off::IP + 9],
                    &f[off::IP + 4..off::IP + 6]
                ),
                (
                    &first[off::IP_SRC..off::IP_DST + 4],
                    first[off::IP + 9],
                    &first[off::IP + 4..off::IP + 6]
                ),
                "fragments of different datagrams"
            );
            let tot = usize::from(u16::from_be_bytes([f[off::IP + 2], f[off::IP + 3]]));
            (
                usize::from(word(f) & 0x1fff) * 8,
                &f[off::L4..off::IP + tot],
            )
        })
        .collect();
    parts.sort_by_key(|(o, _)| *o);
    for (o, p) in parts {
        assert_eq!(o, payload.len(), "a hole in the fragments");
        payload.extend_from_slice(p);
    }
    let mut f = first[..off::L4].to_vec();
    f.extend_from_slice(&payload);
    let tot = (20 + payload.len()) as u16;
    f[off::IP + 2..off::IP + 4].copy_from_slice(&tot.to_be_bytes());
    f[off::IP + 6..off::IP + 8].copy_from_slice(&[0, 0]);
    f[off::IP_CSUM..off::IP_CSUM + 2].copy_from_slice(&[0, 0]);
    let c = internet_checksum(&f[off::IP..off::L4]);
    f[off::IP_CSUM..off::IP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
    f
}

/// An Ethernet II header.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP request "who has `target`? tell `sender`".
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet([0xff; 6], MAC_A, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// An IPv6 UDP datagram (fd00::1:40000 -> fd00::2:53), checksummed.
pub fn ipv6_udp() -> Vec<u8> {
    let src: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let dst: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let payload = b"hello";
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut ph = Vec::new();
    ph.extend_from_slice(&src);
    ph.extend_from_slice(&dst);
    ph.extend_from_slice(&u32::from(len).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
    let c = !fold(sum16(&udp, sum16(&ph, 0)));
    udp[6..8].copy_from_slice(&c.to_be_bytes());

    let mut f = ethernet(MAC_B, MAC_A, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&len.to_be_bytes());
    f.push(PROTO_UDP);
    f.push(64);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&udp);
    f
}

/// An 802.1Q-tagged copy of an untagged Ethernet frame (VLAN `vid`).
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// The addresses and ports of an IPv4 TCP/UDP frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ttl: u8,
}

/// Reads the tuple of an option-less IPv4 TCP/UDP frame.
pub fn tuple(frame: &[u8]) -> Tuple {
    assert!(frame.len() >= off::L4 + 4, "frame too short for a tuple");
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    Tuple {
        src: SocketAddrV4::new(ip(off::IP_SRC), port(off::L4)),
        dst: SocketAddrV4::new(ip(off::IP_DST), port(off::L4 + 2)),
        proto: frame[off::IP + 9],
        ttl: frame[off::IP_TTL],
    }
}

/// Where the checksums of a frame are and what they should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub what: &'static str,
    pub offset: usize,
    pub found: u16,
    pub computed: u16,
}

impl Checksum {
    /// Equal, or both encodings of one's-complement zero (0x0000/0xffff) for
    /// checksums where both are valid (IPv4 header, TCP). A UDP checksum of
    /// 0 means "none" and is only right when the sender sent none.
    pub fn ok(&self) -> bool {
        self.found == self.computed
            || (self.what != "udp"
                && matches!((self.found, self.computed), (0, 0xffff) | (0xffff, 0)))
    }
}

/// Recomputes from scratch the IPv4 header checksum and the TCP/UDP/ICMP
/// checksum of an Ethernet/IPv4 frame (any IHL; the L4 checksum only when
/// not a fragment).
/// UDP with checksum 0 is reported as computed 0 (no checksum).
pub fn recompute_checksums(frame: &[u8]) -> Vec<Checksum> {
    let mut out = Vec::new();
    if frame.len() < ETH_HLEN + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return out;
    }
    let ip = &frame[ETH_HLEN..];
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if hlen < 20 || ip.len() < hlen || tot_len < hlen || tot_len > ip.len() {
        return out;
    }
    let mut hdr = ip[..hlen].to_vec();
    let found = u16::from_be_bytes([hdr[10], hdr[11]]);
    hdr[10] = 0;
    hdr[11] = 0;
    out.push(Checksum {
        what: "ipv4",
        offset: ETH_HLEN + 10,
        found,
        computed: internet_checksum(&hdr),
    });

    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return out;
    }
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let mut l4 = ip[hlen..tot_len].to_vec();
    match ip[9] {
        PROTO_TCP if l4.len() >= 20 => {
            let found = u16::from_be_bytes([l4[16], l4[17]]);
            l4[16] = 0;
            l4[17] = 0;
            out.push(Checksum {
                what: "tcp",
                offset: ETH_HLEN + hlen + 16,
                found,
                computed: l4_checksum(src, dst, PROTO_TCP, &l4),
            });
        }
        PROTO_ICMP if l4.len() >= 4 => {
            let found = u16::from_be_bytes([l4[2], l4[3]]);
            l4[2] = 0;
            l4[3] = 0;
            out.push(Checksum {
                what: "icmp",
                offset: ETH_HLEN + hlen + 2,
                found,
                computed: internet_checksum(&l4),
            });
        }
        PROTO_UDP if l4.len() >= 8 => {
            let found = u16::from_be_bytes([l4[6], l4[7]]);
            l4[6] = 0;
            l4[7] = 0;
            let computed = if found == 0 {
                0
            } else {
                match l4_checksum(src, dst, PROTO_UDP, &l4) {
                    0 => 0xffff,
                    c => c,
                }
            };
            out.push(Checksum {
                what: "udp",
                offset: ETH_HLEN + hlen + 6,
                found,
                computed,
            });
        }
        _ => {}
    }
    out
}

/// Ok when every checksum of `frame` is right (see [`recompute_checksums`]).
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let bad: Vec<String> = recompute_checksums(frame)
        .iter()
        .filter(|c| !c.ok())
        .map(|c| {
            format!(
                "{} checksum at {}: found {:#06x}, computed {:#06x}",
                c.what, c.offset, c.found, c.computed
            )
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// Panics unless every checksum of `frame` is right.
pub fn assert_checksums(frame: &[u8]) {
    if let Err(e) = verify_checksums(frame) {
        panic!("bad checksums: {e}\nframe: {}", hex(frame));
    }
}

/// Asserts that `actual` equals `expected` byte for byte, except that an
/// IPv4/TCP checksum may use the other encoding of one's-complement zero
/// (both are right; incremental and full computation can differ there),
/// and that all checksums of `actual` are right.
pub fn assert_frame_eq(actual: &[u8], expected: &[u8]) {
    assert_checksums(actual);
    if actual == expected {
        return;
    }
    let mut a = actual.to_vec();
    let mut e = expected.to_vec();
    if a.len() == e.len() {
        for c in recompute_checksums(expected) {
            if c.what != "udp" {
                let o = c.offset;
                let pair = (
                    u16::from_be_bytes([a[o], a[o + 1]]),
                    u16::from_be_bytes([e[o], e[o + 1]]),
                );
                if matches!(pair, (0, 0xffff) | (0xffff, 0)) {
                    a[o..o + 2].copy_from_slice(&[0, 0]);
                    e[o..o + 2].copy_from_slice(&[0, 0]);
                }
            }
        }
        if a == e {
            return;
        }
    }
    panic!(
        "frames differ\n  actual:   {}\n  expected: {}\n  first difference at byte {:?}",
        hex(actual),
        hex(expected),
        actual.iter().zip(expected).position(|(x, y)| x != y)
    );
}

/// Lowercase hex, bytes separated by spaces.
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn built_frames_verify() {
        let c = sa("10.0.0.1:40000");
        let s = sa("10.96.0.10:53");
        for f in [
            tcp(c, s, TCP_SYN).build(),
            tcp(c, s, TCP_ACK | TCP_PSH).build(),
            udp(c, s).build(),
            udp_no_checksum(c, s).build(),
            icmp_echo(*c.ip(), *s.ip()).build(),
            tcp(c, s, TCP_SYN)
                .with_tcp_options(&[2, 4, 5, 0xb4, 1, 1, 4, 2])
                .build(),
            icmp_port_unreachable(
                *s.ip(),
                *c.ip(),
                &udp(c, s).build()[ETH_HLEN..ETH_HLEN + 28],
            )
            .build(),
        ] {
            assert_checksums(&f);
            assert!(!recompute_checksums(&f).is_empty());
        }
        let f = udp_no_checksum(c, s).build();
        assert_eq!(&f[off::UDP_CSUM..off::UDP_CSUM + 2], &[0, 0]);
    }

    #[test]
    fn corruption_is_detected() {
        let f = tcp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), TCP_SYN).build();
        for o in [off::IP_SRC, off::L4, off::TCP_CSUM, off::IP_CSUM] {
            let mut g = f.clone();
            g[o] ^= 0x40;
            assert!(verify_checksums(&g).is_err(), "flip at {o} undetected");
        }
        // Only the UDP checksum is wrong after a payload change.
        let mut g = udp(sa("10.0.0.1:1"), sa("10.0.0.2:2")).build();
        let last = g.len() - 1;
        g[last] ^= 0x40;
        let cs = recompute_checksums(&g);
        assert!(cs[0].ok() && !cs[1].ok(), "{cs:?}");
    }

    #[test]
    fn fragments_reassemble() {
        let mut f = udp(sa("10.0.0.1:1000"), sa("10.0.0.2:53")).with_payload(&[5; 3000]);
        f.frag = 0;
        let whole = f.build();
        let frags = fragments(&whole, 1480);
        assert_eq!(frags.len(), 3);
        for g in &frags {
            assert_checksums(g);
        }
        let mut shuffled = frags.clone();
        shuffled.reverse();
        assert_eq!(reassemble(&shuffled), whole);
    }

    #[test]
    fn tuple_roundtrip() {
        let f = udp(sa("1.2.3.4:5"), sa("6.7.8.9:10")).with_ttl(9).build();
        let t = tuple(&f);
        assert_eq!(t.src, sa("1.2.3.4:5"));
        assert_eq!(t.dst, sa("6.7.8.9:10"));
        assert_eq!(t.proto, PROTO_UDP);
        assert_eq!(t.ttl, 9);
    }

    #[test]
    fn zero_encodings_are_equal_but_udp_zero_is_not() {
        let f = tcp(sa("1.2.3.4:5"), sa("6.7.8.9:10"), TCP_ACK).build();
        let mut g = f.clone();
        // Replace the checksum by the other zero encoding only if it is one.
        let c = u16::from_be_bytes([f[off::TCP_CSUM], f[off::TCP_CSUM + 1]]);
        if c == 0 || c == 0xffff {
            g[off::TCP_CSUM..off::TCP_CSUM + 2].copy_from_slice(&(!c).to_be_bytes());
            assert_frame_eq(&g, &f);
        }
        let mut u = udp(sa("1.2.3.4:5"), sa("6.7.8.9:10")).build();
        u[off::UDP_CSUM] = 0;
        u[off::UDP_CSUM + 1] = 0;
        assert!(verify_checksums(&u).is_ok(), "UDP checksum 0 means none");
    }
}
