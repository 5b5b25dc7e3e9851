//! TC programs as legacy `bpf` filters on the clsact qdisc: what kernels
//! without TCX (before 6.6) get, and what `--tc-attach netlink` forces.
//!
//! **Where.** One filter per hook (clsact ingress `ffff:fff2`, egress
//! `ffff:fff3`), chain 0, protocol `all`, at the fixed priority
//! [`PRIORITY`] (1) and handle [`HANDLE`] (`0x4c42`, "LB"), direct-action,
//! named after its program (`lb_pod_ingress`, ...). `tc filter show dev
//! IFACE ingress` prints it as `pref 1 bpf chain 0 handle 0x4c42
//! lb_pod_ingress direct-action ... id N`. Priority 1 is the first in the
//! chain: lb runs before every other filter, as it runs before every legacy
//! filter under TCX; filters added later without a priority get 49152 and
//! below, after lb's. A filter of another kind at priority 1 makes the
//! kernel refuse lb's (EINVAL): the attach fails with a message that names
//! it. The handle tells lb's filter apart from other bpf filters at the same
//! priority (the kernel hands out handles from 1 upward).
//!
//! **Restart without a gap.** A netlink filter belongs to the interface, not
//! to a file descriptor: the agent never detaches it on exit, so the filter
//! keeps running the old program against the pinned maps while no agent
//! runs. A starting agent that finds lb's filter at (priority, handle)
//! replaces its program in place: RTM_NEWTFILTER with NLM_F_REPLACE (no
//! NLM_F_CREATE) and the new program's descriptor. cls_bpf swaps the two
//! programs with one RCU list replacement, so every packet runs either the
//! old or the new program, never none and never both. Only when no filter is
//! there is one created (NLM_F_CREATE | NLM_F_EXCL, which never overwrites
//! someone else's). lb filters anywhere else on the hook (another priority
//! or handle: an older agent's) are deleted right after, so there is one lb
//! filter per hook: lb's programs hand every packet on (TC_ACT_UNSPEC, "next
//! filter", C5), translated or not, so a second lb filter would process a
//! translated packet again. The same order (the new attachment first, then
//! the old one removed) holds when an agent switches between TCX and
//! netlink: for that moment both run (TCX first), which is a brief overlap,
//! never a gap.
//!
//! **What aya 0.14 would do** (why this module exists): an owned netlink
//! `SchedClassifierLink` detaches its filter (RTM_DELTFILTER) when it is
//! dropped, and a loaded `SchedClassifier` detaches the links it still holds
//! when the `Ebpf` is dropped: an agent that exits would take its filters
//! with it. `SchedClassifier::attach` with default options asks the kernel
//! for a new priority (NLM_F_CREATE | NLM_F_EXCL, priority 0), so a second
//! agent adds a second filter next to a surviving one instead of replacing
//! it. `attach_to_link` of an `NlLink` does replace in place (RTM_NEWTFILTER
//! without flags), but only for a link built with `SchedClassifierLink::
//! attached`, which then detaches on drop again, and without any check of
//! whose filter sits there.
//!
//! **The qdisc.** The agent adds the clsact qdisc where there is none, and
//! records that it did with a symlink `<bpffs>/qdiscs/<ifindex>-<ifname>`
//! (bpffs takes directories, pins and symlinks, no regular files). Removing
//! lb from an interface (`lb-agent --cleanup`, an interface no longer
//! wanted) deletes lb's filters, and the qdisc only when lb added it and no
//! other filter is left on it. An `ingress` qdisc (the older, ingress-only
//! kind) is refused: it shares clsact's handle, and an "egress" filter added
//! to it would land on its ingress hook.
//!
//! Messages are built with `netlink-packet-route`; replies are read
//! leniently (an attribute the crate cannot parse must not hide a filter).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use lb_common::program_names;
use netlink_packet_core::{
    parse_string, parse_u32, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NlaBuffer, NlasIterator, Parseable, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcHeader, TcMessage,
    TcOption,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;
use tracing::{debug, info, warn};

use super::netlink::Link;

/// lb's filters sit at this priority (`pref` in `tc filter show`): the first.
pub const PRIORITY: u16 = 1;
/// ... with this handle ("LB" in ASCII).
pub const HANDLE: u32 = 0x4c42;
/// The directory of the "lb added this clsact qdisc" markers, in the pin
/// directory.
pub const QDISC_MARKERS_DIR: &str = "qdiscs";
/// What a marker symlink points to (bpffs keeps only the name; the target
/// says what it records to someone who lists the directory).
const MARKER_TARGET: &str = "clsact-added-by-lb";

/// Parent of the clsact (and ingress) qdisc: TC_H_CLSACT = TC_H_INGRESS.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
/// Handle of the clsact qdisc: `ffff:`.
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
/// ETH_P_ALL in network byte order, as tcm_info carries it.
const PROTO_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;
const RECV_BUF: usize = 64 * 1024;
const NLMSG_HDRLEN: usize = 16;

/// One of the two hooks of clsact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    /// The filter parent: `ffff:fff2` (ingress) or `ffff:fff3` (egress).
    pub fn parent(self) -> u32 {
        match self {
            Hook::Ingress => 0xFFFF_FFF2,
            Hook::Egress => 0xFFFF_FFF3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// A tc filter as a dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// The protocol in network byte order, as tcm_info carries it.
    pub protocol: u16,
    pub handle: u32,
    pub chain: u32,
    /// `bpf`, `u32`, `flower`, ...
    pub kind: String,
    /// TCA_BPF_NAME (bpf filters).
    pub name: Option<String>,
    /// TCA_BPF_ID: the program's id (bpf filters).
    pub prog_id: Option<u32>,
    pub direct_action: bool,
}

impl Filter {
    /// A bpf filter running one of lb's TC programs (at any place).
    pub fn is_lb(&self) -> bool {
        self.kind == TcFilterBpf::KIND
            && self
                .name
                .as_deref()
                .is_some_and(|n| program_names::ALL.contains(&n))
    }

    /// Whether the filter sits where lb's filter goes.
    pub fn at_lb_place(&self) -> bool {
        self.chain == 0 && self.priority == PRIORITY && self.handle == HANDLE
    }

    fn describe(&self) -> String {
        format!(
            "a {} filter{} at pref {} handle {:#x}",
            self.kind,
            self.name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            self.priority,
            self.handle
        )
    }
}

/// The qdisc in an interface's ingress/clsact slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    Empty,
    Clsact,
    /// Another kind (`ingress`).
    Other(String),
}

#[derive(Debug, Error)]
pub enum ClsactError {
    #[error("netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("netlink {op}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("netlink {op}: malformed reply")]
    Malformed { op: &'static str },
    #[error("{interface} has an `{kind}` qdisc where clsact goes; lb needs clsact (tc qdisc del dev {interface} {kind}), or TCX (Linux 6.6+)")]
    OtherQdisc { interface: String, kind: String },
    #[error("{interface} {hook}: {what} holds lb's place (pref {PRIORITY} handle {HANDLE:#x}); remove it (tc filter del dev {interface} {hook} pref {PRIORITY}) or use TCX (Linux 6.6+)")]
    PlaceTaken {
        interface: String,
        hook: &'static str,
        what: String,
    },
    #[error("{path}: {source}")]
    Marker {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ClsactError {
    fn errno(&self) -> Option<i32> {
        match self {
            ClsactError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What [`attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// lb's filter was there and got the new program in place.
    pub replaced: bool,
    /// lb filters found elsewhere on the hook and deleted.
    pub strays_removed: usize,
}

// ---- messages

fn tc_header(ifindex: u32, parent: u32, handle: u32, info: u32) -> TcHeader {
    TcHeader {
        family: AddressFamily::Unspec,
        index: ifindex as i32,
        handle: TcHandle::from(handle),
        parent: TcHandle::from(parent),
        info,
    }
}

/// tcm_info of a filter: priority in the upper half, protocol in the lower.
fn filter_info(priority: u16, protocol: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from(protocol)
}

/// The bytes of a request.
fn request_bytes(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    buf
}

/// RTM_NEWTFILTER for lb's filter on `hook` running `prog_fd` named `name`.
/// `replace`: NLM_F_REPLACE only (the filter must exist; its program is
/// swapped in place); else NLM_F_CREATE | NLM_F_EXCL (it must not exist).
fn new_filter_request(
    ifindex: u32,
    hook: Hook,
    prog_fd: u32,
    name: &str,
    replace: bool,
) -> (RouteNetlinkMessage, u16) {
    let mut m = TcMessage::default();
    m.header = tc_header(
        ifindex,
        hook.parent(),
        HANDLE,
        filter_info(PRIORITY, PROTO_ALL),
    );
    m.attributes = vec![
        TcAttribute::Kind(TcFilterBpf::KIND.into()),
        TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog_fd)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]),
    ];
    let flags = if replace {
        NLM_F_REPLACE
    } else {
        NLM_F_CREATE | NLM_F_EXCL
    };
    (RouteNetlinkMessage::NewTrafficFilter(m), flags)
}

fn del_filter_request(ifindex: u32, hook: Hook, f: &Filter) -> RouteNetlinkMessage {
    let mut m = TcMessage::default();
    m.header = tc_header(
        ifindex,
        hook.parent(),
        f.handle,
        filter_info(f.priority, f.protocol),
    );
    m.attributes = vec![TcAttribute::Kind(f.kind.clone())];
    if f.chain != 0 {
        m.attributes.push(TcAttribute::Chain(f.chain));
    }
    RouteNetlinkMessage::DelTrafficFilter(m)
}

fn clsact_request(ifindex: u32, add: bool) -> RouteNetlinkMessage {
    let mut m = TcMessage::default();
    m.header = tc_header(ifindex, TC_H_CLSACT, CLSACT_HANDLE, 0);
    m.attributes = vec![TcAttribute::Kind("clsact".into())];
    if add {
        RouteNetlinkMessage::NewQueueDiscipline(m)
    } else {
        RouteNetlinkMessage::DelQueueDiscipline(m)
    }
}

// ---- replies

/// A filter from the payload of an RTM_NEWTFILTER message (a dump answer).
/// None for the per-priority header messages a dump also sends (handle 0)
/// and for what does not parse.
pub fn parse_filter(payload: &[u8]) -> Option<Filter> {
    let header = TcHeader::parse(payload).ok()?;
    let handle = u32::from(header.handle.major) << 16 | u32::from(header.handle.minor);
    if handle == 0 {
        return None;
    }
    let mut f = Filter {
        priority: (header.info >> 16) as u16,
        protocol: (header.info & 0xffff) as u16,
        handle,
        chain: 0,
        kind: String::new(),
        name: None,
        prog_id: None,
        direct_action: false,
    };
    let mut options: Option<Vec<u8>> = None;
    for nla in NlasIterator::new(payload.get(20..)?).map_while(Result::ok) {
        match nla.kind() {
            TCA_KIND => f.kind = parse_string(nla.value()).ok()?,
            TCA_CHAIN => f.chain = parse_u32(nla.value()).unwrap_or(0),
            TCA_OPTIONS => options = Some(nla.value().to_vec()),
            _ => {}
        }
    }
    if f.kind.is_empty() {
        return None;
    }
    if f.kind == TcFilterBpf::KIND {
        for nla in NlasIterator::new(options.as_deref().unwrap_or_default()).map_while(Result::ok) {
            match TcFilterBpfOption::parse(&nla) {
                Ok(TcFilterBpfOption::ProgName(n)) => f.name = Some(n),
                Ok(TcFilterBpfOption::ProgId(id)) => f.prog_id = Some(id),
                Ok(TcFilterBpfOption::Flags(fl)) => {
                    f.direct_action = fl.contains(TcBpfFlags::DirectAction)
                }
                _ => {}
            }
        }
    }
    Some(f)
}

/// (ifindex, parent, kind) of an RTM_NEWQDISC payload.
fn parse_qdisc(payload: &[u8]) -> Option<(u32, u32, String)> {
    let header = TcHeader::parse(payload).ok()?;
    let parent = u32::from(header.parent.major) << 16 | u32::from(header.parent.minor);
    let kind = NlasIterator::new(payload.get(20..)?)
        .map_while(Result::ok)
        .find(|nla: &NlaBuffer<&[u8]>| nla.kind() == TCA_KIND)
        .and_then(|nla| parse_string(nla.value()).ok())?;
    Some((header.index as u32, parent, kind))
}

// ---- the socket

fn open(op: &'static str) -> Result<Socket, ClsactError> {
    let io = |source| ClsactError::Io { op, source };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(io)?;
    sock.bind(&SocketAddr::new(0, 0)).map_err(io)?;
    Ok(sock)
}

/// Reads the answer to a request: calls `each(type, payload)` for every
/// message but the final NLMSG_DONE (a dump) or NLMSG_ERROR (an ack, or the
/// error); returns when one of those arrives.
fn read_answer(
    op: &'static str,
    sock: &Socket,
    mut each: impl FnMut(u16, &[u8]),
) -> Result<(), ClsactError> {
    let io = |source| ClsactError::Io { op, source };
    let mut buf = Vec::with_capacity(RECV_BUF);
    loop {
        buf.clear();
        let n = sock.recv(&mut buf, libc::MSG_TRUNC).map_err(io)?;
        if n > buf.len() {
            return Err(ClsactError::Malformed { op });
        }
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let nl = NetlinkBuffer::new_checked(&buf[off..n])
                .map_err(|_| ClsactError::Malformed { op })?;
            let len = nl.length() as usize;
            match nl.message_type() {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = nl
                        .payload()
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or(ClsactError::Malformed { op })?;
                    return match code {
                        0 => Ok(()),
                        c => Err(ClsactError::Kernel { op, errno: -c }),
                    };
                }
                t => each(t, nl.payload()),
            }
            off += (len + 3) & !3;
        }
    }
}

fn call(op: &'static str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), ClsactError> {
    let sock = open(op)?;
    sock.send_to(
        &request_bytes(msg, NLM_F_ACK | flags, 1),
        &SocketAddr::new(0, 0),
        0,
    )
    .map_err(|source| ClsactError::Io { op, source })?;
    read_answer(op, &sock, |_, _| {})
}

fn dump(
    op: &'static str,
    msg: RouteNetlinkMessage,
    each: impl FnMut(u16, &[u8]),
) -> Result<(), ClsactError> {
    let sock = open(op)?;
    sock.send_to(
        &request_bytes(msg, NLM_F_DUMP, 1),
        &SocketAddr::new(0, 0),
        0,
    )
    .map_err(|source| ClsactError::Io { op, source })?;
    read_answer(op, &sock, each)
}

// ---- operations

/// Every filter on `hook` of interface `ifindex` (none without clsact).
pub fn filters(ifindex: u32, hook: Hook) -> Result<Vec<Filter>, ClsactError> {
    let mut m = TcMessage::default();
    m.header = tc_header(ifindex, hook.parent(), 0, 0);
    let mut out = Vec::new();
    let r = dump(
        "list filters",
        RouteNetlinkMessage::GetTrafficFilter(m),
        |t, p| {
            if t == libc::RTM_NEWTFILTER {
                out.extend(parse_filter(p));
            }
        },
    );
    match r {
        Ok(()) => Ok(out),
        // The interface is gone (or has no qdisc to hold filters).
        Err(e) if matches!(e.errno(), Some(libc::ENODEV | libc::EINVAL)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The qdisc in the clsact slot of every interface that has one.
pub fn slots() -> Result<Vec<(u32, Slot)>, ClsactError> {
    let mut out = Vec::new();
    dump(
        "list qdiscs",
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        |t, p| {
            if t != libc::RTM_NEWQDISC {
                return;
            }
            if let Some((index, parent, kind)) = parse_qdisc(p) {
                if parent == TC_H_CLSACT {
                    let slot = if kind == "clsact" {
                        Slot::Clsact
                    } else {
                        Slot::Other(kind)
                    };
                    out.push((index, slot));
                }
            }
        },
    )?;
    Ok(out)
}

fn slot(ifindex: u32) -> Result<Slot, ClsactError> {
    Ok(slots()?
        .into_iter()
        .find(|(i, _)| *i == ifindex)
        .map(|(_, s)| s)
        .unwrap_or(Slot::Empty))
}

/// Makes sure `link` has a clsact qdisc; true when this call added it. The
/// marker under `dir` is written before the qdisc is added: an agent killed
/// in between leaves a record of a qdisc it may not have added (cleanup then
/// finds no qdisc, or an empty one), never a qdisc it forgot it added.
pub fn ensure_qdisc(dir: &Path, link: &Link) -> Result<bool, ClsactError> {
    for _ in 0..2 {
        match slot(link.index)? {
            Slot::Clsact => return Ok(false),
            Slot::Other(kind) => {
                return Err(ClsactError::OtherQdisc {
                    interface: link.name.clone(),
                    kind,
                })
            }
            Slot::Empty => {
                mark_added(dir, link)?;
                match call(
                    "add clsact qdisc",
                    clsact_request(link.index, true),
                    NLM_F_CREATE | NLM_F_EXCL,
                ) {
                    Ok(()) => return Ok(true),
                    Err(e) => {
                        let _ = std::fs::remove_file(marker_path(dir, link));
                        // Added by someone else meanwhile: look again.
                        if e.errno() != Some(libc::EEXIST) {
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
    Ok(false)
}

fn delete_qdisc(ifindex: u32) -> Result<(), ClsactError> {
    call("delete clsact qdisc", clsact_request(ifindex, false), 0)
}

fn delete(ifindex: u32, hook: Hook, f: &Filter) -> Result<(), ClsactError> {
    match call("delete filter", del_filter_request(ifindex, hook, f), 0) {
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
        r => r,
    }
}

/// Puts `prog_fd` (program `name`) at lb's place on `hook` of `link`: in
/// place of lb's filter when it is there, else as a new filter; then
/// deletes lb's filters anywhere else on the hook. The clsact qdisc must
/// exist ([`ensure_qdisc`]).
pub fn attach(
    link: &Link,
    hook: Hook,
    prog_fd: BorrowedFd<'_>,
    name: &str,
) -> Result<Attached, ClsactError> {
    let before = filters(link.index, hook)?;
    // Our place: lb's filter, or free. A filter of another kind at our
    // priority, or someone else's bpf filter at our handle, is not ours to
    // replace.
    let mut ours = false;
    for f in before.iter().filter(|f| f.chain == 0) {
        if f.priority == PRIORITY && (f.kind != TcFilterBpf::KIND || f.protocol != PROTO_ALL) {
            return Err(ClsactError::PlaceTaken {
                interface: link.name.clone(),
                hook: hook.as_str(),
                what: f.describe(),
            });
        }
        if f.at_lb_place() {
            if !f.is_lb() {
                return Err(ClsactError::PlaceTaken {
                    interface: link.name.clone(),
                    hook: hook.as_str(),
                    what: f.describe(),
                });
            }
            ours = true;
        }
    }
    let fd = prog_fd.as_raw_fd() as u32;
    let mut replaced = false;
    if ours {
        let (msg, flags) = new_filter_request(link.index, hook, fd, name, true);
        match call("replace filter", msg, flags) {
            Ok(()) => replaced = true,
            // Deleted meanwhile: create it below.
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    if !replaced {
        let (msg, flags) = new_filter_request(link.index, hook, fd, name, false);
        call("add filter", msg, flags)?;
    }
    let mut strays_removed = 0;
    for f in filters(link.index, hook)?
        .iter()
        .filter(|f| f.is_lb() && !f.at_lb_place())
    {
        info!(interface = %link.name, hook = hook.as_str(), pref = f.priority, handle = f.handle,
            program = f.name.as_deref().unwrap_or(""), "deleting a second lb filter (an older agent's)");
        delete(link.index, hook, f)?;
        strays_removed += 1;
    }
    Ok(Attached {
        replaced,
        strays_removed,
    })
}

/// Deletes every lb filter on `hook` of `ifindex`; how many there were.
pub fn detach(ifindex: u32, hook: Hook) -> Result<usize, ClsactError> {
    let lb: Vec<Filter> = filters(ifindex, hook)?
        .into_iter()
        .filter(Filter::is_lb)
        .collect();
    for f in &lb {
        delete(ifindex, hook, f)?;
    }
    Ok(lb.len())
}

// ---- the markers

fn marker_name(link: &Link) -> String {
    // bpffs refuses names with dots.
    format!("{}-{}", link.index, link.name.replace('.', "_"))
}

fn marker_path(dir: &Path, link: &Link) -> PathBuf {
    dir.join(QDISC_MARKERS_DIR).join(marker_name(link))
}

/// Records that lb added `link`'s clsact qdisc.
fn mark_added(dir: &Path, link: &Link) -> Result<(), ClsactError> {
    let path = marker_path(dir, link);
    let err = |source| ClsactError::Marker {
        path: path.display().to_string(),
        source,
    };
    match std::os::unix::fs::symlink(MARKER_TARGET, &path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

fn marked(dir: &Path, link: &Link) -> bool {
    std::fs::symlink_metadata(marker_path(dir, link)).is_ok()
}

/// Takes lb off `link` (an interface no longer wanted, or cleanup): deletes
/// lb's filters on both hooks, then the clsact qdisc if lb added it and no
/// other filter is left on it. A missing interface is not an error.
pub fn release(dir: &Path, link: &Link) -> Result<(), ClsactError> {
    let mut removed = 0;
    for hook in Hook::BOTH {
        removed += detach(link.index, hook)?;
    }
    if removed > 0 {
        info!(interface = %link.name, filters = removed, "deleted lb's clsact filters");
    }
    if marked(dir, link) {
        remove_qdisc_if_unused(dir, link)?;
    }
    Ok(())
}

/// Deletes `link`'s clsact qdisc (which lb added) unless a filter is left
/// on it; removes the marker either way once lb has no filter there.
fn remove_qdisc_if_unused(dir: &Path, link: &Link) -> Result<(), ClsactError> {
    let mut left = Vec::new();
    for hook in Hook::BOTH {
        left.extend(filters(link.index, hook)?);
    }
    if left.iter().any(Filter::is_lb) {
        return Ok(()); // still in use by lb
    }
    if left.is_empty() {
        if slot(link.index)? == Slot::Clsact {
            match delete_qdisc(link.index) {
                Ok(()) => info!(interface = %link.name, "deleted the clsact qdisc lb added"),
                Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => {
                }
                Err(e) => return Err(e),
            }
        }
    } else {
        warn!(interface = %link.name, filters = left.len(),
            "keeping the clsact qdisc lb added: other filters are attached to it now");
    }
    let path = marker_path(dir, link);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ClsactError::Marker {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The interface a marker file name stands for, if it is one of `current`.
fn marker_link<'a>(file: &str, current: &'a [Link]) -> Option<&'a Link> {
    current.iter().find(|l| marker_name(l) == file)
}

/// Removes markers of interfaces that are gone (their qdisc went with them).
pub fn remove_stale_markers(dir: &Path, current: &[Link]) {
    let Ok(entries) = std::fs::read_dir(dir.join(QDISC_MARKERS_DIR)) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(file) = file.to_str() else { continue };
        if marker_link(file, current).is_none() {
            debug!(
                marker = file,
                "removing the qdisc marker of an interface that is gone"
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `lb-agent --cleanup`, in the current network namespace: lb's filters
/// off every interface, the clsact qdiscs lb added (and nobody else uses)
/// deleted, and the markers with them.
pub fn cleanup(dir: &Path, links: &[Link]) -> Result<(), ClsactError> {
    let with_clsact: BTreeSet<u32> = slots()?
        .into_iter()
        .filter(|(_, s)| *s == Slot::Clsact)
        .map(|(i, _)| i)
        .collect();
    for link in links.iter().filter(|l| with_clsact.contains(&l.index)) {
        release(dir, link)?;
    }
    // What is left: markers of interfaces that are gone or lost their qdisc.
    let markers = dir.join(QDISC_MARKERS_DIR);
    if let Ok(entries) = std::fs::read_dir(&markers) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        if let Err(e) = std::fs::remove_dir(&markers) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(ClsactError::Marker {
                    path: markers.display().to_string(),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dataplane::test_support::rtattr;

    /// A tcmsg: family, pad, ifindex, handle, parent, info.
    fn tcmsg(ifindex: i32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
        let mut v = vec![0u8; 4];
        v.extend_from_slice(&ifindex.to_ne_bytes());
        v.extend_from_slice(&handle.to_ne_bytes());
        v.extend_from_slice(&parent.to_ne_bytes());
        v.extend_from_slice(&info.to_ne_bytes());
        v
    }

    /// What the kernel sends for `tc filter show` of a cls_bpf filter.
    fn kernel_bpf_filter(prio: u16, handle: u32, name: &str, id: u32) -> Vec<u8> {
        let mut p = tcmsg(
            7,
            handle,
            Hook::Ingress.parent(),
            filter_info(prio, PROTO_ALL),
        );
        p.extend(rtattr(TCA_KIND, b"bpf\0"));
        p.extend(rtattr(TCA_CHAIN, &0u32.to_ne_bytes()));
        let mut opts = Vec::new();
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        opts.extend(rtattr(7, &n)); // TCA_BPF_NAME
        opts.extend(rtattr(8, &1u32.to_ne_bytes())); // TCA_BPF_FLAGS: direct-action
        opts.extend(rtattr(10, &[0xab; 8])); // TCA_BPF_TAG
        opts.extend(rtattr(11, &id.to_ne_bytes())); // TCA_BPF_ID
        opts.extend(rtattr(99, &[1, 2, 3])); // something newer than the crate
        p.extend(rtattr(TCA_OPTIONS, &opts));
        // Stats the crate may or may not parse: must not matter.
        p.extend(rtattr(7, &[0xff; 3])); // TCA_STATS2, truncated
        p
    }

    #[test]
    fn parses_lb_filter_from_kernel_bytes() {
        let f = parse_filter(&kernel_bpf_filter(1, 0x4c42, "lb_pod_ingress", 42)).unwrap();
        assert_eq!(
            f,
            Filter {
                priority: 1,
                protocol: PROTO_ALL,
                handle: 0x4c42,
                chain: 0,
                kind: "bpf".into(),
                name: Some("lb_pod_ingress".into()),
                prog_id: Some(42),
                direct_action: true,
            }
        );
        assert!(f.is_lb() && f.at_lb_place());

        // An older agent's (aya's automatic priority and handle): lb's, but
        // not at lb's place.
        let old = parse_filter(&kernel_bpf_filter(49152, 1, "lb_uplink_egress", 7)).unwrap();
        assert!(old.is_lb() && !old.at_lb_place());

        // Someone else's bpf filter at lb's place.
        let other = parse_filter(&kernel_bpf_filter(1, 0x4c42, "cil_from_netdev", 9)).unwrap();
        assert!(!other.is_lb() && other.at_lb_place());
    }

    #[test]
    fn per_priority_headers_and_other_kinds() {
        // The message a dump sends per priority, before its filters: no handle.
        let mut head = tcmsg(7, 0, Hook::Egress.parent(), filter_info(1, PROTO_ALL));
        head.extend(rtattr(TCA_KIND, b"bpf\0"));
        assert_eq!(parse_filter(&head), None);

        // A u32 filter at priority 1: not lb's, and its options are not read.
        let mut u = tcmsg(
            7,
            0x800_0800,
            Hook::Egress.parent(),
            filter_info(1, PROTO_ALL),
        );
        u.extend(rtattr(TCA_KIND, b"u32\0"));
        u.extend(rtattr(TCA_OPTIONS, &rtattr(7, b"lb_pod_ingress\0")));
        let f = parse_filter(&u).unwrap();
        assert_eq!((f.kind.as_str(), f.priority, f.name), ("u32", 1, None));
        assert!(!parse_filter(&u).unwrap().is_lb());

        // Truncated or kindless: nothing.
        assert_eq!(parse_filter(&[0u8; 10]), None);
        assert_eq!(parse_filter(&tcmsg(7, 5, 0, 0)), None);
    }

    #[test]
    fn requests_carry_lbs_place_and_the_right_flags() {
        let (msg, flags) = new_filter_request(7, Hook::Egress, 13, "lb_pod_egress", true);
        assert_eq!(flags, NLM_F_REPLACE, "replace in place: no create, no excl");
        let bytes = request_bytes(msg, NLM_F_ACK | flags, 1);
        let nl = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(nl.message_type(), libc::RTM_NEWTFILTER);
        assert_eq!(nl.flags(), NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE);
        let p = nl.payload();
        let h = TcHeader::parse(p).unwrap();
        assert_eq!(h.index, 7);
        assert_eq!(h.parent, TcHandle::from(0xFFFF_FFF3));
        assert_eq!(h.handle, TcHandle::from(HANDLE));
        assert_eq!(h.info, 0x0001_0000 | u32::from(PROTO_ALL));
        // Parses back as lb's filter (the fd attribute is ignored).
        let f = parse_filter(p).unwrap();
        assert_eq!(f.name.as_deref(), Some("lb_pod_egress"));
        assert!(f.direct_action && f.is_lb() && f.at_lb_place());
        // The fd is in the options.
        let opts = NlasIterator::new(&p[20..])
            .map_while(Result::ok)
            .find(|n| n.kind() == TCA_OPTIONS)
            .unwrap();
        let fd = NlasIterator::new(opts.value())
            .map_while(Result::ok)
            .find_map(|n| match TcFilterBpfOption::parse(&n) {
                Ok(TcFilterBpfOption::ProgFd(fd)) => Some(fd),
                _ => None,
            });
        assert_eq!(fd, Some(13));

        let (_, flags) = new_filter_request(7, Hook::Ingress, 13, "lb_pod_ingress", false);
        assert_eq!(
            flags,
            NLM_F_CREATE | NLM_F_EXCL,
            "never overwrite on create"
        );
    }

    #[test]
    fn qdisc_requests_and_replies() {
        let bytes = request_bytes(clsact_request(3, true), NLM_F_ACK, 1);
        let nl = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(nl.message_type(), libc::RTM_NEWQDISC);
        assert_eq!(
            parse_qdisc(nl.payload()),
            Some((3, TC_H_CLSACT, "clsact".into()))
        );
        let mut ingress = tcmsg(4, CLSACT_HANDLE, TC_H_CLSACT, 1);
        ingress.extend(rtattr(TCA_KIND, b"ingress\0"));
        assert_eq!(
            parse_qdisc(&ingress),
            Some((4, TC_H_CLSACT, "ingress".into()))
        );
    }

    #[test]
    fn marker_names_follow_the_interface() {
        let l = Link {
            index: 5,
            name: "eth0.100".into(),
        };
        assert_eq!(marker_name(&l), "5-eth0_100");
        let current = [l.clone()];
        assert_eq!(marker_link("5-eth0_100", &current), Some(&l));
        assert_eq!(marker_link("6-eth0_100", &current), None);
        assert_eq!(marker_link("garbage", &current), None);
    }

    // ---- live, in a private network namespace (root only)

    use crate::dataplane::test_support::in_new_netns;

    fn sh(cmd: &str) {
        let st = std::process::Command::new("sh")
            .args(["-c", cmd])
            .status()
            .expect("run sh");
        assert!(st.success(), "{cmd}: {st}");
    }

    /// A SCHED_CLS program `r0 = -1 (TC_ACT_UNSPEC); exit`, loaded with
    /// BPF_PROG_LOAD.
    fn load_pass_program() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm -1; BPF_JMP | BPF_EXIT.
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
        }
        let attr = ProgLoad {
            prog_type: 3, // BPF_PROG_TYPE_SCHED_CLS
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
        };
        // SAFETY: a valid bpf_attr prefix for BPF_PROG_LOAD (5).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                5,
                std::ptr::from_ref(&attr),
                std::mem::size_of::<ProgLoad>(),
            )
        };
        assert!(fd >= 0, "BPF_PROG_LOAD: {}", io::Error::last_os_error());
        // SAFETY: a new descriptor we own.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
    }

    fn lb_filters(link: &Link, hook: Hook) -> Vec<Filter> {
        filters(link.index, hook)
            .unwrap()
            .into_iter()
            .filter(Filter::is_lb)
            .collect()
    }

    /// Adds a bpf filter named `name` at (priority, handle), as another
    /// tool or an older agent would.
    fn add_bpf_filter(
        link: &Link,
        hook: Hook,
        prog: BorrowedFd<'_>,
        name: &str,
        prio: u16,
        handle: u32,
    ) {
        let (msg, flags) =
            new_filter_request(link.index, hook, prog.as_raw_fd() as u32, name, false);
        let RouteNetlinkMessage::NewTrafficFilter(mut m) = msg else {
            unreachable!()
        };
        m.header.handle = TcHandle::from(handle);
        m.header.info = filter_info(prio, PROTO_ALL);
        call(
            "add filter",
            RouteNetlinkMessage::NewTrafficFilter(m),
            flags,
        )
        .unwrap();
    }

    /// The whole life of lb's clsact filters on a veth: the qdisc added and
    /// marked, a filter created, its program replaced in place (same place,
    /// new program id, still one filter), an older agent's filter removed,
    /// someone else's filter at lb's place refused, and removal that leaves
    /// the interface as it was (or keeps a qdisc another filter uses).
    #[test]
    fn live_attach_replace_and_release() {
        in_new_netns("live_attach_replace_and_release", || {
            use std::os::fd::AsFd;
            sh("ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up");
            let links = crate::dataplane::netlink::list_links().unwrap();
            let link = |n: &str| links.iter().find(|l| l.name == n).unwrap().clone();
            let (d0, d1) = (link("d0"), link("d1"));
            let dir = std::env::temp_dir().join(format!("lb-clsact-test-{}", std::process::id()));
            std::fs::create_dir_all(dir.join(QDISC_MARKERS_DIR)).unwrap();

            assert_eq!(slot(d0.index).unwrap(), Slot::Empty);
            assert!(ensure_qdisc(&dir, &d0).unwrap(), "added");
            assert!(marked(&dir, &d0));
            assert!(!ensure_qdisc(&dir, &d0).unwrap(), "there already");
            assert_eq!(slot(d0.index).unwrap(), Slot::Clsact);

            let (a, b) = (load_pass_program(), load_pass_program());
            let name = program_names::POD_INGRESS;
            let first = attach(&d0, Hook::Ingress, a.as_fd(), name).unwrap();
            assert_eq!(
                first,
                Attached {
                    replaced: false,
                    strays_removed: 0
                }
            );
            let one = lb_filters(&d0, Hook::Ingress);
            assert_eq!(one.len(), 1, "{one:?}");
            assert!(one[0].at_lb_place() && one[0].direct_action);
            let old_id = one[0].prog_id.unwrap();

            let again = attach(&d0, Hook::Ingress, b.as_fd(), name).unwrap();
            assert_eq!(
                again,
                Attached {
                    replaced: true,
                    strays_removed: 0
                }
            );
            let one = lb_filters(&d0, Hook::Ingress);
            assert_eq!(one.len(), 1, "{one:?}");
            assert!(one[0].at_lb_place());
            assert_ne!(one[0].prog_id.unwrap(), old_id, "new program in place");

            // An older agent's filter at aya's automatic place goes.
            add_bpf_filter(&d0, Hook::Ingress, a.as_fd(), name, 49152, 1);
            assert_eq!(lb_filters(&d0, Hook::Ingress).len(), 2);
            let r = attach(&d0, Hook::Ingress, a.as_fd(), name).unwrap();
            assert_eq!(
                r,
                Attached {
                    replaced: true,
                    strays_removed: 1
                }
            );
            assert_eq!(lb_filters(&d0, Hook::Ingress).len(), 1);

            // Someone else's at lb's place, or another kind at lb's
            // priority: refused, and left alone.
            add_bpf_filter(&d0, Hook::Egress, a.as_fd(), "other_prog", PRIORITY, HANDLE);
            let e = attach(&d0, Hook::Egress, b.as_fd(), program_names::POD_EGRESS).unwrap_err();
            assert!(matches!(e, ClsactError::PlaceTaken { .. }), "{e}");
            assert!(e.to_string().contains("other_prog"), "{e}");
            sh("tc filter del dev d0 egress pref 1");
            sh("tc filter add dev d0 egress pref 1 protocol all u32 match u32 0 0 classid 1:1");
            let e = attach(&d0, Hook::Egress, b.as_fd(), program_names::POD_EGRESS).unwrap_err();
            assert!(e.to_string().contains("u32"), "{e}");
            sh("tc filter del dev d0 egress pref 1");
            attach(&d0, Hook::Egress, b.as_fd(), program_names::POD_EGRESS).unwrap();

            // Release: no lb filter, and the qdisc lb added is gone.
            release(&dir, &d0).unwrap();
            assert!(lb_filters(&d0, Hook::Ingress).is_empty());
            assert!(lb_filters(&d0, Hook::Egress).is_empty());
            assert_eq!(slot(d0.index).unwrap(), Slot::Empty);
            assert!(!marked(&dir, &d0));

            // A qdisc lb added but another filter now uses: kept.
            assert!(ensure_qdisc(&dir, &d0).unwrap());
            attach(&d0, Hook::Ingress, a.as_fd(), name).unwrap();
            sh("tc filter add dev d0 egress pref 5 protocol all u32 match u32 0 0 classid 1:1");
            release(&dir, &d0).unwrap();
            assert!(lb_filters(&d0, Hook::Ingress).is_empty());
            assert_eq!(slot(d0.index).unwrap(), Slot::Clsact);
            assert!(filters(d0.index, Hook::Egress)
                .unwrap()
                .iter()
                .all(|f| f.kind == "u32"));
            assert!(!marked(&dir, &d0));

            // A qdisc lb did not add: never deleted.
            sh("tc filter del dev d0 egress pref 5");
            attach(&d0, Hook::Ingress, a.as_fd(), name).unwrap();
            release(&dir, &d0).unwrap();
            assert_eq!(slot(d0.index).unwrap(), Slot::Clsact);

            // An `ingress` qdisc is not clsact.
            sh("tc qdisc add dev d1 ingress");
            let e = ensure_qdisc(&dir, &d1).unwrap_err();
            assert!(matches!(e, ClsactError::OtherQdisc { .. }), "{e}");
            assert!(!marked(&dir, &d1));

            // Cleanup of the namespace: lb's filters off every interface.
            attach(&d0, Hook::Egress, a.as_fd(), program_names::POD_EGRESS).unwrap();
            cleanup(&dir, &links).unwrap();
            assert!(lb_filters(&d0, Hook::Egress).is_empty());
            assert!(!dir.join(QDISC_MARKERS_DIR).exists());
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}
