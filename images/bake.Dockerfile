# The bake image: a pinned Packer with a pinned Amazon plugin, run by bake pods as
# `packer build <template>` (see src/bake/pod.rs). Build:
#   docker build -f images/bake.Dockerfile -t <registry>/baker-bake:packer-1.9.4 images
# Point the chart's `bakeImage` (or a BakeTemplate's `packerImage`) at the result.

ARG PACKER_VERSION=1.9.4
ARG AMAZON_PLUGIN_VERSION=1.2.9

FROM docker.io/hashicorp/packer:${PACKER_VERSION} AS packer

FROM docker.io/library/debian:bookworm-slim
ARG AMAZON_PLUGIN_VERSION
# ca-certificates for the AWS APIs; openssh-client for the ssh communicator.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates openssh-client \
    && rm -rf /var/lib/apt/lists/*
COPY --from=packer /bin/packer /usr/local/bin/packer
# Plugins live outside any home directory, readable by the non-root uid bake pods run as.
ENV PACKER_PLUGIN_PATH=/opt/packer/plugins \
    CHECKPOINT_DISABLE=1
RUN mkdir -p /opt/packer/plugins \
    && packer plugins install github.com/hashicorp/amazon "v${AMAZON_PLUGIN_VERSION}" \
    && chmod -R a+rX /opt/packer \
    && packer plugins installed | grep -q "amazon_v${AMAZON_PLUGIN_VERSION}"
# The uid bake pods run as (src/bake/pod.rs BAKE_UID) unless a chroot builder needs root.
USER 65532:65532
ENTRYPOINT []
CMD ["packer", "version"]
