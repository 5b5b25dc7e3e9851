//! Embeds the eBPF object so lb-agent stands alone.
//!
//! The object is built by `cargo xtask build-ebpf` (nightly + bpf-linker) at
//! target/bpfel-unknown-none/release/lb-ebpf, or wherever LB_EBPF_OBJECT points.
//! Without it the build fails and says how to get one: an agent with an empty
//! object would only fail when it starts. Every xtask command that compiles
//! lb-userspace (build, test, demo, bench) builds the object first.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let from_env = std::env::var_os("LB_EBPF_OBJECT").map(PathBuf::from);
    let object = from_env.clone().unwrap_or_else(|| {
        manifest_dir
            .parent()
            .expect("workspace root")
            .join("target/bpfel-unknown-none/release/lb-ebpf")
    });
    println!("cargo:rerun-if-changed={}", object.display());
    let problem = match std::fs::read(&object) {
        Ok(bytes) if bytes.starts_with(b"\x7fELF") => {
            let out =
                PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("lb-ebpf.o");
            std::fs::write(&out, bytes).expect("write OUT_DIR/lb-ebpf.o");
            return;
        }
        Ok(bytes) if bytes.is_empty() => "is empty".to_string(),
        Ok(_) => "is not an ELF object".to_string(),
        Err(e) => format!("cannot be read ({e})"),
    };
    let source = if from_env.is_some() {
        "LB_EBPF_OBJECT="
    } else {
        "the default path "
    };
    // `cargo::error` fails the build and shows each line as `error: ...`.
    println!(
        "cargo::error=the eBPF object that lb-agent embeds, {source}{}, {problem}",
        object.display()
    );
    println!("cargo::error=build it first with `cargo xtask build-ebpf` (or `cargo xtask build` for the agent and lbctl), or set LB_EBPF_OBJECT=<path to an lb-ebpf object built elsewhere>");
}
