//! `cargo xtask image`: the agent's container image, built here without a
//! daemon, a registry or a base image.
//!
//! 1. the eBPF object (`build-ebpf`), then lb-agent and lbctl for
//!    x86_64-unknown-linux-musl with that object embedded through
//!    LB_EBPF_OBJECT, as `cargo xtask build` embeds it: static binaries;
//! 2. a build context under target/image: `rootfs/` (the two binaries in
//!    /usr/local/bin, the host's Debian CA bundle in /etc/ssl/certs) and a
//!    Containerfile `FROM scratch` that copies it;
//! 3. `podman --storage-driver vfs build --layers=false --pull=never
//!    --network=none`: one layer, no RUN step, nothing pulled, no daemon;
//!    tagged `localhost/lb-agent:<version>`; with `--output FILE` also
//!    `podman save --format oci-archive`.
//!
//! The repository's Dockerfile runs step 1 and 2 in its build stage
//! (`cargo xtask image --context-only`) and its runtime stage is the
//! Containerfile below, instruction for instruction (a unit test compares
//! them), so both give the same files at the same paths and the same
//! entrypoint. tests/tests/image.rs mounts the image and runs the agent from it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::build::{build_ebpf, ebpf_object};
use crate::setup::{setup_image_tools, MUSL_TARGET};
use crate::util::{cmd, ensure_cargo_bin_in_path, root_dir, section, Cmdline};

/// podman's global flags: vfs storage works in every sandbox (no overlay
/// mounts, no fuse); tests/tests/image.rs uses the same.
pub const PODMAN_GLOBAL_FLAGS: &[&str] = &["--storage-driver", "vfs"];
/// The image's repository; the tag is the workspace version.
pub const IMAGE_REPOSITORY: &str = "localhost/lb-agent";
/// The binaries the image holds, all in /usr/local/bin.
const BINARIES: &[&str] = &["lb-agent", "lbctl"];
/// The CA bundle of the Debian host (package ca-certificates), and where the
/// image has it: the path rustls-native-certs (openssl-probe) looks at first.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The build context, under the target directory (rebuilt every time).
const CONTEXT_DIR: &str = "target/image";

/// The image: everything in rootfs/ and how to start the agent. The
/// Dockerfile's runtime stage has the same instructions, with the rootfs
/// copied from its build stage (`dockerfile_runtime_stage_is_the_containerfile`).
pub const CONTAINERFILE: &str = r#"# Written by `cargo xtask image` (xtask/src/image.rs). The runtime stage of
# the repository's Dockerfile has the same instructions.
#
# Static (musl) lb-agent and lbctl, the eBPF object embedded in lb-agent, and
# the CA roots for an API server reached through a kubeconfig (in a pod the
# service account's CA is used). Nothing else: no shell, no libc.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# Root on purpose: BPF programs, interface and cgroup attachments and bpffs
# need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN in the host's namespaces.
USER 0:0
ENTRYPOINT ["/usr/local/bin/lb-agent"]
"#;

pub fn default_tag() -> String {
    format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

fn podman() -> Cmdline {
    cmd("podman").args(PODMAN_GLOBAL_FLAGS)
}

/// `cargo xtask image [--tag T] [--output FILE] [--context-only]`.
pub fn image(tag: Option<String>, output: Option<PathBuf>, context_only: bool) -> Result<()> {
    // Relative to where the command was typed (commands run from the root).
    let output = match output {
        Some(p) if p.is_relative() => Some(
            std::env::current_dir()
                .context("the current directory")?
                .join(p),
        ),
        other => other,
    };
    if context_only && output.is_some() {
        bail!("--output needs the image: it cannot go with --context-only");
    }
    section("image: tools");
    ensure_cargo_bin_in_path();
    setup_image_tools(false, !context_only)?;
    build_ebpf()?;
    let binaries = build_static_binaries()?;
    let context = assemble_context(&binaries)?;
    if context_only {
        println!(
            "build context: {} (Containerfile, rootfs/)",
            context.display()
        );
        return Ok(());
    }
    let tag = tag.unwrap_or_else(default_tag);
    build_image(&context, &tag)?;
    if let Some(out) = output {
        section("image: oci-archive");
        if out.exists() {
            std::fs::remove_file(&out).with_context(|| format!("removing {}", out.display()))?;
        }
        podman()
            .args(["save", "--format", "oci-archive", "-o"])
            .arg(&out)
            .arg(&tag)
            .run()?;
        let size = std::fs::metadata(&out)
            .with_context(|| format!("reading {}", out.display()))?
            .len();
        println!("wrote {} ({})", out.display(), human_size(size));
    }
    Ok(())
}

/// lb-agent and lbctl for the musl target, with the object of `build-ebpf`
/// embedded (LB_EBPF_OBJECT, as `cargo xtask build` does); checked static.
fn build_static_binaries() -> Result<Vec<PathBuf>> {
    section(&format!("image: lb-agent and lbctl for {MUSL_TARGET}"));
    let mut c = cmd("cargo")
        .args(["build", "--release", "--target", MUSL_TARGET])
        .args(["--package", "lb-userspace"]);
    for b in BINARIES {
        c = c.args(["--bin", b]);
    }
    c.env("LB_EBPF_OBJECT", ebpf_object()).run()?;
    let dir = root_dir().join("target").join(MUSL_TARGET).join("release");
    let mut out = Vec::new();
    for b in BINARIES {
        let path = dir.join(b);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if let Some(interp) = elf_interpreter(&bytes)
            .with_context(|| format!("{} is not a 64-bit ELF", path.display()))?
        {
            bail!(
                "{} is not static: it asks for the interpreter {interp}",
                path.display()
            );
        }
        println!(
            "static: {} ({})",
            path.display(),
            human_size(bytes.len() as u64)
        );
        out.push(path);
    }
    Ok(out)
}

/// The program interpreter (PT_INTERP) of a little-endian ELF64 file: None
/// for a static executable.
fn elf_interpreter(elf: &[u8]) -> Result<Option<String>> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        bail!("not a little-endian ELF64 file");
    }
    let u16_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 2).ok_or_else(|| anyhow!("truncated"))?;
        Ok(u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 4).ok_or_else(|| anyhow!("truncated"))?;
        Ok(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    };
    let u64_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 8).ok_or_else(|| anyhow!("truncated"))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_INTERP: u64 = 3;
        if u32_at(ph)? == PT_INTERP {
            let off = u64_at(ph + 8)? as usize;
            let len = u64_at(ph + 32)? as usize;
            let raw = elf
                .get(off..off + len)
                .ok_or_else(|| anyhow!("truncated PT_INTERP"))?;
            let s = String::from_utf8_lossy(raw);
            return Ok(Some(s.trim_end_matches('\0').to_string()));
        }
    }
    Ok(None)
}

/// target/image: Containerfile and rootfs/ with exactly the image's files
/// (emptied first, so nothing stale gets in), modes set explicitly.
fn assemble_context(binaries: &[PathBuf]) -> Result<PathBuf> {
    section("image: build context");
    let context = root_dir().join(CONTEXT_DIR);
    let rootfs = context.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)
            .with_context(|| format!("removing {}", rootfs.display()))?;
    }
    let bin_dir = rootfs.join("usr/local/bin");
    let ca_path = rootfs.join(CA_BUNDLE.trim_start_matches('/'));
    let ca_dir = ca_path.parent().expect("the CA path has a directory");
    for dir in [&bin_dir, &ca_dir.to_path_buf()] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for b in binaries {
        let name = b.file_name().expect("a binary has a file name");
        copy_with_mode(b, &bin_dir.join(name), 0o755)?;
    }
    if !Path::new(CA_BUNDLE).exists() {
        bail!("{CA_BUNDLE} is missing: install the Debian package ca-certificates");
    }
    copy_with_mode(Path::new(CA_BUNDLE), &ca_path, 0o644)?;
    // Every directory 0755 whatever the umask.
    let mut dirs = vec![rootfs.clone()];
    while let Some(d) = dirs.pop() {
        set_mode(&d, 0o755)?;
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            }
        }
    }
    let containerfile = context.join("Containerfile");
    std::fs::write(&containerfile, CONTAINERFILE)
        .with_context(|| format!("writing {}", containerfile.display()))?;
    for f in list_files(&rootfs)? {
        let len = std::fs::metadata(rootfs.join(&f))?.len();
        println!("  /{f}  ({})", human_size(len));
    }
    Ok(context)
}

fn copy_with_mode(from: &Path, to: &Path, mode: u32) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}

/// Regular files under `root`, relative, sorted.
fn list_files(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The ID `tag` names now, if any.
fn image_id(tag: &str) -> Option<String> {
    podman()
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .output()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `podman build` of the context: one layer (`--layers=false`: with vfs every
/// intermediate image would be a full copy), nothing pulled, no network. The
/// image the tag named before is removed when nothing else names it.
fn build_image(context: &Path, tag: &str) -> Result<()> {
    section(&format!("image: podman build {tag}"));
    let previous = image_id(tag);
    let iidfile = context.join("image-id");
    let _ = std::fs::remove_file(&iidfile);
    podman()
        .args(["build", "--layers=false", "--pull=never", "--network=none"])
        .arg("--iidfile")
        .arg(&iidfile)
        .arg("-f")
        .arg(context.join("Containerfile"))
        .args(["-t", tag])
        .arg(context)
        .run()?;
    let id = std::fs::read_to_string(&iidfile)
        .with_context(|| format!("reading {}", iidfile.display()))?
        .trim()
        .trim_start_matches("sha256:")
        .to_string();
    if let Some(old) = previous.filter(|old| *old != id) {
        // Fails (and is left) when another tag still names it.
        if podman().args(["image", "rm", &old]).probe() {
            println!("removed the image {tag} named before ({old:.12})");
        }
    }
    let size = podman()
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(human_size)
        .unwrap_or_else(|| "?".into());
    println!("image: {tag} (id {id:.12}, {size})");
    println!(
        "look inside: podman {} image mount {tag}",
        PODMAN_GLOBAL_FLAGS.join(" ")
    );
    Ok(())
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dockerfile instructions, continuation lines joined, comments dropped.
    fn instructions(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(part) => {
                    cur.push_str(part);
                    cur.push(' ');
                }
                None => {
                    cur.push_str(t);
                    let i = cur.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !i.is_empty() {
                        out.push(i);
                    }
                    cur.clear();
                }
            }
        }
        out
    }

    /// The Dockerfile's runtime stage is the Containerfile of `cargo xtask
    /// image`, but for where the rootfs comes from; its build stage makes the
    /// rootfs with `cargo xtask image --context-only`.
    #[test]
    fn dockerfile_runtime_stage_is_the_containerfile() {
        let path = root_dir().join("Dockerfile");
        let text = std::fs::read_to_string(&path).expect("the Dockerfile");
        let all = instructions(&text);
        let last_from = all
            .iter()
            .rposition(|i| i.starts_with("FROM "))
            .expect("a FROM");
        let runtime: Vec<String> = all[last_from..]
            .iter()
            .map(|i| {
                if i.starts_with("COPY --from=builder ") {
                    i.replace(
                        &format!("COPY --from=builder /src/{CONTEXT_DIR}/rootfs/ /"),
                        "COPY rootfs/ /",
                    )
                } else {
                    i.clone()
                }
            })
            .collect();
        assert_eq!(runtime, instructions(CONTAINERFILE));
        let build = all[..last_from].join("\n");
        assert!(
            build.contains("cargo xtask image --context-only"),
            "{build}"
        );
        assert!(build.contains(MUSL_TARGET), "{build}");
    }

    #[test]
    fn finds_the_interpreter_of_a_dynamic_elf() {
        let mut elf = vec![0u8; 200];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20] = 64; // phoff
        elf[0x36] = 56; // phentsize
        elf[0x38] = 1; // phnum
        elf[64] = 3; // PT_INTERP
        elf[64 + 8] = 150; // offset
        elf[64 + 32] = 5; // size
        elf[150..155].copy_from_slice(b"/ld\0\0");
        assert_eq!(elf_interpreter(&elf).unwrap().as_deref(), Some("/ld"));
        elf[64] = 1; // PT_LOAD
        assert_eq!(elf_interpreter(&elf).unwrap(), None);
        assert!(elf_interpreter(b"#!/bin/sh").is_err());
    }
}
