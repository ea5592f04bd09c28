#!/bin/sh
# The container's entrypoint, started by tini (PID 1), which passes SIGTERM on.  docs/docker.md.
#
#   (no arguments) or serve [ARGS]   serve, with ARGS added to `xksproxy serve -c CONFIG`:
#       $XKSPROXY_CONFIG if set (a missing file is the proxy's configuration error, exit 78),
#       else /etc/xksproxy/xksproxy.toml if it exists, else a SoftHSM rig in $XKSPROXY_RIG_DIR,
#       made on first start by `xksproxy dev-setup`, which prints the rig's KMS console JSON
#       (listening on $XKSPROXY_RIG_HOST, default 0.0.0.0, ports $XKSPROXY_RIG_PORT, default
#       8000, and $XKSPROXY_RIG_METRICS_PORT, default 9100).  $XKSPROXY_WORKERS: worker count.
#       docker/healthcheck.py finds the configuration by the same rule: change both together.
#   an xksproxy command (check, keys, credentials, ...)   run it: `xksproxy ARGS`
#   anything else                                        run it as is (a shell, for one)
#
# The proxy is exec'd, never run as a child of this shell: SIGTERM from `docker stop` reaches
# it, and it drains (answers the requests in flight, closes its HSM sessions, exits 0).
set -eu

[ "$#" -gt 0 ] || set -- serve
case "$1" in
    serve) shift ;;
    dev-setup | keys | credentials | kms-config | policy | audit | check | capacity | -*) exec xksproxy "$@" ;;
    *) exec "$@" ;;
esac

if [ -n "${XKSPROXY_CONFIG:-}" ]; then
    config=$XKSPROXY_CONFIG
elif [ -f /etc/xksproxy/xksproxy.toml ]; then
    config=/etc/xksproxy/xksproxy.toml
else
    rig=${XKSPROXY_RIG_DIR:-/var/lib/xksproxy/rig}
    echo "xksproxy-entrypoint: no configuration mounted: serving a SoftHSM rig in $rig" \
        "(a demonstration: its PIN and credential live in that directory; never for real keys)" >&2
    # Listen on every interface of the container: a published port arrives on its own
    # interface, not on loopback.  An existing rig keeps its addresses and ports.
    host=${XKSPROXY_RIG_HOST:-0.0.0.0}
    xksproxy dev-setup "$rig" \
        --host "$host" --port "${XKSPROXY_RIG_PORT:-8000}" \
        --metrics-host "$host" --metrics-port "${XKSPROXY_RIG_METRICS_PORT:-9100}" || {
        echo "xksproxy-entrypoint: no rig in $rig: it needs a directory writable by" \
            "uid $(id -u) (with --read-only: -v xksproxy-rig:/var/lib/xksproxy)" >&2
        exit 1
    }
    config=$rig/xksproxy.toml
fi

if [ -n "${XKSPROXY_WORKERS:-}" ]; then
    # CPU limits (--cpus, a Kubernetes limit) do not show in the CPU count the proxy sees.
    set -- --workers "$XKSPROXY_WORKERS" "$@"
fi
exec xksproxy serve -c "$config" "$@"
