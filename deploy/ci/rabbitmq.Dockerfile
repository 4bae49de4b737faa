# CI only: a stand-in for rabbitmq:3.13-management, from the locally debootstrapped Debian
# bookworm and Debian's rabbitmq-server (3.10). It offers what docker-compose.yml's rabbitmq
# service uses of the official image: the management plugin (the HTTP API `distill-swarm node add`
# talks to), python3 for the entrypoint that renders the definitions, conf.d, and a
# docker-entrypoint.sh that runs its arguments.
ARG DEBIAN_IMAGE=distill-swarm-ci/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends rabbitmq-server python3 \
    && rm -rf /var/lib/apt/lists/* \
    && rabbitmq-plugins --offline enable rabbitmq_management \
    && mkdir -p /etc/rabbitmq/conf.d \
    && printf '#!/bin/sh\nexec "$@"\n' > /usr/local/bin/docker-entrypoint.sh \
    && chmod 755 /usr/local/bin/docker-entrypoint.sh
# The official image listens on every interface; Debian's package default is the same, but its
# env file may pin the node to localhost.
RUN if [ -f /etc/rabbitmq/rabbitmq-env.conf ]; then \
      sed -i '/NODE_IP_ADDRESS/d' /etc/rabbitmq/rabbitmq-env.conf; fi
EXPOSE 5672 15672
CMD ["rabbitmq-server"]
