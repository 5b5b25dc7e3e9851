//! What every command shares: the repository and cargo paths, the command
//! runner that prints each command (`+ ...`) before it runs, section headers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

pub fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

pub fn cargo_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

/// A command to run: program, arguments, environment changes, printed before it runs.
pub struct Cmdline {
    pub program: String,
    args: Vec<OsString>,
    envs: BTreeMap<String, Option<OsString>>,
    dir: PathBuf,
}

/// A command run from the repository root.
pub fn cmd(program: &str) -> Cmdline {
    Cmdline {
        program: program.to_string(),
        args: Vec::new(),
        envs: BTreeMap::new(),
        dir: root_dir(),
    }
}

impl Cmdline {
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: impl Into<OsString>) -> Self {
        self.envs.insert(k.to_string(), Some(v.into()));
        self
    }
    pub fn env_remove(mut self, k: &str) -> Self {
        self.envs.insert(k.to_string(), None);
        self
    }

    pub fn display(&self) -> String {
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

    pub fn command(&self) -> Command {
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
    pub fn run(&self) -> Result<()> {
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
    pub fn probe(&self) -> bool {
        self.command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs quietly and returns stdout when it exits 0. For probes.
    pub fn output(&self) -> Option<String> {
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

pub fn is_root() -> bool {
    // `id -u` avoids a libc dependency for one call.
    cmd("id")
        .arg("-u")
        .output()
        .is_some_and(|s| s.trim() == "0")
}

/// Makes $CARGO_HOME/bin part of PATH for everything we run (cargo install puts
/// bpf-linker there, and cargo +nightly must find it).
pub fn ensure_cargo_bin_in_path() {
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

/// Prints `==> title` after a blank line.
pub fn section(title: &str) {
    println!("\n==> {title}");
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_display() {
        assert_eq!(shell_quote("a-b/c=1"), "a-b/c=1");
        assert_eq!(shell_quote("-C debuginfo=2"), "'-C debuginfo=2'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
