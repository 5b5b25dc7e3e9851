//! The side effects on the kernel: load the eBPF object, pin its maps under
//! the bpffs directory, attach the TC programs to uplinks and pod interfaces
//! and the socket-LB programs to a cgroup (`cgroup`), execute map writes,
//! and destroy sockets whose backend went away (`sockets`).
//!
//! Restart without a gap: maps are pinned (a new agent reopens them, so
//! conntrack survives) and TCX links are pinned (a new agent swaps its
//! programs into the existing links with `bpf_link_update`, atomically). The
//! process itself holds no link: the pins do, so an agent that exits or
//! crashes leaves the datapath running. Without TCX (kernels before 6.6, or
//! `--tc-attach netlink`) the TC programs are clsact `bpf` filters at a fixed
//! priority and handle, which belong to the interface and outlive the agent;
//! a new agent replaces their programs in place (`clsact`).

pub mod cgroup;
pub mod clsact;
pub mod conntrack_gc;
pub mod layout;
pub mod maps;
pub mod monitor;
pub mod netlink;
pub mod sockets;
mod sys;
#[cfg(test)]
mod test_support;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use cgroup::SocketLbAttachment;
use lb_common::{map_names, program_names, DatapathConfig, DATAPATH_CONFIG_GLOBAL};
use thiserror::Error;
use tracing::{debug, info, warn};

pub use layout::MapSizes;
pub use maps::{AgentMaps, DatapathMaps, MapsError};
pub use monitor::Observe;

use netlink::Link;

/// The eBPF object, embedded at build time (see build.rs).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";
const LINKS_DIR: &str = "links";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How the TC programs are attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX where the kernel has it (Linux 6.6+), netlink clsact filters
    /// elsewhere.
    #[default]
    Auto,
    /// TCX links (pinned).
    Tcx,
    /// Legacy clsact `bpf` filters (see `clsact`).
    Netlink,
}

impl std::str::FromStr for TcAttach {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TcAttach::Auto),
            "tcx" => Ok(TcAttach::Tcx),
            "netlink" => Ok(TcAttach::Netlink),
            _ => Err(format!("{s:?}: expected auto, tcx or netlink")),
        }
    }
}

impl TcAttach {
    /// `Auto` decided for this kernel: TCX when it answers a TCX query.
    pub fn resolve(self) -> TcMode {
        match self {
            TcAttach::Tcx => TcMode::Tcx,
            TcAttach::Netlink => TcMode::Netlink,
            TcAttach::Auto if tcx_supported() => TcMode::Tcx,
            TcAttach::Auto => TcMode::Netlink,
        }
    }
}

/// The way TC programs are attached on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    Tcx,
    Netlink,
}

impl TcMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Netlink => "netlink",
        }
    }
}

/// Whether the kernel has TCX: BPF_PROG_QUERY of a TCX attach type on `lo`
/// (every namespace has it) fails with EINVAL before Linux 6.6. A probe,
/// not a version check, so that distribution kernels with TCX backported
/// get it.
fn tcx_supported() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a bpf filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or choose another --bpffs")]
    NotBpffs { path: String },
    #[error("refusing pin directory {path}: {reason}; remove it or choose another --bpffs")]
    Insecure { path: String, reason: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("stamping the map layout version: {0}")]
    Stamp(String),
    #[error("writing the datapath settings: {0}")]
    Settings(String),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("attaching {program} to {interface} ({hook}): {reason}")]
    Attach {
        program: &'static str,
        interface: String,
        hook: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("socket-level load balancing: {0}")]
    SocketLb(String),
    #[error("datapath debug log (--datapath-debug-log): {0}")]
    DebugLog(String),
    #[error(transparent)]
    Clsact(#[from] clsact::ClsactError),
    #[error("listing interfaces: {0}")]
    Links(#[from] netlink::NetlinkError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What an interface is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The node's link to the outside (NodePort, external IPs, SNAT'ed replies).
    Uplink,
    /// The host side of a pod's veth.
    Pod,
}

impl Role {
    /// (hook name, TC direction, clsact hook, program).
    fn hooks(self) -> [(&'static str, TcAttachType, clsact::Hook, &'static str); 2] {
        use clsact::Hook;
        match self {
            Role::Uplink => [
                (
                    "ingress",
                    TcAttachType::Ingress,
                    Hook::Ingress,
                    program_names::UPLINK_INGRESS,
                ),
                (
                    "egress",
                    TcAttachType::Egress,
                    Hook::Egress,
                    program_names::UPLINK_EGRESS,
                ),
            ],
            Role::Pod => [
                (
                    "ingress",
                    TcAttachType::Ingress,
                    Hook::Ingress,
                    program_names::POD_INGRESS,
                ),
                (
                    "egress",
                    TcAttachType::Egress,
                    Hook::Egress,
                    program_names::POD_EGRESS,
                ),
            ],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Pod => "pod",
        }
    }
}

/// bpffs refuses names with dots ("reserved"), and interface names may have
/// them (VLANs: eth0.100).
fn pin_safe(name: &str) -> String {
    name.replace('.', "_")
}

/// Pin file name of a link: `<ifindex>-<hook>-<ifname>`. The index is part of
/// the name so a pin never gets mixed up with a new interface of the same name.
fn link_pin_name(link: &Link, hook: &str) -> String {
    format!("{}-{}-{}", link.index, hook, pin_safe(&link.name))
}

/// Whether a pin file name belongs to one of `current`'s interfaces.
fn link_pin_is_current(file: &str, current: &[Link]) -> bool {
    let mut parts = file.splitn(3, '-');
    let (Some(index), Some(_hook), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Ok(index) = index.parse::<u32>() else {
        return false;
    };
    current
        .iter()
        .any(|l| l.index == index && pin_safe(&l.name) == name)
}

/// An error with its causes, for log lines (aya's syscall errors keep the
/// errno in the source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Makes sure `dir` can hold pins: mounts bpffs at /sys/fs/bpf when `dir` is
/// below it and nothing is mounted there (a fresh node has no bpffs mounted),
/// with mode 0700; creates the pin directories 0700 and refuses ones that
/// another user owns or may write to.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        info!("mounting bpffs at /sys/fs/bpf (mode 0700)");
        std::fs::create_dir_all(sys_bpf).map_err(io_err(sys_bpf))?;
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        let data = c"mode=0700";
        // SAFETY: all pointers are valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io_err(sys_bpf)(io::Error::last_os_error()));
        }
    }
    secure_dir(dir)?;
    secure_dir(&dir.join(LINKS_DIR))?;
    if !is_bpffs(dir) {
        return Err(DataplaneError::NotBpffs {
            path: dir.display().to_string(),
        });
    }
    Ok(())
}

/// A pin directory the agent may trust: created 0700 when missing (parents
/// too); an existing one must be a real directory owned by the agent's user
/// and writable by nobody else, because whatever is pinned in it is loaded
/// into the kernel's datapath or read back as the datapath's state. An
/// existing one of the agent's own with looser read bits is tightened.
fn secure_dir(path: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err(path))?;
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    let insecure = |reason: String| DataplaneError::Insecure {
        path: path.display().to_string(),
        reason,
    };
    if !meta.is_dir() {
        return Err(insecure("not a directory (a symlink or a file)".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(insecure(format!(
            "owned by uid {}, not by the agent's uid {me}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(format!(
            "mode {mode:04o}: writable by group or others"
        )));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(path))?;
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// A loaded datapath, its maps open, attached to some interfaces.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: AgentMaps<aya::maps::MapData>,
    dir: PathBuf,
    attached: BTreeMap<Link, Role>,
    /// TCX links, or clsact filters (which need no holder: they belong to
    /// the interface and stay when the agent exits).
    tc: TcMode,
    /// F2: where the socket-LB programs are attached (`cgroup`).
    socket_lb: Option<SocketLbAttachment>,
    /// Socket-LB attachments without a bpf link (kernels before 5.7).
    unpinned_cgroup: Vec<aya::programs::cgroup_sock_addr::CgroupSockAddrLink>,
}

impl Dataplane {
    /// Loads the embedded object, reusing maps already pinned under `dir`;
    /// TC programs will be attached as `tc_attach` says; monitoring and
    /// debug-log switches as `observe` says.
    pub fn load(
        dir: &Path,
        config: &DatapathConfig,
        sizes: &MapSizes,
        observe: &Observe,
        tc_attach: TcAttach,
    ) -> Result<Self, DataplaneError> {
        ensure_bpffs(dir)?;
        let tc = tc_attach.resolve();
        if tc == TcMode::Netlink {
            secure_dir(&dir.join(clsact::QDISC_MARKERS_DIR))?;
        }
        // Never misread maps of another layout (an older or newer agent's),
        // nor adopt maps of other sizes than asked for.
        layout::check_pinned(dir, sizes)?;
        let pin_paths: Vec<(&'static str, PathBuf)> =
            map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.override_global(DATAPATH_CONFIG_GLOBAL, config, true);
        for (name, n) in sizes.by_map() {
            loader.map_max_entries(name, n);
        }
        let switches = observe.switches();
        monitor::configure(&mut loader, dir, observe, &switches)?;
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        if observe.debug_log {
            monitor::start_debug_log(&mut ebpf)?;
        }
        for name in program_names::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        layout::stamp(dir).map_err(DataplaneError::Stamp)?;
        layout::write_settings(dir, config).map_err(DataplaneError::Settings)?;
        let maps = AgentMaps::open_pinned(dir)?;
        info!(dir = %dir.display(), tc_attach = tc.as_str(), "datapath loaded; maps pinned");
        Ok(Self {
            ebpf,
            maps,
            dir: dir.to_path_buf(),
            attached: BTreeMap::new(),
            tc,
            socket_lb: None,
            unpinned_cgroup: Vec::new(),
        })
    }

    fn links_dir(&self) -> PathBuf {
        self.dir.join(LINKS_DIR)
    }

    /// How the TC programs are attached.
    pub fn tc_mode(&self) -> TcMode {
        self.tc
    }

    /// Attaches to every interface in `want` not attached yet, and lets go of
    /// the ones no longer wanted (or gone). Returns the errors of interfaces
    /// that could not be attached; the others are still handled.
    pub fn sync_interfaces(&mut self, want: &BTreeMap<Link, Role>) -> Vec<DataplaneError> {
        let mut errors = Vec::new();
        let gone: Vec<Link> = self
            .attached
            .iter()
            .filter(|(l, r)| want.get(*l) != Some(*r))
            .map(|(l, _)| l.clone())
            .collect();
        for link in gone {
            let role = self.attached.remove(&link).unwrap_or(Role::Pod);
            info!(interface = %link.name, role = role.as_str(), "detaching");
            for (hook, _, _, _) in role.hooks() {
                let pin = self.links_dir().join(link_pin_name(&link, hook));
                if let Err(e) = detach_and_unpin(&pin) {
                    warn!(error = %error_chain(&e), "cannot remove link pin");
                }
            }
            // clsact filters (and the qdisc lb added), if the interface
            // still exists.
            if let Err(e) = clsact::release(&self.dir, &link) {
                warn!(interface = %link.name, error = %error_chain(&e), "cannot remove lb's clsact filters");
            }
        }
        for (link, role) in want {
            if self.attached.contains_key(link) {
                continue;
            }
            match self.attach(link, *role) {
                Ok(adopted) => {
                    let how = match (adopted, self.tc) {
                        (true, TcMode::Tcx) => "adopted pinned links (programs swapped in place)",
                        (true, TcMode::Netlink) => {
                            "replaced the programs of lb's clsact filters in place"
                        }
                        (false, TcMode::Tcx) => "attached (TCX)",
                        (false, TcMode::Netlink) => "attached (clsact filters)",
                    };
                    info!(interface = %link.name, ifindex = link.index, role = role.as_str(), "{how}");
                    self.attached.insert(link.clone(), *role);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Removes link pins and qdisc markers whose interface no longer exists
    /// (left by an agent that was not running when the interface went away).
    pub fn remove_stale_link_pins(&self, current: &[Link]) {
        clsact::remove_stale_markers(&self.dir, current);
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(file) = file.to_str() else { continue };
            // The socket-LB links belong to a cgroup (`sync_socket_lb`).
            if file.starts_with(cgroup::PIN_PREFIX) {
                continue;
            }
            if !link_pin_is_current(file, current) {
                info!(pin = file, "removing link pin of an interface that is gone");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    pub fn attached(&self) -> &BTreeMap<Link, Role> {
        &self.attached
    }

    /// Makes LB_UPLINK_ADDRS equal to `want` (ifindex -> address).
    pub fn set_uplink_addrs(
        &mut self,
        want: &BTreeMap<u32, std::net::Ipv4Addr>,
    ) -> Result<bool, DataplaneError> {
        let name = map_names::UPLINK_ADDRS;
        let map = self.ebpf.map_mut(name).ok_or(MapsError::Missing { name })?;
        let mut map: aya::maps::HashMap<_, u32, lb_common::UplinkAddr> =
            aya::maps::HashMap::try_from(map).map_err(|source| MapsError::Map { name, source })?;
        let have: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        let mut changed = false;
        for k in have {
            if !want.contains_key(&k) {
                map.remove(&k)
                    .map_err(|source| MapsError::Map { name, source })?;
                changed = true;
            }
        }
        for (k, a) in want {
            let v = lb_common::UplinkAddr {
                addr: lb_common::ipv4_to_net(a.octets()),
            };
            if map.get(k, 0).ok() != Some(v) {
                map.insert(k, v, 0)
                    .map_err(|source| MapsError::Map { name, source })?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Attaches both hooks; true when both were adopted (pinned TCX links,
    /// or lb's clsact filters, got the new programs in place).
    fn attach(&mut self, link: &Link, role: Role) -> Result<bool, DataplaneError> {
        match self.tc {
            TcMode::Tcx => {
                let adopted = self.attach_tcx(link, role)?;
                // Switching from clsact filters (an agent with --tc-attach
                // netlink ran before): TCX runs first, so lb's filters are
                // removed only now that the TCX programs are in.
                if let Err(e) = clsact::release(&self.dir, link) {
                    warn!(interface = %link.name, error = %error_chain(&e), "cannot remove lb's clsact filters");
                }
                Ok(adopted)
            }
            TcMode::Netlink => self.attach_clsact(link, role),
        }
    }

    fn tc_program(
        &mut self,
        program: &'static str,
    ) -> Result<&mut SchedClassifier, DataplaneError> {
        self.ebpf
            .program_mut(program)
            .ok_or(DataplaneError::MissingProgram(program))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name: program,
                source,
            })
    }

    /// Legacy TC: lb's `bpf` filter on each clsact hook, its program
    /// replaced in place when an earlier agent left one (`clsact`).
    fn attach_clsact(&mut self, link: &Link, role: Role) -> Result<bool, DataplaneError> {
        let attach_err = |program: &'static str, hook: &'static str, e: &dyn std::error::Error| {
            DataplaneError::Attach {
                program,
                interface: link.name.clone(),
                hook,
                reason: error_chain(e),
            }
        };
        let [(_, _, _, first), _] = role.hooks();
        let added =
            clsact::ensure_qdisc(&self.dir, link).map_err(|e| attach_err(first, "clsact", &e))?;
        if added {
            info!(interface = %link.name, "added a clsact qdisc");
        }
        let links_dir = self.links_dir();
        let mut all_replaced = true;
        for (hook, _, clsact_hook, program) in role.hooks() {
            let prog = self.tc_program(program)?;
            let fd = prog
                .fd()
                .map_err(|source| DataplaneError::Program {
                    name: program,
                    source,
                })?
                .as_fd();
            let done = clsact::attach(link, clsact_hook, fd, program)
                .map_err(|e| attach_err(program, hook, &e))?;
            all_replaced &= done.replaced;
            // Switching from TCX (an agent with TCX ran before): the filter
            // is in, the TCX link can go.
            let pin = links_dir.join(link_pin_name(link, hook));
            if std::fs::symlink_metadata(&pin).is_ok() {
                info!(interface = %link.name, hook, "replacing a pinned TCX link by lb's clsact filter");
                detach_and_unpin(&pin)?;
            }
        }
        Ok(all_replaced)
    }

    /// TCX: a pinned link per hook, adopted (program swapped in) when an
    /// earlier agent pinned it.
    fn attach_tcx(&mut self, link: &Link, role: Role) -> Result<bool, DataplaneError> {
        let links_dir = self.links_dir();
        let mut all_adopted = true;
        for (hook, attach_type, _, program) in role.hooks() {
            let attach_err = |reason: String| DataplaneError::Attach {
                program,
                interface: link.name.clone(),
                hook,
                reason,
            };
            let pin = links_dir.join(link_pin_name(link, hook));
            let prog = self.tc_program(program)?;
            // Adopt the link an earlier agent pinned: swap the program in place.
            let adopted = match PinnedLink::from_pin(&pin) {
                Ok(pinned) => {
                    let fd: FdLink = pinned.into();
                    match SchedClassifierLink::try_from(fd) {
                        Ok(l) => match prog.attach_to_link(l) {
                            Ok(id) => Some(id),
                            Err(e) => {
                                warn!(pin = %pin.display(), error = %e, "cannot update pinned link; attaching anew");
                                let _ = std::fs::remove_file(&pin);
                                None
                            }
                        },
                        Err(e) => {
                            warn!(pin = %pin.display(), error = %e, "pinned link is not a TCX link; attaching anew");
                            let _ = std::fs::remove_file(&pin);
                            None
                        }
                    }
                }
                Err(_) => None,
            };
            let (id, fresh) = match adopted {
                Some(id) => (id, false),
                None => {
                    let id = prog
                        .attach_with_options(
                            &link.name,
                            attach_type,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(|e| attach_err(error_chain(&e)))?;
                    (id, true)
                }
            };
            let owned = prog
                .take_link(id)
                .map_err(|e| attach_err(error_chain(&e)))?;
            let fd = FdLink::try_from(owned).map_err(|e| attach_err(error_chain(&e)))?;
            if fresh {
                // The pin owns the link from now on; dropping the returned
                // PinnedLink only closes our descriptor.
                fd.pin(&pin).map_err(|e| {
                    attach_err(format!("pin {}: {}", pin.display(), error_chain(&e)))
                })?;
            }
            all_adopted &= !fresh;
        }
        Ok(all_adopted)
    }
}

/// Detaches a pinned link at once (BPF_LINK_DETACH) and removes its pin.
///
/// Removing the pin alone also detaches, but only once the kernel frees the
/// link, after an RCU grace period and a deferred work item: traffic would
/// still be translated for a moment after `--cleanup` returned.
fn detach_and_unpin(pin: &Path) -> Result<(), DataplaneError> {
    if let Ok(fd) = sys::obj_get(pin) {
        if let Err(e) = sys::link_detach(&fd) {
            // A link whose interface is gone is already detached.
            debug!(pin = %pin.display(), error = %e, "link detach");
        }
    }
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(pin)(e)),
    }
}

/// `lb-agent --cleanup`: detach and unpin everything under `dir`, and take
/// lb's clsact filters (and the clsact qdiscs lb added) off every interface
/// of this network namespace, so that the node is as before the first agent.
pub fn cleanup(dir: &Path) -> Result<(), DataplaneError> {
    // Filters are found by their program names, pins or not (a pin
    // directory someone removed must not leave filters behind).
    let links = netlink::list_links()?;
    clsact::cleanup(dir, &links)?;
    if !dir.exists() {
        info!(dir = %dir.display(), "no pin directory");
        return Ok(());
    }
    let links = dir.join(LINKS_DIR);
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            detach_and_unpin(&e.path())?;
            info!(pin = %e.path().display(), "detached and unpinned link");
        }
        std::fs::remove_dir(&links).map_err(io_err(&links))?;
    }
    monitor::remove_pin(&monitor::events_pin(dir))?;
    for name in map_names::ALL {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => info!(pin = %p.display(), "unpinned map"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    std::fs::remove_dir(dir).map_err(io_err(dir))?;
    info!(dir = %dir.display(), "cleaned up");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_have_no_dots_and_match_their_interface() {
        let l = Link {
            index: 42,
            name: "eth0.100-x".into(),
        };
        let name = link_pin_name(&l, "ingress");
        assert_eq!(name, "42-ingress-eth0_100-x");
        assert!(link_pin_is_current(&name, std::slice::from_ref(&l)));
        let renamed = Link {
            index: 42,
            name: "other".into(),
        };
        assert!(!link_pin_is_current(&name, &[renamed]));
        let reused_index = Link {
            index: 43,
            name: "eth0.100-x".into(),
        };
        assert!(!link_pin_is_current(&name, &[reused_index]));
        assert!(!link_pin_is_current("garbage", &[l]));
    }
}
