//! `cargo xtask demo`: setup, build, then lb-demo (a two-node network-namespace
//! cluster with the agents, real requests, and which backend answered).

use anyhow::Result;

use crate::build::{build, export_artifact_env};
use crate::setup::setup;
use crate::util::{cmd, section};

pub fn demo() -> Result<()> {
    setup(false)?;
    build()?;
    export_artifact_env();
    section("demo");
    cmd("cargo")
        .args(["run", "--release", "-p", "lb-tests", "--bin", "lb-demo"])
        .run()
}
