# syntax=docker/dockerfile:1
# The relate-smtp container image: a drop-in for the original's `smtp` image
# (api/Dockerfile, target smtp): same ports, same user name, same health URL, same
# environment variables. docs/deploy.md has the compose service and Kubernetes notes.
#
#   docker build -t relate-smtp .
#   docker run IMAGE                      # serves (the default command is `serve`)
#   docker run IMAGE db init              # any other relate-smtp command
#
# BASE: a Debian-family image with python3 (3.11 or newer) and its venv module.
# podman/buildah: add `--format docker`, as the OCI image format has no HEALTHCHECK.
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relate_smtp relate_smtp/
RUN python3 -m venv /opt/relate-smtp \
 && /opt/relate-smtp/bin/pip install . \
 && /opt/relate-smtp/bin/pip uninstall --yes pip setuptools \
 && /opt/relate-smtp/bin/python3 -c "import relate_smtp.cli, relate_smtp.runtime.run"

FROM ${BASE}
# wget: the original compose file's health check (`wget -q --spider …/healthz`).
RUN if ! command -v wget >/dev/null; then \
        apt-get update \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
     && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --gid 1654 app \
 && useradd --uid 1654 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app
COPY --from=build /opt/relate-smtp /opt/relate-smtp
COPY image/relate-smtp.sh /usr/local/bin/relate-smtp
# Ports below 1024 without root and without a sysctl: a copy of the interpreter that
# only this image's entrypoint uses carries the file capability cap_net_bind_service
# (permitted + effective; security.capability xattr, VFS revision 2, bit 10), written
# here directly so that no libcap tools are needed.
RUN python=$(readlink -f /opt/relate-smtp/bin/python3) \
 && cp "$python" /opt/relate-smtp/bin/python3-netbind \
 && /opt/relate-smtp/bin/python3 -c "import os, struct; os.setxattr('/opt/relate-smtp/bin/python3-netbind', 'security.capability', struct.pack('<5I', 0x02000001, 1 << 10, 0, 0, 0))" \
 && chmod 0755 /usr/local/bin/relate-smtp \
 && mkdir -p /app

# Same as the original's smtp stage: user `app` (UID 1654; numeric here so that
# Kubernetes' runAsNonRoot can verify it), working directory /app (appsettings.json is
# read from there), these ports and this health URL.
WORKDIR /app
USER 1654:1654
ENV PATH=/opt/relate-smtp/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DOTNET_ENVIRONMENT=Production \
    HealthCheck__Url=http://+:8081
EXPOSE 25 587 465 8081

LABEL org.opencontainers.image.title="relate-smtp" \
      org.opencontainers.image.description="SMTP server for receiving emails (Relate), on Python and Trio"

# Follows HealthCheck__Url's port (8081 unless changed).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD port=$(printf '%s\n' "${HealthCheck__Url%%;*}" | sed -n 's|^[A-Za-z]*://[^/]*:\([0-9][0-9]*\).*|\1|p'); \
        wget -q -T 5 --spider "http://localhost:${port:-80}/healthz" || exit 1

# Exec form: the server is PID 1 and receives SIGTERM itself (graceful shutdown).
ENTRYPOINT ["/usr/local/bin/relate-smtp"]
CMD ["serve"]
