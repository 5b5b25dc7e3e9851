//! `cargo xtask build-ebpf` (the kernel object, nightly + bpf-linker, with BTF)
//! and `cargo xtask build` (that, then the agent and the CLI with the object
//! embedded through LB_EBPF_OBJECT, which lb-userspace's build script needs).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::util::{cmd, ensure_cargo_bin_in_path, root_dir, section, Cmdline};

/// The eBPF target and where `build-ebpf` leaves the object.
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// Rust flags of the eBPF build: debug info + BTF so bpftool prints field names.
const EBPF_RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";

pub fn ebpf_object() -> PathBuf {
    root_dir()
        .join("target")
        .join(EBPF_TARGET)
        .join("release/lb-ebpf")
}

/// `cargo +nightly <sub> -p lb-ebpf --release --target bpfel-unknown-none -Z build-std=core`
/// with the BTF flags (inherited rust flags replaced).
pub fn ebpf_cargo(sub: &str) -> Cmdline {
    cmd("cargo")
        .args(["+nightly", sub, "--package", "lb-ebpf", "--release"])
        .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
        // Inherited flags are for the host; cargo prefers CARGO_ENCODED_RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("RUSTFLAGS", EBPF_RUSTFLAGS)
}

pub fn build_ebpf() -> Result<()> {
    section("build-ebpf");
    ensure_cargo_bin_in_path();
    ebpf_cargo("build").run()?;
    let obj = ebpf_object();
    if !obj.exists() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    println!("eBPF object: {}", obj.display());
    Ok(())
}

fn build_userspace() -> Result<()> {
    section("build lb-userspace");
    cmd("cargo")
        .args(["build", "--release", "-p", "lb-userspace"])
        .env("LB_EBPF_OBJECT", ebpf_object())
        .run()?;
    for bin in ["lb-agent", "lbctl"] {
        let p = root_dir().join("target/release").join(bin);
        if !p.exists() {
            bail!("{} was not built", p.display());
        }
        println!("built: {}", p.display());
    }
    Ok(())
}

pub fn build() -> Result<()> {
    build_ebpf()?;
    build_userspace()
}

/// The artifact paths the tests read (lb_tests::artifacts), exported for them.
/// LB_EBPF_OBJECT is also what lb-userspace's build script embeds when a later
/// step (clippy, unit tests, demo, bench) compiles lb-userspace: it fails
/// without an object, so call this after `build()`.
pub fn export_artifact_env() {
    let vars = [
        ("LB_EBPF_OBJECT", ebpf_object()),
        ("LB_AGENT_BIN", root_dir().join("target/release/lb-agent")),
        ("LBCTL_BIN", root_dir().join("target/release/lbctl")),
    ];
    for (k, v) in vars {
        println!("export {k}={}", v.display());
        std::env::set_var(k, v);
    }
}
