//! `cargo xtask bench`: setup, build, then three parts: the datapath bench
//! (lb-bench), the control-plane bench (lb-bench-sync) and the end-to-end
//! bench against kube-proxy's layouts (lb-bench-e2e).
//!
//! ```text
//! cargo xtask bench [--only PART[,PART]] [--prebuilt] [ARGS...]
//! cargo xtask bench e2e [ARGS...]            # the same as --only e2e
//! ```
//!
//! PART: `datapath`, `sync` (alias `control-plane`), `e2e`; all three run
//! without a selection. ARGS go to the datapath bench when it runs (as they
//! always did), otherwise to the single part selected.
//! `--prebuilt`: skip the build and use the artifacts named by
//! LB_AGENT_BIN, LBCTL_BIN and LB_EBPF_OBJECT (all three must be set).

use anyhow::{bail, Result};

use crate::build::{build, export_artifact_env};
use crate::setup::setup;
use crate::util::{cmd, is_root, section};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Datapath,
    Sync,
    E2e,
}

impl Part {
    const ALL: [Part; 3] = [Part::Datapath, Part::Sync, Part::E2e];

    fn parse(s: &str) -> Option<Part> {
        match s {
            "datapath" => Some(Part::Datapath),
            "sync" | "control-plane" => Some(Part::Sync),
            "e2e" => Some(Part::E2e),
            _ => None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    parts: Vec<Part>,
    prebuilt: bool,
    /// (part, its arguments)
    args: Option<(Part, Vec<String>)>,
}

fn plan(args: &[String]) -> Result<Plan> {
    let mut parts: Vec<Part> = Vec::new();
    let mut prebuilt = false;
    let mut rest = Vec::new();
    let mut i = 0;
    let add = |list: &str, parts: &mut Vec<Part>| -> Result<()> {
        for p in list.split(',') {
            match Part::parse(p) {
                Some(p) if !parts.contains(&p) => parts.push(p),
                Some(_) => {}
                None => bail!("unknown bench part {p:?} (datapath, sync, e2e)"),
            }
        }
        Ok(())
    };
    // Options of xtask itself come first; everything after is the bench's.
    while i < args.len() {
        match args[i].as_str() {
            "--" => {
                i += 1;
            }
            "--only" => {
                let Some(list) = args.get(i + 1) else {
                    bail!("--only needs a part: datapath, sync, e2e");
                };
                add(list, &mut parts)?;
                i += 2;
            }
            a if a.starts_with("--only=") => {
                add(&a["--only=".len()..], &mut parts)?;
                i += 1;
            }
            "--prebuilt" => {
                prebuilt = true;
                i += 1;
            }
            a if parts.is_empty() && rest.is_empty() && Part::parse(a).is_some() => {
                add(a, &mut parts)?;
                i += 1;
            }
            _ => break,
        }
    }
    rest.extend(args[i..].iter().cloned());
    if parts.is_empty() {
        parts = Part::ALL.to_vec();
    }
    // Keep the order of the default run whatever the selection's order.
    parts.sort_by_key(|p| Part::ALL.iter().position(|q| q == p));
    let args = if rest.is_empty() {
        None
    } else if parts.contains(&Part::Datapath) {
        Some((Part::Datapath, rest))
    } else if parts.len() == 1 {
        Some((parts[0], rest))
    } else {
        bail!("arguments {rest:?}: select the one part they are for with --only");
    };
    Ok(Plan {
        parts,
        prebuilt,
        args,
    })
}

/// The artifacts named in the environment (`--prebuilt`).
fn prebuilt_artifacts() -> Result<()> {
    for var in ["LB_AGENT_BIN", "LBCTL_BIN", "LB_EBPF_OBJECT"] {
        match std::env::var_os(var) {
            Some(v) if std::path::Path::new(&v).exists() => {
                println!("using {var}={}", v.to_string_lossy());
            }
            Some(v) => bail!("--prebuilt: {var}={} does not exist", v.to_string_lossy()),
            None => bail!("--prebuilt needs LB_AGENT_BIN, LBCTL_BIN and LB_EBPF_OBJECT set"),
        }
    }
    Ok(())
}

/// What the end-to-end part needs beyond `setup`: nginx for the backends.
/// (nftables and iptables come with `setup`.)
fn ensure_e2e_packages() -> Result<()> {
    if cmd("sh").args(["-c", "command -v nginx"]).probe() {
        return Ok(());
    }
    if !is_root() {
        bail!("the e2e bench needs nginx: run `sudo apt-get install nginx-light`");
    }
    // The bench runs its own nginx processes inside test namespaces only;
    // the package's system service must not start (it would listen in the
    // machine's own namespace). Debian's policy-rc.d says so to
    // invoke-rc.d and deb-systemd-invoke for the time of the install.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            policy,
            "#!/bin/sh\n# lb xtask bench: no service starts\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = cmd("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .and_then(|()| {
            cmd("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "nginx-light",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .run()
        });
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn run_part(part: Part, args: &[String]) -> Result<()> {
    let (title, bin) = match part {
        Part::Datapath => ("bench: datapath", "lb-bench"),
        Part::Sync => ("bench: control plane", "lb-bench-sync"),
        Part::E2e => (
            "bench: end to end (lb vs kube-proxy iptables/nftables vs direct)",
            "lb-bench-e2e",
        ),
    };
    section(title);
    if part == Part::E2e {
        ensure_e2e_packages()?;
    }
    cmd("cargo")
        .args(["run", "--release", "-p", "lb-tests", "--bin", bin, "--"])
        .args(args.iter())
        .run()
}

/// The benchmarks: the datapath per packet (BPF_PROG_TEST_RUN), the
/// agent's control plane at 10,000 Services (cluster mode against the fake
/// API server), and lb end to end against kube-proxy's iptables and
/// nftables layouts in the netns topology. See the module documentation
/// for selecting parts and where arguments go.
pub fn bench(args: &[String]) -> Result<()> {
    let plan = plan(args)?;
    setup(false)?;
    if plan.prebuilt {
        prebuilt_artifacts()?;
    } else {
        build()?;
        export_artifact_env();
    }
    for part in &plan.parts {
        let args = match &plan.args {
            Some((p, a)) if p == part => a.clone(),
            _ => Vec::new(),
        };
        run_part(*part, &args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Plan> {
        plan(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn default_runs_every_part_and_gives_arguments_to_the_datapath_bench() {
        let all = p(&[]).unwrap();
        assert_eq!(all.parts, Part::ALL);
        assert_eq!(all.args, None);
        let with_args = p(&["--rounds", "3"]).unwrap();
        assert_eq!(with_args.parts, Part::ALL);
        assert_eq!(
            with_args.args,
            Some((Part::Datapath, vec!["--rounds".into(), "3".into()]))
        );
    }

    #[test]
    fn parts_run_alone() {
        for args in [
            &["e2e"][..],
            &["--only", "e2e"],
            &["--", "e2e"],
            &["--only=e2e"],
        ] {
            let plan = p(args).unwrap();
            assert_eq!(plan.parts, [Part::E2e], "{args:?}");
            assert_eq!(plan.args, None);
        }
        let e2e = p(&["--only", "e2e", "--rounds", "2", "--no-pps"]).unwrap();
        assert_eq!(
            e2e.args,
            Some((
                Part::E2e,
                vec!["--rounds".into(), "2".into(), "--no-pps".into()]
            ))
        );
        let two = p(&["--only", "e2e,datapath", "--rounds", "2"]).unwrap();
        assert_eq!(two.parts, [Part::Datapath, Part::E2e]);
        assert_eq!(two.args.unwrap().0, Part::Datapath);
        assert_eq!(p(&["--only", "control-plane"]).unwrap().parts, [Part::Sync]);
        assert!(p(&["--only", "sync,e2e", "--rounds", "2"]).is_err());
        assert!(p(&["--only", "bogus"]).is_err());
        assert!(p(&["--prebuilt", "e2e"]).unwrap().prebuilt);
    }
}
