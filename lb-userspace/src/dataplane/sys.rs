//! The few bpf(2) commands aya 0.14 has no call for, in one place. Each is
//! a plain syscall with a `union bpf_attr` prefix laid out as the kernel's
//! include/uapi/linux/bpf.h defines it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::maps::MapData;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Most elements per BPF_MAP_UPDATE_BATCH call.
const BATCH: usize = 4096;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size
    // passed; the kernel reads it and may write back into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_OBJ_GET: a descriptor for the object pinned at `pin`.
pub fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // obj_get: pathname (u64), bpf_fd (u32), file_flags (u32).
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_DETACH: detaches a link at once. Dropping the last reference
/// also detaches, but only after an RCU grace period and a deferred work
/// item: traffic would still be translated for a moment.
pub fn link_detach(link: &OwnedFd) -> io::Result<()> {
    // link_detach: link_fd (u32).
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
        _pad: u32,
    }
    let mut attr = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
        _pad: 0,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// BPF_LINK_UPDATE: puts `prog` into `link` atomically, in place of
/// whatever program it runs (aya 0.14 has this only for TCX links; cgroup
/// links support it since 5.7). The program must have the link's attach
/// type.
pub fn link_update(link: &OwnedFd, prog: BorrowedFd<'_>) -> io::Result<()> {
    // link_update: link_fd, new_prog_fd, flags, old_prog_fd (u32 each).
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// BPF_MAP_UPDATE_BATCH (kernel 5.6+): one syscall for many elements of one
/// hash map (the initial program of a big cluster is hundreds of thousands
/// of writes). `keys` and `values` hold exactly the map's key and value
/// types (the lb-common types are).
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    // batch: in_batch, out_batch, keys, values (u64 each), count, map_fd
    // (u32), elem_flags, flags (u64).
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    for (ks, vs) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        let mut attr = Batch {
            in_batch: 0,
            out_batch: 0,
            keys: ks.as_ptr() as u64,
            values: vs.as_ptr() as u64,
            count: ks.len() as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// BPF_MAP_LOOKUP_BATCH (hash and LRU hash maps, kernel 5.6+): every
/// element of a map, `batch` elements per syscall (instead of two syscalls
/// per element with get_next_key + lookup). A snapshot like a walk: elements
/// inserted or deleted meanwhile may or may not be in it. `K` and `V` are
/// exactly the map's key and value types.
pub fn map_lookup_all<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    batch: usize,
) -> io::Result<Vec<(K, V)>> {
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut batch = batch.max(1);
    let mut out = Vec::new();
    // The position token (a bucket index, u32, for hash maps); 8 bytes to
    // be safe.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        // SAFETY: K and V are Pod: zeroed values are valid.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; batch];
        // SAFETY: as above.
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; batch];
        let mut attr = Batch {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(batch).unwrap_or(u32::MAX),
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let rc = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(batch);
        match rc {
            Ok(_) => {}
            // The end of the map: `count` elements were still copied.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values).take(n));
                return Ok(out);
            }
            // One bucket holds more elements than `batch`: retry it with
            // room for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                batch *= 2;
                continue;
            }
            Err(e) => return Err(e),
        }
        out.extend(keys.into_iter().zip(values).take(n));
        token_in = token_out;
        first = false;
    }
}
