# The one `cutover` binary (coordinator, agent and CLI) in a small
# runtime image that runs as a non-root user. The agent's PostgreSQL tasks
# need libpq's tools (pg_dump, pg_restore, psql, pg_rewind, pg_basebackup),
# which the runtime stage installs and nothing else.
#
#   docker build -t cutover:dev .
#   docker run --rm cutover:dev --help

FROM rust:1.94-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cutover \
    && install -m 0755 target/release/cutover /usr/local/bin/cutover

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311* postgresql-client-15=15.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 cutover \
    && useradd --system --uid 65532 --gid cutover --home-dir /var/lib/cutover --shell /usr/sbin/nologin cutover \
    && install -d -o cutover -g cutover /var/lib/cutover /var/lib/cutover-agent
COPY --from=build /usr/local/bin/cutover /usr/local/bin/cutover
# pg_rewind and pg_basebackup live beside psql in Debian's layout.
ENV PATH="/usr/lib/postgresql/15/bin:${PATH}"
USER 65532:65532
EXPOSE 7000 9100
ENTRYPOINT ["/usr/local/bin/cutover"]
