# xksproxy: the AWS KMS external key store proxy, and SoftHSM for a rig that runs with no HSM.
# docs/docker.md says how to run it, and how to point it at a real HSM's PKCS#11 library.
#
#   docker build -t xksproxy .
#   docker run --rm -p 8000:8000 xksproxy               # no configuration: a SoftHSM rig
#   docker run --rm -p 8000:8000 -v /etc/xksproxy:/etc/xksproxy:ro \
#       -e XKSPROXY_CONFIG=/etc/xksproxy/xksproxy.toml xksproxy
#
# Debian, not Alpine: the HSM vendors' PKCS#11 libraries are glibc (x86_64) builds, and
# Debian 12's Python 3.11 is the version the project is tested on.
ARG BASE=debian:bookworm-slim

# --- build: the virtualenv, from hash-pinned wheels only (no compiler in either stage) --------
FROM ${BASE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY docker/requirements.txt docker/requirements.txt
# Behind a TLS-intercepting proxy, give pip its CA as a build secret, never a layer:
#   docker build --secret id=pip-ca,src=/path/to/ca.pem .
RUN --mount=type=secret,id=pip-ca \
    python3 -m venv /opt/xksproxy \
    && if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/xksproxy/bin/pip install --no-cache-dir --disable-pip-version-check \
        --require-hashes --only-binary :all: -r docker/requirements.txt
COPY pyproject.toml README.md ./
COPY xksproxy xksproxy
# The project itself, offline, against the pinned setuptools; then pip and setuptools go:
# nothing in the image installs packages.
RUN /opt/xksproxy/bin/pip install --no-cache-dir --disable-pip-version-check \
        --no-index --no-deps --no-build-isolation . \
    && /opt/xksproxy/bin/pip uninstall -y --disable-pip-version-check pip setuptools \
    && /opt/xksproxy/bin/python -I -c 'import pkcs11, aiohttp, xksproxy.cli'

# --- runtime --------------------------------------------------------------------------------
FROM ${BASE}
LABEL org.opencontainers.image.title="xksproxy" \
      org.opencontainers.image.description="AWS KMS external key store (XKS) proxy over PKCS#11 HSMs" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3: the proxy (the virtualenv links to it); softhsm2: the rig (no configuration mounted);
# tini: PID 1, which passes signals on and reaps orphans (a Python PID 1 would ignore SIGTERM
# until its handler is installed); ca-certificates: for vendor clients that call out over TLS.
# No setuid/setgid programs stay: the proxy never needs to gain privileges.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 softhsm2 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && find / -xdev -type f -perm /6000 -exec chmod a-s {} + \
    && groupadd --gid 10001 xksproxy \
    && useradd --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/xksproxy --shell /usr/sbin/nologin xksproxy \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/xksproxy \
    && install -d -m 0755 /etc/xksproxy
COPY --from=build /opt/xksproxy /opt/xksproxy
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/xksproxy-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/xksproxy-healthcheck
ENV PATH=/opt/xksproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XKSPROXY_RIG_DIR=/var/lib/xksproxy/rig
# Numeric, so that a runtime can see it is not root (Kubernetes runAsNonRoot) without /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/xksproxy
# 8000: the XKS API and /ping (443 in the vendor samples: see docs/docker.md); 9100: /metrics.
EXPOSE 8000 9100
# The proxy stops accepting, answers the requests in flight, closes its HSM sessions, exits 0.
STOPSIGNAL SIGTERM
# /ping on the configured port (http or https), or the metrics under mutual TLS: healthcheck.py.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/xksproxy-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/xksproxy-entrypoint"]
CMD ["serve"]
