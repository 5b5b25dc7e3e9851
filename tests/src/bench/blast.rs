//! The packet generator of the NodePort packet-rate test: prebuilt
//! Ethernet/IPv4/UDP frames (one per flow, checksums from
//! [`lb_tests::packet`]) sent as fast as the path takes them through an
//! AF_PACKET socket on the external client's interface (`sendmmsg`,
//! qdisc bypassed), from one thread per core. Runs as
//! `lb-bench-e2e blast ...` inside the external namespace and prints one
//! JSON [`BlastReport`]. Delivered packets are counted on the backends'
//! interfaces by the caller.
//!
//! Also here: the UDP sink of the backends (`lb-bench-e2e sink`), a bound
//! socket nobody reads, so every datagram is delivered to a socket and
//! dropped there without an ICMP error going back.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::cpu::{CpuDelta, CpuTimes};

#[derive(Clone, Debug)]
pub struct BlastOpts {
    pub iface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    /// Flow `f` goes to `dsts[f % len]`.
    pub dsts: Vec<SocketAddrV4>,
    /// Distinct source ports (flows), cycled.
    pub flows: u16,
    pub threads: usize,
    pub duration: Duration,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlastReport {
    pub sent: u64,
    pub send_errors: u64,
    pub secs: f64,
    pub cpu: CpuDelta,
}

/// `aa:bb:cc:dd:ee:ff`
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    parts.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

fn packet_socket(ifindex: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); protocol 0: this socket receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a correctly sized sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        bail!("bind(AF_PACKET): {}", std::io::Error::last_os_error());
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int. Failure only costs the qdisc layer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    Ok(fd)
}

/// The frames of flows `first..first+count`.
fn frames(opts: &BlastOpts, first: u16, count: u16) -> Vec<Vec<u8>> {
    (first..first + count)
        .map(|f| {
            let dst = opts.dsts[usize::from(f) % opts.dsts.len()];
            let src = SocketAddrV4::new(opts.src, 10_000 + f);
            lb_tests::packet::udp(src, dst)
                .with_macs(opts.dst_mac, opts.src_mac)
                .build()
        })
        .collect()
}

/// Sends until `deadline`; (sent, errors).
fn send_loop(fd: &OwnedFd, frames: &[Vec<u8>], deadline: Instant) -> (u64, u64) {
    const BATCH: usize = 64;
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zeroed is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut next = 0usize;
    while Instant::now() < deadline {
        for m in msgs.iter_mut() {
            m.msg_hdr.msg_iov = &mut iovs[next];
            m.msg_hdr.msg_iovlen = 1;
            next = (next + 1) % iovs.len();
        }
        // SAFETY: msgs points at BATCH initialized headers whose iovecs
        // point into `frames`, alive for the call.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        } else {
            errors += 1;
            std::thread::yield_now();
        }
    }
    (sent, errors)
}

/// Runs the generator.
pub fn run(opts: &BlastOpts) -> Result<BlastReport> {
    anyhow::ensure!(!opts.dsts.is_empty() && opts.flows > 0, "nothing to send");
    let index = ifindex(&opts.iface)?;
    let threads = opts.threads.max(1);
    let per = (opts.flows as usize).div_ceil(threads) as u16;
    let mut sockets = Vec::new();
    let mut sets = Vec::new();
    for t in 0..threads {
        let first = (t as u16) * per;
        let count = per.min(opts.flows.saturating_sub(first)).max(1);
        sockets.push(packet_socket(index)?);
        sets.push(frames(opts, first, count));
    }
    let a = CpuTimes::read()?;
    let started = Instant::now();
    let deadline = started + opts.duration;
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = sockets
            .iter()
            .zip(&sets)
            .map(|(fd, frames)| s.spawn(move || send_loop(fd, frames, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 0)))
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let b = CpuTimes::read()?;
    Ok(BlastReport {
        sent: results.iter().map(|r| r.0).sum(),
        send_errors: results.iter().map(|r| r.1).sum(),
        secs,
        cpu: a.until(&b),
    })
}

/// The backends' UDP sink: binds `port` with a small receive buffer and
/// never reads.
pub fn sink(port: u16) -> Result<()> {
    let sock = std::net::UdpSocket::bind(("0.0.0.0", port))
        .with_context(|| format!("binding UDP {port}"))?;
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt with an int on our socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_valid_udp_to_each_destination() {
        let opts = BlastOpts {
            iface: "eth0".into(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(198, 18, 0, 100),
            dsts: vec![
                "10.244.1.3:9000".parse().unwrap(),
                "10.244.2.2:9000".parse().unwrap(),
            ],
            flows: 4,
            threads: 1,
            duration: Duration::ZERO,
        };
        let f = frames(&opts, 0, 4);
        assert_eq!(f.len(), 4);
        for (i, frame) in f.iter().enumerate() {
            lb_tests::packet::verify_checksums(frame).unwrap();
            let t = lb_tests::packet::tuple(frame);
            assert_eq!(t.src.port(), 10_000 + i as u16);
            assert_eq!(t.dst, opts.dsts[i % 2]);
            assert_eq!(&frame[0..6], &opts.dst_mac);
        }
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        assert!(parse_mac("02:00").is_err());
    }
}
