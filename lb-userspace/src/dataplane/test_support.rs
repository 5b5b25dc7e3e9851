//! Helpers of the dataplane unit tests: a network namespace of their own
//! (root only), netlink attributes built by hand.

use std::io;

/// Runs `f` on a thread of its own inside a new network namespace (so the
/// host's is never touched; threads and processes it starts inherit it).
/// Needs root: skipped without, unless `LB_REQUIRE_PRIVILEGED=1` (CI) makes
/// that a failure.
pub(crate) fn in_new_netns(test: &str, f: impl FnOnce() + Send + 'static) {
    let required = std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!required, "{test}: needs root");
        eprintln!("SKIPPED {test}: needs root");
        return;
    }
    let res = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) changes only this thread's namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            assert!(!required, "unshare(CLONE_NEWNET): {e}");
            eprintln!("SKIPPED: unshare(CLONE_NEWNET): {e}");
            return;
        }
        f();
    })
    .join();
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// A netlink attribute (rtattr): length, type, payload, padding to 4 bytes.
pub(crate) fn rtattr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(payload);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}
