# CI only: a stand-in for prom/prometheus, from the locally debootstrapped Debian bookworm and
# Debian's prometheus package (2.42). docker-compose.yml passes the same flags as to the official
# image; its health check needs wget, as the official (busybox) image has.
ARG DEBIAN_IMAGE=distill-swarm-ci/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
