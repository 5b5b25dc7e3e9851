//! `cargo xtask bench`: setup, build, then the datapath bench (lb-bench) and
//! the control-plane bench (lb-bench-sync).

use anyhow::Result;

use crate::build::{build, export_artifact_env};
use crate::setup::setup;
use crate::util::{cmd, section};

/// Both benchmarks: the datapath per packet (BPF_PROG_TEST_RUN) and the
/// agent's control plane at 10,000 Services (cluster mode against the fake
/// API server). Arguments go to the datapath bench.
pub fn bench(args: &[String]) -> Result<()> {
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
