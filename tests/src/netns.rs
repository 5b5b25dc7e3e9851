//! Thread-level network-namespace helpers for tests.
//!
//! A network namespace is a property of a thread (a task, for the kernel), and a
//! socket keeps the namespace it was created in. These helpers move only the
//! calling thread (or a fresh thread) so the rest of the test process stays in
//! the namespace it started in. Threads spawned by a thread inherit its
//! namespace, so a tokio runtime built inside [`in_private_netns`] lives there
//! too.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Moves the calling thread into the named namespace `/run/netns/NAME`
/// (as made by `ip netns add NAME`).
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
    // SAFETY: setns on a valid fd; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns({path}): {e}")));
    }
    Ok(())
}

/// Moves the calling thread into a new, private network namespace whose only
/// interface is loopback, brought up (127.0.0.1/8 and ::1 work).
pub fn unshare_private() -> io::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; it only affects this
    // thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unshare(CLONE_NEWNET): {e}"),
        ));
    }
    set_link_up("lo")
}

/// Sets IFF_UP on an interface of the calling thread's namespace
/// (`ip link set NAME up`, without running `ip`).
pub fn set_link_up(ifname: &str) -> io::Result<()> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {ifname:?}"),
        ));
    }
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq with a NUL-terminated name.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("SIOCGIFFLAGS {ifname}: {e}"),
        ));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("SIOCSIFFLAGS {ifname}: {e}"),
        ));
    }
    Ok(())
}

/// Runs `f` on a new thread that first moved into a fresh private network
/// namespace with only loopback up, and returns its result. A panic in `f` is
/// propagated to the caller. Needs root (CAP_SYS_ADMIN).
pub fn in_private_netns<R: Send, F: FnOnce() -> R + Send>(f: F) -> R {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("private-netns".into())
            .spawn_scoped(s, || {
                unshare_private().expect("private network namespace");
                f()
            })
            .expect("spawn thread");
        match h.join() {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e),
        }
    })
}

/// Runs `f` on a new thread that first moved into the named namespace
/// `/run/netns/NAME`, and returns its result (panics propagate).
pub fn in_named_netns<R: Send, F: FnOnce() -> R + Send>(name: &str, f: F) -> R {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(s, || {
                enter(name).expect("enter network namespace");
                f()
            })
            .expect("spawn thread");
        match h.join() {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e),
        }
    })
}
