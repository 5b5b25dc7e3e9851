//! Where the built artifacts are. `cargo xtask test` builds them first and
//! exports the environment variables; the defaults match `cargo xtask build`.

use std::path::PathBuf;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn from_env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The eBPF object built by `cargo xtask build-ebpf`.
pub fn ebpf_object() -> PathBuf {
    from_env_or(
        "LB_EBPF_OBJECT",
        workspace_root().join("target/bpfel-unknown-none/release/lb-ebpf"),
    )
}

/// Reads the eBPF object, with a message that says how to build it.
pub fn ebpf_object_bytes() -> Vec<u8> {
    let path = ebpf_object();
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the eBPF object {}: {e}; run `cargo xtask build-ebpf` (or `cargo xtask test`)",
            path.display()
        )
    })
}

pub fn lb_agent_bin() -> PathBuf {
    from_env_or(
        "LB_AGENT_BIN",
        workspace_root().join("target/release/lb-agent"),
    )
}

pub fn lbctl_bin() -> PathBuf {
    from_env_or("LBCTL_BIN", workspace_root().join("target/release/lbctl"))
}
