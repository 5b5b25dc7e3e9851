//! `cargo xtask setup`: installs what is missing, each part checked first so a
//! second run does nothing: nightly rust-src and the clippy/rustfmt components,
//! bpf-linker (built against the nightly's own LLVM), the Debian packages the
//! tests use, the Helm SDK of the chart tests, what `cargo xtask image` needs
//! (the musl target, musl-tools, podman, the CA bundle); mounts bpffs at
//! /sys/fs/bpf.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::util::{cargo_home, cmd, ensure_cargo_bin_in_path, is_root, root_dir, section};

/// The bpf-linker release verified with this project's nightly (TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Directory under $CARGO_HOME that holds the libLLVM links bpf-linker is built
/// against. bpf-linker keeps an rpath into it, so it must stay.
const LLVM_PREFIX_DIR: &str = "lb-llvm";
/// Python virtual environment under $CARGO_HOME holding the Helm SDK
/// (helm-python-sdk: Helm's own Go SDK as a library; there is no helm binary)
/// that tests/tests/chart.rs lints and renders the chart with.
const HELM_VENV_DIR: &str = "lb-helm-venv";
/// The pinned Python requirements of the chart tests, installed into the venv.
const HELM_REQUIREMENTS: &str = "tests/chart/requirements.txt";
/// Debian packages the tests, the demo and the benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",     // ip, ss, bridge
    "iputils-ping", // ping
    "util-linux",   // nsenter, mount
    "curl",         // HTTP clients in tests and the demo
    "dnsutils",     // dig
    "dnsmasq-base", // DNS backends (the binary only: no system service is started)
    "socat",        // TCP/UDP clients and servers
    "iptables",     // the kubeadm-like FORWARD INVALID drop rule in node namespaces
    "nftables",     // nft, to inspect
    "bpftool",      // bpftool map dump pinned ...
    "tcpdump",      // debugging test topologies
    "python3",      // backend servers in pod namespaces
    "procps",       // ps, sysctl
];
/// The Rust target of the image's static binaries (`cargo xtask image`).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Debian packages `cargo xtask image` (and tests/tests/image.rs) needs: podman
/// builds and mounts the image without a daemon; musl-tools is the C compiler
/// (musl-gcc) of the C and assembly in ring and psm for the musl target;
/// ca-certificates is the CA bundle the image carries. Without recommends: no
/// slirp4netns, fuse-overlayfs or uidmap, which a rootful build with vfs
/// storage and no RUN step never uses.
const IMAGE_PACKAGES: &[&str] = &["podman", "musl-tools", "ca-certificates"];

pub fn setup(dry_run: bool) -> Result<()> {
    section("setup");
    ensure_cargo_bin_in_path();
    let started = Instant::now();
    setup_rust_components(dry_run)?;
    setup_bpf_linker(dry_run)?;
    setup_musl_target(dry_run)?;
    setup_debian_packages(dry_run)?;
    setup_helm_sdk(dry_run)?;
    setup_bpffs(dry_run)?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .ok_or_else(|| {
            anyhow!("`rustc +nightly --print sysroot` failed: is the nightly toolchain installed?")
        })?;
    Ok(PathBuf::from(out.trim()))
}

fn setup_rust_components(dry_run: bool) -> Result<()> {
    let sysroot = nightly_sysroot()?;
    // (toolchain, component, how to tell it is there)
    let rust_src = sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists();
    let checks: [(&str, &str, bool); 4] = [
        ("nightly", "rust-src", rust_src),
        (
            "nightly",
            "clippy",
            cmd("cargo")
                .args(["+nightly", "clippy", "--version"])
                .probe(),
        ),
        (
            "stable",
            "clippy",
            cmd("cargo").args(["clippy", "--version"]).probe(),
        ),
        (
            "stable",
            "rustfmt",
            cmd("cargo").args(["fmt", "--version"]).probe(),
        ),
    ];
    for (toolchain, component, present) in checks {
        if present {
            println!("ok: {component} ({toolchain})");
            continue;
        }
        // The stable toolchain is whatever rust-toolchain.toml names; let rustup
        // resolve it from the repository directory.
        let mut c = cmd("rustup").args(["component", "add", component]);
        if toolchain == "nightly" {
            c = c.args(["--toolchain", "nightly"]);
        }
        if dry_run {
            println!("would run: {}", c.display().trim_start_matches("+ "));
        } else {
            c.run()?;
        }
    }
    Ok(())
}

/// True when `bpf-linker --version` works (found in PATH, libLLVM resolvable).
fn bpf_linker_works() -> bool {
    cmd("bpf-linker").arg("--version").probe()
}

fn setup_bpf_linker(dry_run: bool) -> Result<()> {
    if bpf_linker_works() {
        let v = cmd("bpf-linker")
            .arg("--version")
            .output()
            .unwrap_or_default();
        println!("ok: {}", v.trim());
        return Ok(());
    }
    println!("bpf-linker missing or broken (`bpf-linker --version` fails): building it against the nightly's LLVM");
    let sysroot = nightly_sysroot()?;
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .min()
        .ok_or_else(|| anyhow!("no libLLVM.so.*-rust-* in {}", libdir.display()))?;
    let vv = cmd("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` failed"))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| {
            anyhow!("cannot find the nightly's LLVM major version in `rustc +nightly -vV`")
        })?
        .to_string();
    let prefix = cargo_home().join(LLVM_PREFIX_DIR);
    let prefix_lib = prefix.join("lib");
    let lib_name = lib.file_name().expect("a file name").to_owned();
    println!(
        "libLLVM: {} (LLVM {major}); prefix {}",
        lib.display(),
        prefix.display()
    );
    let install = cmd("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if dry_run {
        println!("would run: mkdir -p {}", prefix_lib.display());
        println!(
            "would run: ln -sf {} {}/libLLVM.so",
            lib.display(),
            prefix_lib.display()
        );
        println!(
            "would run: ln -sf {} {}/{}",
            lib.display(),
            prefix_lib.display(),
            lib_name.to_string_lossy()
        );
        println!("would run: {}", install.display().trim_start_matches("+ "));
        return Ok(());
    }
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in [OsString::from("libLLVM.so"), lib_name] {
        let link = prefix_lib.join(&name);
        println!("+ ln -sf {} {}", lib.display(), link.display());
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    install.run()?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but `bpf-linker --version` still fails");
    }
    Ok(())
}

fn debian_package_installed(pkg: &str) -> bool {
    cmd("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_some_and(|s| s.trim() == "install ok installed")
}

/// The tests' packages and the image's (tests/tests/image.rs builds one), in
/// one apt-get run.
fn setup_debian_packages(dry_run: bool) -> Result<()> {
    let all: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .chain(IMAGE_PACKAGES)
        .copied()
        .collect();
    install_debian_packages(&all, dry_run)
}

/// Installs those of `packages` that are missing (apt-get update first, no
/// recommends); nothing runs when all are installed.
fn install_debian_packages(packages: &[&str], dry_run: bool) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        println!("ok: Debian packages ({})", packages.join(" "));
        return Ok(());
    }
    println!("missing Debian packages: {}", missing.join(" "));
    let update = cmd("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    let install = cmd("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing.iter().copied())
        .env("DEBIAN_FRONTEND", "noninteractive");
    if dry_run {
        println!("would run: {}", update.display().trim_start_matches("+ "));
        println!("would run: {}", install.display().trim_start_matches("+ "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    update.run()?;
    install.run()?;
    Ok(())
}

/// True when the standard library of `target` is installed for the toolchain
/// that builds userspace (rust-toolchain.toml's, resolved from the repository).
fn rust_target_installed(target: &str) -> bool {
    cmd("rustc")
        .args(["--print", "sysroot"])
        .output()
        .is_some_and(|sysroot| {
            Path::new(sysroot.trim())
                .join("lib/rustlib")
                .join(target)
                .join("lib")
                .is_dir()
        })
}

/// The musl target of the stable toolchain (a rustup component, a few
/// seconds): the image's static binaries.
fn setup_musl_target(dry_run: bool) -> Result<()> {
    if rust_target_installed(MUSL_TARGET) {
        println!("ok: Rust target {MUSL_TARGET}");
        return Ok(());
    }
    let add = cmd("rustup").args(["target", "add", MUSL_TARGET]);
    if dry_run {
        println!("would run: {}", add.display().trim_start_matches("+ "));
        return Ok(());
    }
    add.run()?;
    if !rust_target_installed(MUSL_TARGET) {
        bail!("`rustup target add {MUSL_TARGET}` ran but its standard library is missing");
    }
    Ok(())
}

/// What `cargo xtask image` needs, each checked first: the musl target,
/// musl-gcc, the CA bundle and (`with_podman`) podman. `setup` installs the
/// same (the image test is part of the suite); `cargo xtask image` runs only
/// this part, not the whole setup, and `--context-only` (the Dockerfile's
/// build stage) needs no podman.
pub fn setup_image_tools(dry_run: bool, with_podman: bool) -> Result<()> {
    setup_musl_target(dry_run)?;
    let packages: Vec<&str> = IMAGE_PACKAGES
        .iter()
        .copied()
        .filter(|p| with_podman || *p != "podman")
        .collect();
    install_debian_packages(&packages, dry_run)
}

/// True when `python` runs and imports the Helm SDK.
fn helm_sdk_importable(python: &Path) -> bool {
    cmd(&python.to_string_lossy())
        .args(["-c", "import helm_python"])
        .probe()
}

/// Installs tests/chart/requirements.txt (the pinned helm-python-sdk) into the
/// venv $CARGO_HOME/lb-helm-venv. A copy of the requirements in the venv tells
/// whether it is current: nothing runs when it matches and the SDK imports.
fn setup_helm_sdk(dry_run: bool) -> Result<()> {
    let venv = cargo_home().join(HELM_VENV_DIR);
    let python = venv.join("bin/python3");
    let requirements = root_dir().join(HELM_REQUIREMENTS);
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let pinned = wanted
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let stamp = venv.join("lb-requirements.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && helm_sdk_importable(&python) {
        println!("ok: Helm SDK ({pinned}, {})", venv.display());
        return Ok(());
    }
    println!(
        "Helm SDK missing or not {pinned}: installing into {}",
        venv.display()
    );
    let create = cmd("python3").args(["-m", "venv", "--clear"]).arg(&venv);
    let install = cmd(&python.to_string_lossy())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("-r")
        .arg(&requirements);
    let venv_works = cmd(&python.to_string_lossy())
        .args(["-m", "pip", "--version"])
        .probe();
    if dry_run {
        if !venv_works {
            println!("would run: {}", create.display().trim_start_matches("+ "));
        }
        println!("would run: {}", install.display().trim_start_matches("+ "));
        return Ok(());
    }
    // Debian's python3 ships the venv module (ensurepip) separately.
    if !venv_works && create.run().is_err() {
        if !is_root() {
            bail!("`python3 -m venv` failed: install python3-venv (sudo apt-get install python3-venv) and run setup again");
        }
        cmd("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()?;
        cmd("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "python3-venv",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()?;
        create.run()?;
    }
    install.run()?;
    if !helm_sdk_importable(&python) {
        bail!(
            "installed {pinned} but `{} -c 'import helm_python'` fails",
            python.display()
        );
    }
    std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let mount_point = l.split(' ').nth(4);
            let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
            mount_point == Some("/sys/fs/bpf") && fstype == Some("bpf")
        })
    })
}

fn setup_bpffs(dry_run: bool) -> Result<()> {
    if bpffs_mounted() {
        println!("ok: bpffs at /sys/fs/bpf");
        return Ok(());
    }
    let mount = cmd("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    if dry_run {
        println!("would run: {}", mount.display().trim_start_matches("+ "));
        return Ok(());
    }
    if !is_root() {
        println!("note: bpffs is not mounted at /sys/fs/bpf and we are not root; the agent mounts it when it runs");
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    mount.run()
}
