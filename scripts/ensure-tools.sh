#!/usr/bin/env bash
# The deployment checks' tools that no Python wheel ships (tests/test_deploy_*.py):
#   promtool  from Debian's `prometheus` package, unpacked into the venv (not installed:
#             the package would also set up a Prometheus service)
#   kubectl   (its `kustomize` renders deploy/k8s) is part of this machine image; checked.
# docker-compose and hadolint come from PyPI wheels in the [dev] extra. Idempotent.
set -euo pipefail

venv=${1:-.venv}
bin="$venv/bin"

if [ ! -x "$bin/promtool" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-tools: promtool is missing and apt-get is not available; put a" \
            "promtool binary in $bin (Prometheus release archives have one)" >&2
        exit 1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
        if [ "$(id -u)" -ne 0 ]; then
            echo "ensure-tools: cannot download Debian's prometheus package; run" \
                "'sudo apt-get update' and try again" >&2
            exit 1
        fi
        apt-get update -qq
        (cd "$tmp" && apt-get download -qq prometheus >/dev/null)
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    install -m 0755 "$tmp/root/usr/bin/promtool" "$bin/promtool"
    echo "ensure-tools: $("$bin/promtool" --version 2>&1 | head -n 1)" >&2
fi

if ! command -v kubectl >/dev/null 2>&1; then
    echo "ensure-tools: kubectl is missing (the deployment tests render deploy/k8s with" \
        "'kubectl kustomize'); install kubectl 1.27 or newer" >&2
    exit 1
fi
