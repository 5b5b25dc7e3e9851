//! Developer tasks of lb: `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! One module per command; `util` has what they share. Every external command
//! is printed (`+ ...`) before it runs. The commands are idempotent: `setup`
//! installs only what is missing, so running it again is fast.

mod bench;
mod build;
mod demo;
mod fuzz;
mod image;
mod setup;
mod test;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// tests use, the Helm SDK of the chart tests (venv $CARGO_HOME/lb-helm-venv),
    /// what the image needs (the musl target, podman, musl-tools); mount bpffs
    /// at /sys/fs/bpf. Fast when everything is there.
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
    /// setup, build, then the benchmarks: lb-bench, the datapath per packet
    /// (arguments after `--` go to it), and lb-bench-sync, the control plane.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The agent's image, built here (no daemon, no registry, nothing pulled):
    /// static (musl) lb-agent and lbctl with the eBPF object embedded, and the
    /// CA roots, in an image FROM scratch built with podman (vfs storage).
    /// Installs what it needs (musl target, musl-tools, podman) when missing.
    Image {
        /// The image's name (default: localhost/lb-agent:<version>).
        #[arg(long)]
        tag: Option<String>,
        /// Also write the image to FILE as an OCI archive (podman save).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only build the binaries and the build context (target/image:
        /// Containerfile, rootfs/), without podman: the Dockerfile's build stage.
        #[arg(long)]
        context_only: bool,
    },
    /// build-ebpf, then the packet fuzzer (tests/tests/fuzz.rs) for many
    /// frames: random and malformed frames through every TC program under
    /// BPF_PROG_TEST_RUN (root). CI runs the same test with 2,000.
    Fuzz {
        /// How many frames (each through all four programs).
        #[arg(long, default_value_t = 200_000)]
        cases: u32,
        /// The generator's seed (printed; default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup { dry_run } => setup::setup(dry_run),
        Cmd::BuildEbpf => build::build_ebpf(),
        Cmd::Build => build::build(),
        Cmd::Test {
            no_setup,
            no_lint,
            only,
        } => test::test(no_setup, no_lint, only),
        Cmd::Demo => demo::demo(),
        Cmd::Bench { args } => bench::bench(&args),
        Cmd::Fuzz { cases, seed } => fuzz::fuzz(cases, seed),
        Cmd::Image {
            tag,
            output,
            context_only,
        } => image::image(tag, output, context_only),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
