//! Decides whether a privileged test may run here.
//!
//! On a laptop without root the privileged tests skip with a message; with
//! `LB_REQUIRE_PRIVILEGED=1` (set by `.ci/run`) a missing privilege fails the test
//! instead, so CI can never pass vacuously.
//!
//! Every privileged test starts with [`require_privileges!`](crate::require_privileges):
//!
//! ```no_run
//! #[test]
//! fn f1_cluster_ip_from_pod() {
//!     lb_tests::require_privileges!();
//!     // ... build a topology, load the datapath ...
//! }
//! ```

use std::path::Path;

/// True when the process can load BPF programs and create network namespaces
/// (we require uid 0: CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN all come with it here).
pub fn have_privileges() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/sys/kernel/btf/vmlinux").exists()
}

pub fn privileges_required() -> bool {
    std::env::var("LB_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// Returns true if `test` may run. Returns false (after printing why) when it
/// should skip. Panics when privileges are missing but required.
pub fn privileged(test: &str) -> bool {
    if have_privileges() {
        return true;
    }
    if privileges_required() {
        panic!(
            "{test}: needs root with BPF and network namespaces, and LB_REQUIRE_PRIVILEGED=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root with BPF and network namespaces (set LB_REQUIRE_PRIVILEGED=1 to make this a failure)");
    false
}

/// The guard of a privileged test, its first statement: returns from the
/// test (it skips, saying so) when this process lacks the privileges, and
/// fails it instead when `LB_REQUIRE_PRIVILEGED=1`. See [`privileged`].
#[macro_export]
macro_rules! require_privileges {
    () => {
        if !$crate::privilege::privileged($crate::test_name!()) {
            return;
        }
    };
}

/// The name of the function it is used in, without its module path
/// (`datapath::f1_...` gives `f1_...`): a test's name for messages and
/// temporary paths, written once.
#[macro_export]
macro_rules! test_name {
    () => {{
        // The type name of a function item nested here is the path of the
        // enclosing function plus `::here` (std does not promise that format;
        // a unit test below pins it).
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (a fresh machine has none).
pub fn ensure_bpffs() -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split(' ');
        let mount_point = f.nth(4);
        let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
        mount_point == Some("/sys/fs/bpf") && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf")?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other("mount -t bpf bpf /sys/fs/bpf failed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_name_is_the_enclosing_function() {
        assert_eq!(crate::test_name!(), "test_name_is_the_enclosing_function");
    }
}
