//! F2: the cgroup side of socket-level load balancing for the node's own
//! processes: which cgroup the four sock_addr programs attach to, which
//! network namespace they serve, and their pinned links.
//!
//! **Which cgroup.** `--cgroup-path DIR`, or the root of the machine's cgroup
//! v2 hierarchy, found in /proc/self/mountinfo (never assumed: it is
//! /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one,
//! and anywhere an operator mounted it). A cgroup2 mount made inside a
//! container's cgroup namespace shows the container's own cgroup as its root;
//! attached there, the programs would see the agent's container and nothing
//! else. So a mount point is taken only when the directory it leads to (the
//! topmost mount there, which is what attaching opens) is the hierarchy's real
//! root: the kernel gives every cgroup a `cgroup.events` file except the root.
//! The chart mounts the host's /sys/fs/cgroup over the container's, which
//! passes this test.
//!
//! **Which sockets.** The programs see every socket of every process below
//! the cgroup, pods included; they translate only those of the agent's own
//! network namespace (the node's: the agent runs with hostNetwork), whose
//! cookie (`SO_NETNS_COOKIE`, Linux 5.14+) the agent passes in `LB_CONFIG`.
//!
//! **Links.** One bpf link per hook, pinned as
//! `<bpffs>/links/cgroup-<cgroup id>-<hook>` next to the TC links. A
//! restarted agent swaps its newly loaded programs into the pinned links
//! (`BPF_LINK_UPDATE`, atomic): connect() is never untranslated across an
//! upgrade. Pins of another cgroup (the flag changed) and, with socket LB
//! off, all of them are detached. `lb-agent --cleanup` detaches them
//! synchronously with the TC links. The cgroup id (the directory's inode
//! number on cgroup v2) in the name keeps a pin from being mistaken for one
//! of a new cgroup at the same path.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use lb_common::program_names;
use tracing::{info, warn};

use super::{detach_and_unpin, error_chain, sys, Dataplane, DataplaneError};

/// statfs(2) f_type of cgroup v2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Every cgroup has it but the hierarchy's root.
const NOT_ON_ROOT_FILE: &str = "cgroup.events";
/// Link pins of the cgroup hooks start with this.
pub(super) const PIN_PREFIX: &str = "cgroup-";
/// SOL_SOCKET option SO_NETNS_COOKIE (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// (pin name part, program), in attach order: the reverse hooks first, so
/// that no socket is sent to a backend before recvfrom()/getpeername() can
/// show it the frontend.
const HOOKS: [(&str, &str); 4] = [
    ("recvmsg4", program_names::SOCK_RECVMSG4),
    ("getpeername4", program_names::SOCK_GETPEERNAME4),
    ("connect4", program_names::SOCK_CONNECT4),
    ("sendmsg4", program_names::SOCK_SENDMSG4),
];

/// Where socket-level load balancing is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLbAttachment {
    pub cgroup: PathBuf,
    /// The cgroup's id (its directory's inode number).
    pub cgroup_id: u64,
    /// Every hook was swapped into a link an earlier agent pinned.
    pub adopted: bool,
}

fn socket_lb_err(reason: String) -> DataplaneError {
    DataplaneError::SocketLb(reason)
}

/// `\040` and friends of a mountinfo path field, decoded.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(oct) = b.get(i + 1..i + 4) {
                if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                    let v = oct.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                    if let Ok(v) = u8::try_from(v) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of the cgroup2 file systems in a /proc/self/mountinfo
/// text, in mount order, without repeats.
pub fn cgroup2_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let p = PathBuf::from(unescape_mountinfo(mount_point));
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Whether `dir` is the root of its cgroup v2 hierarchy.
pub fn is_hierarchy_root(dir: &Path) -> bool {
    dir.is_dir() && !dir.join(NOT_ON_ROOT_FILE).exists()
}

/// The root of this machine's cgroup v2 hierarchy: the first cgroup2 mount
/// point of /proc/self/mountinfo that leads to the hierarchy's root.
pub fn find_cgroup2_root() -> Result<PathBuf, DataplaneError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| DataplaneError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mounts = cgroup2_mount_points(&text);
    if let Some(root) = mounts.iter().find(|m| is_hierarchy_root(m)) {
        return Ok(root.clone());
    }
    Err(socket_lb_err(if mounts.is_empty() {
        "no cgroup v2 file system is mounted (none in /proc/self/mountinfo): mount one \
         (mount -t cgroup2 none /sys/fs/cgroup), give --cgroup-path, or run with --no-socket-lb"
            .to_string()
    } else {
        format!(
            "the cgroup v2 mounts {mounts:?} show a cgroup below the hierarchy's root (a \
             container's cgroup namespace?): mount the host's cgroup v2 hierarchy into the \
             container (the chart's hostPaths.cgroup) or give --cgroup-path"
        )
    }))
}

/// Checks that `dir` is a cgroup v2 directory; its cgroup id.
pub fn cgroup_id(dir: &Path) -> Result<u64, DataplaneError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| socket_lb_err(format!("{}: not a usable path", dir.display())))?;
    // SAFETY: statfs is plain data; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(DataplaneError::Io {
            path: dir.display().to_string(),
            source: io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(socket_lb_err(format!(
            "{} is not a cgroup v2 directory (cgroup v1 cannot run socket hooks; on a hybrid \
             host the v2 hierarchy is usually /sys/fs/cgroup/unified)",
            dir.display()
        )));
    }
    let meta = std::fs::metadata(dir).map_err(|source| DataplaneError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    Ok(meta.ino())
}

/// The cookie of the network namespace the calling thread is in
/// (getsockopt SO_NETNS_COOKIE on a fresh socket; Linux 5.14+).
pub fn own_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Pin name of a hook's link on cgroup `id`.
fn pin_name(id: u64, hook: &str) -> String {
    format!("{PIN_PREFIX}{id}-{hook}")
}

/// The cgroup id in a cgroup link pin name.
fn pin_cgroup_id(file: &str) -> Option<u64> {
    file.strip_prefix(PIN_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

impl Dataplane {
    /// Makes socket-level load balancing attached to `cgroup` (the programs
    /// swapped into pinned links where they exist, attached anew where not),
    /// or, with `None`, to nothing. Pins of any other cgroup are detached.
    pub fn sync_socket_lb(
        &mut self,
        cgroup: Option<&Path>,
    ) -> Result<Option<SocketLbAttachment>, DataplaneError> {
        let Some(dir) = cgroup else {
            self.detach_cgroup_pins(None);
            self.unpinned_cgroup.clear();
            self.socket_lb = None;
            return Ok(None);
        };
        let id = cgroup_id(dir)?;
        if let Some(a) = &self.socket_lb {
            if a.cgroup_id == id {
                return Ok(Some(a.clone()));
            }
        }
        self.detach_cgroup_pins(Some(id));
        let links_dir = self.links_dir();
        let mut adopted_all = true;
        for (hook, program) in HOOKS {
            let fail = |reason: String| {
                socket_lb_err(format!(
                    "attaching {program} to the cgroup {}: {reason}",
                    dir.display()
                ))
            };
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(program)
                .ok_or(DataplaneError::MissingProgram(program))?
                .try_into()
                .map_err(|source| DataplaneError::Program {
                    name: program,
                    source,
                })?;
            if prog.fd().is_err() {
                prog.load().map_err(|source| DataplaneError::Program {
                    name: program,
                    source,
                })?;
            }
            let pin = links_dir.join(pin_name(id, hook));
            if pin.exists() {
                let prog_fd = prog.fd().map_err(|source| DataplaneError::Program {
                    name: program,
                    source,
                })?;
                let swapped =
                    sys::obj_get(&pin).and_then(|link| sys::link_update(&link, prog_fd.as_fd()));
                match swapped {
                    Ok(()) => continue,
                    Err(e) => {
                        warn!(pin = %pin.display(), error = %e, "cannot update the pinned cgroup link; attaching anew");
                        detach_and_unpin(&pin)?;
                    }
                }
            }
            adopted_all = false;
            let file = File::open(dir).map_err(|source| DataplaneError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            // bpf links on a cgroup are always multi-program (the kernel
            // takes no attach flags with them): other programs on this
            // cgroup and its ancestors keep running.
            let link_id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|e| fail(error_chain(&e)))?;
            let owned = prog.take_link(link_id).map_err(|e| fail(error_chain(&e)))?;
            if aya::util::KernelVersion::current()
                .is_ok_and(|v| v < aya::util::KernelVersion::new(5, 7, 0))
            {
                // Kernels before 5.7 attach without a link: nothing to pin;
                // held here, detached when the agent exits.
                warn!(program, "cgroup attachment cannot be pinned (kernel without bpf links); an agent restart re-attaches it");
                self.unpinned_cgroup.push(owned);
                continue;
            }
            let fd = FdLink::try_from(owned).map_err(|e| fail(error_chain(&e)))?;
            // The pin owns the link from now on.
            fd.pin(&pin)
                .map_err(|e| fail(format!("pin {}: {}", pin.display(), error_chain(&e))))?;
        }
        let a = SocketLbAttachment {
            cgroup: dir.to_path_buf(),
            cgroup_id: id,
            adopted: adopted_all,
        };
        self.socket_lb = Some(a.clone());
        Ok(Some(a))
    }

    /// Detaches the cgroup link pins of every cgroup but `keep`.
    fn detach_cgroup_pins(&self, keep: Option<u64>) {
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(PIN_PREFIX) || keep.is_some() && pin_cgroup_id(name) == keep {
                continue;
            }
            match detach_and_unpin(&e.path()) {
                Ok(()) => info!(pin = name, "detached a socket-LB cgroup link"),
                Err(e) => {
                    warn!(pin = name, error = %error_chain(&e), "cannot detach a socket-LB cgroup link")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_mountinfo() {
        // This project's machines: hybrid, v2 at /sys/fs/cgroup/unified.
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_points(hybrid),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        // A unified host, optional fields, a second mount, a repeat (a mount
        // stacked on the same point), an escaped space.
        let unified = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
90 25 0:23 /../../.. /sys/fs/cgroup rw,relatime master:9 - cgroup2 cgroup2 rw
91 30 0:23 / /run/my\\040cgroup rw shared:40 - cgroup2 none rw
92 30 0:50 / /sys/fs/bpf rw - bpf bpf rw
";
        assert_eq!(
            cgroup2_mount_points(unified),
            [
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/run/my cgroup")
            ]
        );
        assert!(cgroup2_mount_points("garbage\n\n- cgroup2").is_empty());
    }

    #[test]
    fn cgroup_link_pins_name_their_cgroup() {
        let name = pin_name(4242, "connect4");
        assert_eq!(name, "cgroup-4242-connect4");
        assert_eq!(pin_cgroup_id(&name), Some(4242));
        assert_eq!(pin_cgroup_id("12-ingress-eth0"), None);
        assert_eq!(pin_cgroup_id("cgroup-x-connect4"), None);
    }

    #[test]
    fn this_machine_has_a_cgroup2_root_and_a_netns_cookie() {
        // Unprivileged: reading mountinfo and a socket option.
        if let Ok(root) = find_cgroup2_root() {
            assert!(is_hierarchy_root(&root));
            assert!(cgroup_id(&root).is_ok());
        }
        if let Ok(c) = own_netns_cookie() {
            assert_ne!(c, 0);
            assert_eq!(own_netns_cookie().unwrap(), c);
        }
    }
}
