//! Developer tasks of lb: `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! Every external command is printed (`+ ...`) before it runs. The commands are
//! idempotent: `setup` installs only what is missing, so running it again is fast.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

/// The eBPF target and where `build-ebpf` leaves the object.
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// Rust flags of the eBPF build: debug info + BTF so bpftool prints field names.
const EBPF_RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";
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

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Developer tasks of lb (run as `cargo xtask <command>`)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker (built against the
    /// nightly's own LLVM, prefix $CARGO_HOME/lb-llvm), the Debian packages the
    /// tests use, the Helm SDK of the chart tests (venv $CARGO_HOME/lb-helm-venv);
    /// mount bpffs at /sys/fs/bpf. Fast when everything is there.
    Setup {
        /// Only print what would be installed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Build the kernel programs with nightly + bpf-linker, with BTF. Output:
    /// target/bpfel-unknown-none/release/lb-ebpf
    BuildEbpf,
    /// build-ebpf, then the agent and the CLI: target/release/lb-agent and
    /// target/release/lbctl (the eBPF object is embedded via LB_EBPF_OBJECT).
    Build,
    /// What CI runs: setup, build, then rustfmt, clippy (host and eBPF), unit
    /// tests, and the tests of lb-tests serially (privileged ones, and the Helm
    /// chart's). Prints a summary; exits non-zero if anything failed.
    Test {
        /// Skip `setup` (for quick local runs on a machine that has everything).
        #[arg(long)]
        no_setup: bool,
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only pass this filter to the privileged lb-tests run (and skip the other
        /// steps but the build).
        #[arg(long)]
        only: Option<String>,
    },
    /// setup, build, then the demo: a two-node network-namespace cluster with
    /// the agents, real requests, and a table of which backend answered.
    Demo,
    /// setup, build-ebpf, then lb-bench (arguments after `--` go to it).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup { dry_run } => setup(dry_run),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test {
            no_setup,
            no_lint,
            only,
        } => test(no_setup, no_lint, only),
        Cmd::Demo => demo(),
        Cmd::Bench { args } => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

fn cargo_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

/// A command to run: program, arguments, environment changes, printed before it runs.
struct Cmdline {
    program: String,
    args: Vec<OsString>,
    envs: BTreeMap<String, Option<OsString>>,
    dir: PathBuf,
}

fn cmd(program: &str) -> Cmdline {
    Cmdline {
        program: program.to_string(),
        args: Vec::new(),
        envs: BTreeMap::new(),
        dir: root_dir(),
    }
}

impl Cmdline {
    fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }
    fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    fn env(mut self, k: &str, v: impl Into<OsString>) -> Self {
        self.envs.insert(k.to_string(), Some(v.into()));
        self
    }
    fn env_remove(mut self, k: &str) -> Self {
        self.envs.insert(k.to_string(), None);
        self
    }

    fn display(&self) -> String {
        let mut s = String::from("+");
        if self.envs.values().any(Option::is_none) {
            s.push_str(" env");
        }
        // `env -u A -u B C=1 cmd`: removals first, as env(1) wants them.
        for (k, v) in &self.envs {
            if v.is_none() {
                s.push_str(&format!(" -u {k}"));
            }
        }
        for (k, v) in &self.envs {
            if let Some(v) = v {
                s.push_str(&format!(" {k}={}", shell_quote(&v.to_string_lossy())));
            }
        }
        s.push(' ');
        s.push_str(&self.program);
        for a in &self.args {
            s.push(' ');
            s.push_str(&shell_quote(&a.to_string_lossy()));
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).current_dir(&self.dir);
        for (k, v) in &self.envs {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Runs with inherited stdio; error when it cannot start or exits non-zero.
    fn run(&self) -> Result<()> {
        println!("{}", self.display());
        let _ = std::io::stdout().flush();
        let status = self
            .command()
            .status()
            .with_context(|| format!("cannot run {}", self.program))?;
        if !status.success() {
            bail!(
                "`{}` failed: {status}",
                self.display().trim_start_matches("+ ")
            );
        }
        Ok(())
    }

    /// Runs quietly (nothing printed), true when it exits 0. For probes.
    fn probe(&self) -> bool {
        self.command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs quietly and returns stdout when it exits 0. For probes.
    fn output(&self) -> Option<String> {
        let out = self
            .command()
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn is_root() -> bool {
    // `id -u` avoids a libc dependency for one call.
    cmd("id")
        .arg("-u")
        .output()
        .is_some_and(|s| s.trim() == "0")
}

/// Makes $CARGO_HOME/bin part of PATH for everything we run (cargo install puts
/// bpf-linker there, and cargo +nightly must find it).
fn ensure_cargo_bin_in_path() {
    let bin = cargo_home().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|p| p == bin) {
        let mut parts: Vec<PathBuf> = vec![bin];
        parts.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(parts) {
            // SAFETY-free in edition 2021: single-threaded at this point.
            std::env::set_var("PATH", joined);
        }
    }
}

fn section(title: &str) {
    println!("\n==> {title}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------
// setup

fn setup(dry_run: bool) -> Result<()> {
    section("setup");
    ensure_cargo_bin_in_path();
    let started = Instant::now();
    setup_rust_components(dry_run)?;
    setup_bpf_linker(dry_run)?;
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

fn setup_debian_packages(dry_run: bool) -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        println!("ok: Debian packages ({})", DEBIAN_PACKAGES.join(" "));
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

// ---------------------------------------------------------------------------
// builds

fn ebpf_object() -> PathBuf {
    root_dir()
        .join("target")
        .join(EBPF_TARGET)
        .join("release/lb-ebpf")
}

/// `cargo +nightly <sub> -p lb-ebpf --release --target bpfel-unknown-none -Z build-std=core`
/// with the BTF flags (inherited rust flags replaced).
fn ebpf_cargo(sub: &str) -> Cmdline {
    cmd("cargo")
        .args(["+nightly", sub, "--package", "lb-ebpf", "--release"])
        .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
        // Inherited flags are for the host; cargo prefers CARGO_ENCODED_RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("RUSTFLAGS", EBPF_RUSTFLAGS)
}

fn build_ebpf() -> Result<()> {
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

fn build() -> Result<()> {
    build_ebpf()?;
    build_userspace()
}

/// The artifact paths the tests read (lb_tests::artifacts), exported for them.
fn export_artifact_env() {
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

// ---------------------------------------------------------------------------
// test

/// Totals parsed from cargo test's `test result:` lines.
#[derive(Default, Clone, Copy)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut c = Counts::default();
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    Some(c)
}

/// Runs a command, streaming its stdout while counting `test result:` lines.
fn run_counting(c: &Cmdline) -> Result<Counts> {
    println!("{}", c.display());
    let _ = std::io::stdout().flush();
    let mut child = c
        .command()
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", c.program))?;
    let mut counts = Counts::default();
    let stdout = child.stdout.take().expect("piped stdout");
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if let Some(n) = parse_test_result(&line) {
            counts.add(n);
        }
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "`{}` failed: {status}",
            c.display().trim_start_matches("+ ")
        );
    }
    Ok(counts)
}

struct Step {
    name: String,
    ok: bool,
    secs: f64,
    note: String,
}

fn test(no_setup: bool, no_lint: bool, only: Option<String>) -> Result<()> {
    let started = Instant::now();
    if !no_setup {
        setup(false)?;
    }
    ensure_cargo_bin_in_path();
    build()?;
    export_artifact_env();

    let mut steps: Vec<Step> = Vec::new();
    let mut totals = Counts::default();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<Option<Counts>>| {
        section(name);
        let t = Instant::now();
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        let (ok, note) = match r {
            Ok(Some(c)) => {
                totals.add(c);
                (
                    true,
                    format!(
                        "{} passed, {} failed, {} ignored",
                        c.passed, c.failed, c.ignored
                    ),
                )
            }
            Ok(None) => (true, String::new()),
            Err(e) => (false, format!("{e:#}")),
        };
        if !ok {
            println!("xtask: step `{name}` FAILED: {note}");
        }
        steps.push(Step {
            name: name.to_string(),
            ok,
            secs,
            note,
        });
    };

    let lint = !no_lint && only.is_none();
    if lint {
        step("rustfmt", &mut || {
            cmd("cargo").args(["fmt", "--all", "--check"]).run()?;
            Ok(None)
        });
        step("clippy (workspace)", &mut || {
            cmd("cargo")
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "lb-ebpf",
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"])
                .run()?;
            Ok(None)
        });
        step("clippy (lb-ebpf, nightly, bpfel)", &mut || {
            ebpf_cargo("clippy").args(["--", "-D", "warnings"]).run()?;
            Ok(None)
        });
    }
    if only.is_none() {
        step("unit tests (workspace)", &mut || {
            // lb-ebpf only builds for the BPF target; lb-tests runs serially below.
            let c = cmd("cargo").args([
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--exclude",
                "lb-tests",
            ]);
            run_counting(&c).map(Some)
        });
    }
    step("privileged tests (lb-tests, serial)", &mut || {
        let mut c = cmd("cargo").args(["test", "-p", "lb-tests", "--"]);
        if let Some(filter) = &only {
            c = c.arg(filter);
        }
        c = c.arg("--test-threads=1");
        run_counting(&c).map(Some)
    });

    println!("\n==> summary ({:.0}s)", started.elapsed().as_secs_f64());
    for s in &steps {
        println!(
            "  {:<6} {:<40} {:>7.1}s  {}",
            if s.ok { "ok" } else { "FAILED" },
            s.name,
            s.secs,
            s.note.lines().next().unwrap_or("")
        );
    }
    let failed_steps = steps.iter().filter(|s| !s.ok).count();
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if failed_steps > 0 {
        bail!("{failed_steps} step(s) failed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// demo and bench

fn demo() -> Result<()> {
    setup(false)?;
    build()?;
    export_artifact_env();
    section("demo");
    cmd("cargo")
        .args(["run", "--release", "-p", "lb-tests", "--bin", "lb-demo"])
        .run()
}

/// Both benchmarks: the datapath per packet (BPF_PROG_TEST_RUN) and the
/// agent's control plane at 10,000 Services (cluster mode against the fake
/// API server). Arguments go to the datapath bench.
fn bench(args: &[String]) -> Result<()> {
    setup(false)?;
    build()?;
    export_artifact_env();
    section("bench: datapath");
    cmd("cargo")
        .args([
            "run",
            "--release",
            "-p",
            "lb-tests",
            "--bin",
            "lb-bench",
            "--",
        ])
        .args(args.iter())
        .run()?;
    section("bench: control plane");
    cmd("cargo")
        .args([
            "run",
            "--release",
            "-p",
            "lb-tests",
            "--bin",
            "lb-bench-sync",
        ])
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_result_lines() {
        let c = parse_test_result(
            "test result: ok. 12 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        )
        .unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (12, 1, 3));
        assert!(parse_test_result("running 3 tests").is_none());
    }

    #[test]
    fn quotes_for_display() {
        assert_eq!(shell_quote("a-b/c=1"), "a-b/c=1");
        assert_eq!(shell_quote("-C debuginfo=2"), "'-C debuginfo=2'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
