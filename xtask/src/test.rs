//! `cargo xtask test`: what CI runs. setup, build (the eBPF object first: every
//! later step that compiles lb-userspace embeds it), then rustfmt, clippy, unit
//! tests and the privileged tests of lb-tests; a summary with the counts.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::build::{build, ebpf_cargo, export_artifact_env};
use crate::setup::setup;
use crate::util::{cmd, ensure_cargo_bin_in_path, section, Cmdline};

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

pub fn test(no_setup: bool, no_lint: bool, only: Option<String>) -> Result<()> {
    let started = Instant::now();
    if !no_setup {
        setup(false)?;
    }
    ensure_cargo_bin_in_path();
    // Before any step that compiles lb-userspace (clippy, unit tests, lb-tests):
    // its build script embeds the eBPF object and fails without one.
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
            // Every other workspace member is in: a new crate needs no change here.
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
}
