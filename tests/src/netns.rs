//! Network namespaces for tests: fresh private ones for a thread, and named
//! ones (`/run/netns/NAME`) that other processes can enter too.
//!
//! A network namespace is a property of a thread (a task, for the kernel), and a
//! socket keeps the namespace it was created in. These helpers move only the
//! calling thread (or a fresh thread) so the rest of the test process stays in
//! the namespace it started in. Threads spawned by a thread inherit its
//! namespace, so a tokio runtime built inside [`in_private_netns`] lives there
//! too.
//!
//! Test traffic stays inside namespaces a test made: every test that sends a
//! packet, loads a program that does FIB lookups, or listens on a socket
//! does so in one of these.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

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

/// Binds a TCP listener in the named namespace `/run/netns/NAME` (from a
/// short-lived thread that entered it: the socket keeps that namespace), or
/// in the calling thread's namespace with `None`. Panics on failure.
pub fn bind_in_netns(netns: Option<&str>, addr: SocketAddr) -> TcpListener {
    match netns {
        None => TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")),
        Some(name) => in_named_netns(name, || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in netns {name}: {e}"))
        }),
    }
}

/// Runs `ip ARGS...`; an error with its stderr when it fails.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// SIGKILLs every process in the named namespace (so that it can go).
pub fn kill_processes_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2); these processes live in a namespace a test made.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// A named network namespace (`ip netns add NAME`, loopback up), deleted
/// with whatever still runs in it when dropped, also when a test panics.
#[derive(Debug)]
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    /// Creates `/run/netns/NAME`; a leftover of the same name is replaced.
    pub fn create(name: &str) -> io::Result<NamedNetns> {
        if std::path::Path::new("/run/netns").join(name).exists() {
            kill_processes_in(name);
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        // From here on, Drop removes it.
        let ns = NamedNetns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes it now (its processes killed first), reporting a failure.
    pub fn delete(self) -> io::Result<()> {
        let name = std::mem::take(&mut std::mem::ManuallyDrop::new(self).name);
        kill_processes_in(&name);
        ip(&["netns", "del", &name])
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        kill_processes_in(&self.name);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
