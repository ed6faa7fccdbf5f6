# syntax=docker/dockerfile:1
#
# drbd-reactor agent image: `docker build -t drbd-reactor:dev .`
#
# Two stages:
#   build   - Rust toolchain on Debian bookworm. Dependencies are compiled in their own layer from
#             Cargo.toml + Cargo.lock alone (with placeholder sources), so a change to src/ only
#             recompiles the crate itself; the cargo registry is also a BuildKit cache mount.
#   runtime - debian:bookworm-slim plus the stripped binary. No compiler, no package manager run.
#
# What the runtime image contains and why (see also docs/image.md):
#   /usr/local/bin/drbd-reactor   the agent (~7 MiB stripped; links only libc, libm, libgcc_s)
#   nsenter (util-linux)          runs the HOST's drbdsetup/drbdadm/systemctl and `where: host` UMH
#                                 commands in the host's mount/UTS/net namespaces (the pod has hostPID)
#   /bin/sh, coreutils, logger    for UMH scripts and commands run `where: container`
# All three come with bookworm-slim's required packages (util-linux, dash, coreutils, bsdutils), so
# nothing is installed. drbd-utils is deliberately NOT in the image: the agent runs the host's own
# drbdsetup through nsenter, so it always matches the host's kernel module. TLS to the API server uses
# the service-account CA, so no ca-certificates either.
# Size: bookworm-slim is ~75 MB uncompressed (~28 MB compressed) + ~7 MiB binary.
# A distroless base would save ~60 MB but has no shell (UMH scripts) and no nsenter.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=true \
    CARGO_TERM_COLOR=never

# 1. Dependencies only: the manifest and lock file with empty targets (every target the manifest
#    names must exist for cargo to load it). This layer is reused until Cargo.toml/Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    mkdir -p src/bin benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/drbd-sim.rs \
    && touch src/lib.rs \
    && for b in engine metrics sim promoter promoter_latency; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked --bin drbd-reactor \
    && rm -rf src benches

# 2. The crate itself.
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch src/lib.rs src/main.rs \
    && cargo build --release --locked --bin drbd-reactor \
    && install -D -m 0755 target/release/drbd-reactor /out/drbd-reactor

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS runtime
COPY --from=build /out/drbd-reactor /usr/local/bin/drbd-reactor
# Root is required: nsenter into PID 1's namespaces and the host's systemd.
USER 0:0
EXPOSE 9942
ENTRYPOINT ["/usr/local/bin/drbd-reactor"]
CMD ["agent"]
