//! Embeds the eBPF object so lb-agent stands alone.
//!
//! The object is built by `cargo xtask build-ebpf` (nightly + bpf-linker) at
//! target/bpfel-unknown-none/release/lb-ebpf, or wherever LB_EBPF_OBJECT points.
//! A plain `cargo build` without it still compiles (so unit tests and clippy
//! work on a machine without the eBPF toolchain) but the agent then refuses to
//! start and says how to build it; `cargo xtask build` always embeds it.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = std::env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest_dir
                .parent()
                .expect("workspace root")
                .join("target/bpfel-unknown-none/release/lb-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("lb-ebpf.o");
    match std::fs::read(&object) {
        Ok(bytes) => std::fs::write(&out, bytes).expect("write OUT_DIR/lb-ebpf.o"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: lb-agent will not be able to load the datapath; run `cargo xtask build`",
                object.display()
            );
            std::fs::write(&out, []).expect("write OUT_DIR/lb-ebpf.o");
        }
    }
}
