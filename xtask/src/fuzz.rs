//! `cargo xtask fuzz`: the packet fuzzer of `tests/tests/fuzz.rs` for much
//! longer than CI runs it: random, truncated and malformed frames through
//! every TC program under BPF_PROG_TEST_RUN, checking verdicts, counters,
//! that traffic that is not lb's leaves unchanged, and checksums.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::build::{build_ebpf, export_artifact_env};
use crate::util::{cmd, ensure_cargo_bin_in_path, section};

/// Builds the eBPF object, then runs `cases` frames from `seed` (a new one
/// from the clock when none is given; printed either way, so a failure can
/// be replayed with `--seed`).
pub fn fuzz(cases: u32, seed: Option<u64>) -> Result<()> {
    ensure_cargo_bin_in_path();
    build_ebpf()?;
    export_artifact_env();
    let seed = seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    section(&format!("fuzz: {cases} frames, seed {seed}"));
    cmd("cargo")
        .args(["test", "-p", "lb-tests", "--test", "fuzz", "--"])
        .args(["--test-threads=1", "--nocapture"])
        .env("LB_FUZZ_CASES", cases.to_string())
        .env("LB_FUZZ_SEED", seed.to_string())
        .env("LB_REQUIRE_PRIVILEGED", "1")
        .run()
}
