//! The agent's container image, built and run here (issue 9, item 9).
//!
//! `cargo xtask image` builds it with podman (vfs storage, no daemon, nothing
//! pulled), or `LB_IMAGE=NAME` names one built before (the test then leaves
//! it in place). The test mounts the image (`podman image mount`: `podman
//! run` cannot set the rlimits it wants in this sandbox), checks that it
//! holds the two binaries and the CA bundle and nothing else, runs the
//! image's own `lb-agent --version` and `lbctl --help` with chroot into its
//! root filesystem, checks that they are static, checks the image's
//! entrypoint against the Dockerfile's, and finally starts the agents of a
//! two-node topology from the image's `lb-agent` (and reads the maps with
//! the image's `lbctl`): real traffic from a client pod to a ClusterIP and
//! from the external client to a NodePort goes through them.
//!
//! The mount and the image built here are removed when the test ends, also
//! when it fails.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::artifacts::workspace_root;
use lb_tests::objects::{endpoint_slice, manifest, service, Endpoint, ServicePort, ServiceType};
use lb_tests::require_privileges;
use lb_tests::topology::{Frontend, Topology};

/// podman's global flags, those of `cargo xtask image` (xtask/src/image.rs).
const PODMAN_FLAGS: &[&str] = &["--storage-driver", "vfs"];
/// The repository of the images this test builds (`:test-<pid>`).
const TEST_REPOSITORY: &str = "localhost/lb-agent";
/// Bound of `cargo xtask image` (a cold musl release build is about 3 min on
/// 2 cores; warm, seconds).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const WARMUP: Duration = Duration::from_secs(10);

/// Exactly what the image holds: (path, is a directory, mode).
const EXPECTED_TREE: &[(&str, bool, u32)] = &[
    ("etc", true, 0o755),
    ("etc/ssl", true, 0o755),
    ("etc/ssl/certs", true, 0o755),
    ("etc/ssl/certs/ca-certificates.crt", false, 0o644),
    ("usr", true, 0o755),
    ("usr/local", true, 0o755),
    ("usr/local/bin", true, 0o755),
    ("usr/local/bin/lb-agent", false, 0o755),
    ("usr/local/bin/lbctl", false, 0o755),
];
const AGENT_IN_IMAGE: &str = "usr/local/bin/lb-agent";
const LBCTL_IN_IMAGE: &str = "usr/local/bin/lbctl";

fn podman(args: &[&str]) -> Command {
    let mut c = Command::new("podman");
    c.args(PODMAN_FLAGS).args(args).stdin(Stdio::null());
    c
}

/// Runs podman; stdout on success, an error with stderr otherwise.
fn podman_out(args: &[&str]) -> Result<String, String> {
    let out = podman(args)
        .output()
        .map_err(|e| format!("cannot run podman: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "podman {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The image under test: unmounted when dropped, and removed when this
/// test built it.
struct Image {
    name: String,
    built_here: bool,
    mounted: bool,
}

impl Image {
    /// `LB_IMAGE`, or a new `localhost/lb-agent:test-<pid>` from `cargo xtask image`.
    fn obtain() -> Image {
        if let Some(name) = std::env::var("LB_IMAGE").ok().filter(|s| !s.is_empty()) {
            eprintln!("image: {name} (LB_IMAGE, built before)");
            podman_out(&["image", "exists", &name])
                .unwrap_or_else(|e| panic!("LB_IMAGE={name} is not in podman's storage: {e}"));
            return Image {
                name,
                built_here: false,
                mounted: false,
            };
        }
        remove_stale_test_images();
        let name = format!("{TEST_REPOSITORY}:test-{}", std::process::id());
        // From here on the guard removes whatever the build left.
        let image = Image {
            name,
            built_here: true,
            mounted: false,
        };
        build_with_xtask(&image.name);
        image
    }

    /// `podman image mount`: the image's root filesystem.
    fn mount(&mut self) -> PathBuf {
        let out = podman_out(&["image", "mount", &self.name]).unwrap_or_else(|e| panic!("{e}"));
        self.mounted = true;
        let path = PathBuf::from(out.trim());
        assert!(path.is_dir(), "podman image mount printed {out:?}");
        path
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = podman_out(&["image", "unmount", &self.name]) {
                eprintln!("warning: {e}");
            }
        }
        if self.built_here {
            // Also when the build failed half-way: nothing to remove then.
            if podman_out(&["image", "exists", &self.name]).is_ok() {
                if let Err(e) = podman_out(&["image", "rm", &self.name]) {
                    eprintln!("warning: {e}");
                }
            }
        }
    }
}

/// Images `:test-<pid>` of runs that died without cleaning up (SIGKILL).
fn remove_stale_test_images() {
    let Ok(list) = podman_out(&["images", "--format", "{{.Repository}}:{{.Tag}}"]) else {
        return;
    };
    let prefix = format!("{TEST_REPOSITORY}:test-");
    for name in list.lines().map(str::trim) {
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing the stale test image {name}");
        let _ = podman_out(&["image", "unmount", name]);
        let _ = podman_out(&["image", "rm", name]);
    }
}

/// `cargo xtask image --tag NAME` from the workspace root, bounded; its
/// output goes to a log file printed (its end) when it fails.
fn build_with_xtask(name: &str) {
    let log_path = std::env::temp_dir().join(format!("lb-image-build-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
    let log_err = log.try_clone().expect("dup of the log file");
    let started = Instant::now();
    eprintln!(
        "image: cargo xtask image --tag {name} (log: {})",
        log_path.display()
    );
    let mut child = Command::new("cargo")
        .args(["xtask", "image", "--tag", name])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a timeout kills the whole build.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run cargo xtask image: {e}"));
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > BUILD_TIMEOUT => {
                // SAFETY: kill(2) of the process group we created.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => panic!("waiting for cargo xtask image: {e}"),
        }
    };
    let mut text = String::new();
    let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
    let _ = std::fs::remove_file(&log_path);
    let tail: Vec<&str> = text.lines().rev().take(60).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    match status {
        Some(s) if s.success() => eprintln!(
            "image: built {name} in {:.0}s",
            started.elapsed().as_secs_f64()
        ),
        Some(s) => panic!("`cargo xtask image --tag {name}` failed ({s}); its output ends with:\n{tail}"),
        None => panic!("`cargo xtask image --tag {name}` did not finish within {BUILD_TIMEOUT:?}; its output ends with:\n{tail}"),
    }
}

/// Every entry under `root` (not following links): (relative path, is a
/// directory, permission bits, kind for messages).
fn tree(root: &Path) -> Vec<(String, bool, u32, &'static str)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display()));
        for e in entries {
            let p = e.expect("a directory entry").path();
            let md = std::fs::symlink_metadata(&p).expect("metadata");
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                dirs.push(p.clone());
                "directory"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "special file"
            };
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            assert_eq!(
                (md.uid(), md.gid()),
                (0, 0),
                "/{rel} is owned by root in the image"
            );
            out.push((rel, ft.is_dir(), md.permissions().mode() & 0o7777, kind));
        }
    }
    out.sort();
    out
}

/// PT_INTERP and DT_NEEDED of a little-endian ELF64 executable: (the
/// interpreter, how many shared libraries it needs).
fn elf_dynamic_needs(elf: &[u8]) -> (Option<String>, usize) {
    assert!(
        elf.len() > 64 && elf.starts_with(b"\x7fELF\x02\x01"),
        "not a little-endian ELF64 file"
    );
    let u64_at = |o: usize| -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let u32_at = |o: usize| u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]);
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let (mut interp, mut needed) = (None, 0);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (off, size) = (u64_at(ph + 8) as usize, u64_at(ph + 32) as usize);
        match u32_at(ph) {
            // PT_INTERP
            3 => {
                interp = Some(
                    String::from_utf8_lossy(&elf[off..off + size])
                        .trim_end_matches('\0')
                        .to_string(),
                )
            }
            // PT_DYNAMIC: (d_tag, d_val) pairs until DT_NULL; DT_NEEDED = 1.
            2 => {
                for e in (off..off + size).step_by(16) {
                    match u64_at(e) {
                        0 => break,
                        1 => needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (interp, needed)
}

/// Runs `argv` with chroot into `root`; (exit status ok, stdout, stderr).
fn chroot(root: &Path, argv: &[&str]) -> (bool, String, String) {
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run chroot: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ENTRYPOINT of the Dockerfile's last stage, as JSON.
fn dockerfile_entrypoint() -> serde_json::Value {
    let text = std::fs::read_to_string(workspace_root().join("Dockerfile")).expect("Dockerfile");
    let runtime = text
        .lines()
        .map(str::trim)
        .rev()
        .take_while(|l| !l.starts_with("FROM "))
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT in the Dockerfile's runtime stage");
    serde_json::from_str(runtime).expect("ENTRYPOINT in exec form")
}

/// Processes whose executable is `exe`.
fn processes_running(exe: &Path) -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == exe))
        .count()
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn image_built_here_runs_the_agent_from_its_rootfs() {
    require_privileges!();
    let started = Instant::now();
    if let Err(e) = podman_out(&["--version"]) {
        panic!("podman is needed to build and mount the image ({e}): `cargo xtask setup` installs it (Debian package podman)");
    }
    let mut image = Image::obtain();
    let root = image.mount();
    eprintln!("image: {} mounted at {}", image.name, root.display());

    // Only what we put there.
    let have = tree(&root);
    let have_paths: Vec<(&str, bool, u32)> = have
        .iter()
        .map(|(p, d, m, _)| (p.as_str(), *d, *m))
        .collect();
    assert_eq!(
        have_paths,
        EXPECTED_TREE.to_vec(),
        "the image holds exactly the binaries and the CA bundle: {have:#?}"
    );
    let ca = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt"))
        .expect("the CA bundle is text");
    let certs = ca.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(certs >= 50, "a CA bundle with {certs} certificates");
    if image.built_here {
        let host = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
            .expect("the host's CA bundle");
        assert!(ca == host, "the image carries the host's Debian CA bundle");
    }

    // Static: no interpreter, no shared library.
    for bin in [AGENT_IN_IMAGE, LBCTL_IN_IMAGE] {
        let bytes = std::fs::read(root.join(bin)).expect("the binary");
        assert_eq!(
            elf_dynamic_needs(&bytes),
            (None, 0),
            "/{bin} is static (no PT_INTERP, no DT_NEEDED)"
        );
    }

    // The image's own binaries, in its own root: there is nothing else there.
    let version = format!("lb-agent {}", env!("CARGO_PKG_VERSION"));
    let (ok, out, err) = chroot(&root, &["/usr/local/bin/lb-agent", "--version"]);
    assert!(ok, "chroot lb-agent --version: {err}");
    assert_eq!(out.trim(), version);
    let (ok, out, err) = chroot(&root, &["/usr/local/bin/lbctl", "--help"]);
    assert!(ok, "chroot lbctl --help: {err}");
    assert!(out.contains("Usage: lbctl"), "{out}");
    eprintln!("chroot: `{version}`, lbctl --help ok");

    // The entrypoint of the image is the Dockerfile's; PATH finds the binaries.
    let config: serde_json::Value = serde_json::from_str(
        &podman_out(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config}}",
            &image.name,
        ])
        .unwrap_or_else(|e| panic!("{e}")),
    )
    .expect("the image's config is JSON");
    assert_eq!(config["Entrypoint"], dockerfile_entrypoint(), "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/lb-agent"])
    );
    assert_eq!(config["User"], "0:0", "{config}");
    let env: Vec<&str> = config["Env"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(env.contains(&"PATH=/usr/local/bin"), "{config}");

    // The agents of the topology are the image's lb-agent, lbctl reads
    // their maps: artifacts::lb_agent_bin() and lbctl_bin() read these.
    // (This test binary has this one test.)
    let agent = root.join(AGENT_IN_IMAGE);
    std::env::set_var("LB_AGENT_BIN", &agent);
    std::env::set_var("LBCTL_BIN", root.join(LBCTL_IN_IMAGE));

    let t = Topology::builder()
        .node("node1", &["client1", "web1"])
        .node("node2", &["web2"])
        .build()
        .expect("building the topology");
    t.spawn_backend("web1", &["http:8080"]).unwrap();
    t.spawn_backend("web2", &["http:8080"]).unwrap();
    let (web1, web2) = (t.pod("web1").clone(), t.pod("web2").clone());
    let vip = Ipv4Addr::new(10, 96, 9, 9);
    let port = ServicePort::tcp("http", 80, 8080).node_port(30909);
    let m = manifest(&[
        service("web", vip)
            .service_type(ServiceType::NodePort)
            .port(port.clone())
            .into(),
        endpoint_slice("web", "web-1")
            .ports_of(&[port])
            .endpoints([Endpoint::of(&web1), Endpoint::of(&web2)])
            .into(),
    ]);
    t.start_agents(&m).unwrap();
    let backends = [sa(web1.ip, 8080), sa(web2.ip, 8080)];
    t.wait_for_backends_everywhere(&Frontend::tcp(vip, 80), &backends)
        .unwrap();
    t.wait_for_backends("node1", &Frontend::node_port(30909, "TCP"), &backends)
        .unwrap();
    assert_eq!(
        processes_running(&agent),
        t.nodes().len(),
        "one agent per node, each the image's {}",
        agent.display()
    );

    // pod -> ClusterIP: both backends, the pod's own address seen (F1, F3).
    let client_ip = t.pod("client1").ip;
    let url = format!("http://{vip}/");
    t.request_eventually("client1", &url, WARMUP).unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = t.request("client1", &url).unwrap();
        assert_eq!(*r.client.ip(), client_ip, "{}", r.raw);
        seen.insert(r.backend);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web1".to_string(), "web2".to_string()]),
        "20 new flows from the client pod reach both backends"
    );

    // external client -> NodePort of node1, masqueraded to node1 (M2).
    let node1 = t.node("node1").address;
    let url = format!("http://{node1}:30909/");
    t.request_eventually("ext", &url, WARMUP).unwrap();
    for _ in 0..5 {
        let r = t.request("ext", &url).unwrap();
        assert_eq!(*r.client.ip(), node1, "{}", r.raw);
    }
    let services = t.lbctl("node1", &["services"]).unwrap();
    assert!(services.contains(&vip.to_string()), "{services}");
    eprintln!(
        "agents from the image served {} and NodePort 30909 ({:.0}s in all)",
        vip,
        started.elapsed().as_secs_f64()
    );
}
