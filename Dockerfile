# syntax=docker/dockerfile:1
#
# Image of lb-agent (and lbctl, for `kubectl exec ... lbctl services`), for
# machines with a registry to pull the Rust image from:
#
#   docker build -t REGISTRY/lb-agent:0.1.0 .
#
# Without a registry or a daemon, `cargo xtask image` builds the same image
# with podman (localhost/lb-agent:0.1.0; README, "Image").
#
# The build stage runs what `cargo xtask image` runs on a developer machine
# (TOOLCHAIN.md): the eBPF object with nightly + rust-src + bpf-linker linked
# against the nightly's own LLVM, then static (musl) lb-agent and lbctl with
# the object embedded, and the image's root filesystem (target/image/rootfs:
# the two binaries in /usr/local/bin, the CA bundle in /etc/ssl/certs). The
# runtime stage is FROM scratch and holds only that rootfs; its instructions
# are those of the Containerfile `cargo xtask image` writes (xtask/src/image.rs
# checks that they stay the same).

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

# Static binaries: the musl target, and musl-gcc for the C and assembly of
# ring and psm. ca-certificates: the CA bundle the image carries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl

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
# target/image/rootfs and target/image/Containerfile, no podman.
RUN cargo xtask image --context-only

# ---------------------------------------------------------------------------
# The runtime stage: the Containerfile of `cargo xtask image`, instruction for
# instruction, with the rootfs taken from the build stage. Static binaries and
# the CA roots for an API server reached through a kubeconfig (in a pod the
# service account's CA is used); nothing else: no shell, no libc.

FROM scratch
COPY --from=builder /src/target/image/rootfs/ /
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

# The agent runs as root (uid 0), on purpose: loading BPF programs, attaching
# them to the node's interfaces and cgroups and mounting bpffs need CAP_BPF,
# CAP_NET_ADMIN and CAP_SYS_ADMIN in the host's namespaces (the chart runs it
# privileged). There is no useful unprivileged mode to fall back to.
USER 0:0

ENTRYPOINT ["/usr/local/bin/lb-agent"]
