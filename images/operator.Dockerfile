# The Baker operator: a static-enough Rust binary on a distroless, non-root base.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t <registry>/baker:<version> .
# The chart's `image.repository` / `image.tag` point at the result.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a change to Baker's own code rebuilds only Baker.
COPY Cargo.toml Cargo.lock ./
COPY tests/rig/node/Cargo.toml tests/rig/node/Cargo.toml
RUN mkdir -p src tests/rig/node/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > tests/rig/node/src/main.rs \
    && cargo build --release --locked --bin baker || true
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin baker

# cc variant: glibc and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/baker /usr/local/bin/baker
# The chart runs with a read-only root filesystem: Baker writes nothing to disk.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/baker"]
CMD ["run"]
