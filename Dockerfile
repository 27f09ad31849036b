# Multi-stage build: compile with the Rust toolchain, run on a slim Debian
# with a non-root user.
FROM rust:1-slim-bookworm AS build
# make: the jemalloc allocator (tikv-jemalloc-sys) builds its C sources with it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member must be present for Cargo to load the
# workspace, though only the server is built.
COPY crates ./crates
RUN cargo build --release --locked --bin switchboard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home switchboard
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
COPY config/default.toml /etc/switchboard/default.toml
# The demo chat and dashboard, served only where SWITCHBOARD__SERVER__STATIC_DIR
# points here (docker-compose.yml does).
COPY web /usr/share/switchboard/web
ENV SWITCHBOARD_CONFIG=/etc/switchboard/default.toml
# Every interface of the container, even with auth.dev_tokens on (whose
# default is loopback, unreachable from outside a container): who can reach
# it is decided where its port is published.
ENV SWITCHBOARD__SERVER__HOST=0.0.0.0
USER switchboard
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health/live || exit 1
ENTRYPOINT ["switchboard"]
CMD ["serve"]
