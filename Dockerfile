# syntax=docker/dockerfile:1
#
# Image of lb-agent (and lbctl, for `kubectl exec ... lbctl services`).
#
#   docker build -t REGISTRY/lb-agent:0.1.0 .
#
# The build stage builds exactly what `cargo xtask build` builds on a developer
# machine (TOOLCHAIN.md): the eBPF object with nightly + rust-src + bpf-linker
# linked against the nightly's own LLVM, then lb-agent and lbctl with the
# object embedded. The runtime stage holds only the two binaries.

FROM rust:1.95.0-bookworm AS builder

# The nightly that builds lb-ebpf (verified: rustc 1.97.0-nightly 2026-05-19,
# LLVM 22), and the bpf-linker release xtask pins.
ARG RUST_NIGHTLY=nightly-2026-05-20
ARG BPF_LINKER_VERSION=0.13.0

# Userspace on the stable toolchain of this image (rust-toolchain.toml says
# "stable"; this keeps it at 1.95 instead of downloading the newest).
ENV RUSTUP_TOOLCHAIN=1.95.0

# xtask runs `cargo +nightly`: make "nightly" the pinned one.
RUN rustup toolchain install "$RUST_NIGHTLY" --profile minimal --component rust-src \
 && host=$(rustc -vV | sed -n 's/^host: //p') \
 && ln -s "$RUSTUP_HOME/toolchains/$RUST_NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host" \
 && rustc +nightly -vV

# bpf-linker against the nightly's libLLVM (no prebuilt one, no system LLVM).
RUN sysroot=$(rustc +nightly --print sysroot) \
 && lib=$(ls "$sysroot"/lib/libLLVM.so.*-rust-* | head -1) \
 && major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p') \
 && prefix="$CARGO_HOME/lb-llvm" \
 && mkdir -p "$prefix/lib" \
 && ln -sf "$lib" "$prefix/lib/libLLVM.so" \
 && ln -sf "$lib" "$prefix/lib/$(basename "$lib")" \
 && LLVM_PREFIX="$prefix" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
      --no-default-features --features "llvm-$major" \
 && bpf-linker --version

WORKDIR /src
COPY . .
RUN cargo xtask build

# ---------------------------------------------------------------------------

FROM debian:bookworm-slim

# CA roots for an API server reached through a kubeconfig; in a pod the
# service account's CA is used. Nothing else: the binaries need only glibc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /src/target/release/lb-agent /src/target/release/lbctl /usr/local/bin/

# The agent runs as root (uid 0), on purpose: loading BPF programs, attaching
# them to the node's interfaces and cgroups and mounting bpffs need CAP_BPF,
# CAP_NET_ADMIN and CAP_SYS_ADMIN in the host's namespaces (the chart runs it
# privileged). There is no useful unprivileged mode to fall back to.
USER 0:0

ENTRYPOINT ["lb-agent"]
