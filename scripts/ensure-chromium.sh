#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's browser test when it is missing.
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (apt-get).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: /usr/bin/chromium is missing and apt-get is not available;" \
        "install Chromium by hand (the dashboard test needs it)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-chromium: /usr/bin/chromium is missing; installing it needs root:" \
        "run 'sudo apt-get update && sudo apt-get install -y chromium'" >&2
    exit 1
fi
echo "ensure-chromium: installing chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version >&2
