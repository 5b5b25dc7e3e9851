//! Developer tasks of lb: `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! One module per command; `util` has what they share. Every external command
//! is printed (`+ ...`) before it runs. The commands are idempotent: `setup`
//! installs only what is missing, so running it again is fast.

mod bench;
mod build;
mod demo;
mod setup;
mod test;
mod util;

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
    /// setup, build, then the benchmarks: lb-bench, the datapath per packet
    /// (arguments after `--` go to it), and lb-bench-sync, the control plane.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
