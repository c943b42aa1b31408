#!/usr/bin/env bash
# The local demo: one simulated Kubernetes node on this machine, with podid's real binaries, the
# seeds' rgapi example and Python azure-identity in a pod. Needs root (network namespaces,
# nftables); touches nothing of the machine's own network, /etc/cni, /opt/cni or /var/lib/podid.
# Installs what is missing (the system packages .ci/run installs, the Python SDK venv), builds,
# and runs tests/src/bin/podid-demo.rs. Ctrl-C stops it and removes everything it created.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: run as root (sudo ./demo.sh): the demo creates network namespaces and nftables tables" >&2
    exit 1
fi

# What .ci/run installs for the build and the node data path, where missing.
packages=(nftables iproute2 containernetworking-plugins libssl-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The real Python SDK the pod runs, pinned as .ci/run pins it.
if [ ! -x target/sdk/venv/bin/python ]; then
    echo "==> creating the Python venv target/sdk/venv (azure-identity, tests/sdk/python/requirements.txt)"
    python3 -m venv target/sdk/venv
    target/sdk/venv/bin/pip install -q --disable-pip-version-check -r tests/sdk/python/requirements.txt
fi

echo "==> building and starting podid-demo (cargo run --release; the first build takes a few minutes)"
exec cargo run --quiet --release -p podid-tests --bin podid-demo -- "$@"
