# The lottery central's image: lottery-server, lottery-agency and lottery-round in one small
# Debian image, running as a non-root user. docker-compose.yaml runs it as the server and as
# every agency; config.ini and the agency files are mounted at run time, never baked in.
#
# The base images are build arguments, so another tag (or a mirror) is one flag away:
#   docker build --build-arg RUST_IMAGE=rust:1.89-slim-bookworm -t lottery .
# The runtime image must be Debian-based: the build installs netcat with apt (see below).
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /build
# The image's binaries carry no symbols or line tables (nine tenths of their size): a local release
# build keeps its line tables (Cargo.toml) for backtraces, an image is for running. Set before
# the dependencies' layer, so that both layers are built with the same profile.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols

# The dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every edit under src/. Cargo needs every target the manifest names
# (default-run names lottery-round), so each gets an empty stand-in here.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin \
 && touch src/lib.rs \
 && for bin in lottery-server lottery-agency lottery-round; do echo 'fn main() {}' > "src/bin/$bin.rs"; done \
 && cargo build --release --locked --bins \
 && rm -rf src

# Then the crate itself. COPY keeps the files' modification times, which may be older than the
# stand-ins just built; touching them makes cargo rebuild the crate rather than trust the stubs.
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/lottery-server target/release/lottery-agency target/release/lottery-round /out/

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# netcat-openbsd: scripts/probe.sh checks a running server with it, from a throw-away container
# of this image (the compose healthcheck reads /proc instead). apt's package caches go with the
# lists: a base image without Debian's docker-clean hook would otherwise keep ~75 MB of them.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends netcat-openbsd \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# A fixed uid/gid, so that files the server writes on a volume have a predictable owner.
# /var/lib/lottery is created here, owned by that user, so that a fresh named volume mounted
# there inherits the ownership and the server can write bets.csv and its round state.
RUN groupadd --system --gid 10001 lottery \
 && useradd --system --uid 10001 --gid lottery --home-dir /app --no-create-home --shell /usr/sbin/nologin lottery \
 && mkdir -p /app/.data /var/lib/lottery \
 && chown lottery:lottery /var/lib/lottery

COPY --from=builder /out/ /usr/local/bin/

# The binaries read ./config.ini (mount it at /app/config.ini) and an agency reads
# .data/agency-{CLI_ID}.csv by default (mount it under /app/.data).
WORKDIR /app
# No VOLUME here: it would give every agency container an anonymous volume of its own.
# docker-compose.yaml mounts a named volume on /var/lib/lottery for the server.
ENV SERVER_STORAGE_PATH=/var/lib/lottery/bets.csv
USER lottery:lottery
EXPOSE 12345

# Exec form: the binary is PID 1 and gets docker's SIGTERM itself (it shuts down cleanly on it).
# Agencies override the command with lottery-agency.
CMD ["/usr/local/bin/lottery-server"]
