//! What the agent exposes and trusts on a node: its pins are root's alone,
//! pin directories that others could tamper with are refused, and its
//! metrics listen on localhost only.
//!
//! Every test builds its own topology (or namespace); dropping it removes
//! everything, also when the test fails.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::artifacts;
use lb_tests::netns::NamedNetns;
use lb_tests::objects::manifest;
use lb_tests::require_privileges;
use lb_tests::topology::Topology;

fn one_node() -> Topology {
    Topology::builder()
        .node("node1", &["client1"])
        .without_external_client()
        .build()
        .expect("building the topology")
}

/// Waits until the agent has pinned its maps under `dir`.
fn wait_for_pins(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join(lb_common::map_names::SERVICES).exists() {
        assert!(Instant::now() < deadline, "no pins under {}", dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `argv` as the unprivileged user `nobody`; true when it succeeded.
fn as_nobody(argv: &[&str]) -> bool {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .output()
        .expect("running setpriv")
        .status
        .success()
}

#[test]
fn pins_are_root_only_and_nobody_else_can_read_or_unlink_them() {
    require_privileges!();
    let t = one_node();
    t.start_agents(&manifest(&[])).unwrap();
    let dir = t.node("node1").bpffs.clone();
    wait_for_pins(&dir);
    let links = dir.join("links");
    for d in [&dir, &links] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{}: mode {mode:04o}", d.display());
    }
    let mut pins: Vec<PathBuf> = Vec::new();
    for d in [&dir, &links] {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                pins.push(p);
            }
        }
    }
    assert!(pins.len() > 10, "{pins:?}");
    for p in &pins {
        let meta = std::fs::metadata(p).unwrap();
        assert_eq!(meta.uid(), 0, "{}", p.display());
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "{}: mode {:04o}",
            p.display(),
            meta.mode() & 0o7777
        );
    }
    // An unprivileged user can neither read a map nor unlink it, and cannot
    // even list the directory.
    let services = dir.join(lb_common::map_names::SERVICES);
    let services_s = services.to_string_lossy();
    assert!(!as_nobody(&["cat", &services_s]));
    assert!(!as_nobody(&["rm", "-f", &services_s]));
    assert!(services.exists());
    let dir_s = dir.to_string_lossy();
    assert!(!as_nobody(&["ls", &dir_s]));
    // Nor through bpftool (BPF_OBJ_GET needs access to the pin).
    assert!(!as_nobody(&[
        "bpftool",
        "map",
        "dump",
        "pinned",
        &services_s
    ]));
}

/// Starts the agent in a namespace of its own with `--bpffs dir`; returns its
/// exit status and output once it exits (it must: the directory is refused).
fn agent_refuses(dir: &Path) -> String {
    let ns = NamedNetns::create(&format!("lbt{}-sec", std::process::id())).unwrap();
    let manifest_path = std::env::temp_dir().join(format!("lbt{}-sec.yaml", std::process::id()));
    std::fs::write(&manifest_path, "").unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg("--")
        .arg(artifacts::lb_agent_bin())
        .arg("--manifest")
        .arg(&manifest_path)
        .args(["--node-name", "n1", "--no-socket-lb", "--bpffs"])
        .arg(dir)
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("running lb-agent");
    let _ = std::fs::remove_file(&manifest_path);
    assert!(
        !out.status.success(),
        "the agent started with {}",
        dir.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_pin_directory_others_own_or_may_write_to_is_refused() {
    require_privileges!();
    lb_tests::privilege::ensure_bpffs().unwrap();
    let dir = PathBuf::from(format!("/sys/fs/bpf/lbt{}-insecure", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cleanup = scopeguard(&dir);

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = agent_refuses(&dir);
    assert!(
        err.contains("refusing pin directory") && err.contains("writable by group or others"),
        "{err}"
    );

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let err = agent_refuses(&dir);
    assert!(
        err.contains("refusing pin directory") && err.contains("owned by uid 65534"),
        "{err}"
    );
    // Nothing was pinned into either.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    drop(cleanup);
}

/// Removes a directory when dropped (also when the test panics).
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scopeguard(dir: &Path) -> RemoveDir {
    RemoveDir(dir.to_path_buf())
}

#[test]
fn metrics_listen_on_localhost_by_default() {
    require_privileges!();
    let t = one_node();
    t.start_agents(&manifest(&[])).unwrap();
    wait_for_pins(&t.node("node1").bpffs);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listening = t.sh("node1", "ss -ltnH").unwrap();
        if listening.contains(":10249") {
            assert!(
                listening.contains("127.0.0.1:10249"),
                "metrics must listen on localhost only: {listening}"
            );
            assert!(!listening.contains("0.0.0.0:10249"), "{listening}");
            assert!(!listening.contains("*:10249"), "{listening}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics listener: {listening}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
