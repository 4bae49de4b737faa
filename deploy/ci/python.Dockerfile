# CI only: a stand-in for python:3.11-slim, from the locally debootstrapped Debian bookworm
# (scripts/ci-images; no image registry is reachable on the CI machine). Debian's own Python 3.11
# and venv module: deploy/Dockerfile builds the master image on it unchanged. libgomp1 (OpenMP,
# 300 kB) is for CI's master with the embedded backends: llama.cpp's CPU kernels need it.
ARG DEBIAN_IMAGE=distill-swarm-ci/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python
