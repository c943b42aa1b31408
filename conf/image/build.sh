#!/bin/sh
# Builds the podid container image offline: the four binaries static (glibc and openssl linked
# in, no dynamic loader) for the host triple, then `podman build` of a FROM scratch image.
#   conf/image/build.sh [IMAGE]      default IMAGE: ghcr.io/podid/podid:<workspace version>
# Prints the image name on its last line. Needs: cargo, libssl-dev (libssl.a), podman, strip,
# and a CA bundle at /etc/ssl/certs/ca-certificates.crt (Debian's ca-certificates).
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
image=${1:-ghcr.io/podid/podid:$version}
triple=$(rustc -vV | sed -n 's/^host: //p')
target_dir=${CARGO_TARGET_DIR:-$root/target}
ca_bundle=/etc/ssl/certs/ca-certificates.crt
bins="podid podid-tokend podid-controller podid-install"

[ -n "$version" ] || { echo "build.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
[ -s "$ca_bundle" ] || { echo "build.sh: $ca_bundle is missing: install ca-certificates" >&2; exit 1; }

# --target names the host triple so that +crt-static applies to the binaries and not to build
# scripts and proc macros; OPENSSL_STATIC links libssl.a/libcrypto.a into tokend.
RUSTFLAGS="-C target-feature=+crt-static" OPENSSL_STATIC=1 cargo build --release --quiet \
    --target "$triple" \
    -p podid-cni --bin podid \
    -p podid-tokend --bin podid-tokend \
    -p podid-controller --bin podid-controller \
    -p podid-install --bin podid-install

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
for bin in $bins; do
    # Debug info off (line tables are most of the size), symbols kept for backtraces.
    strip --strip-debug -o "$context/$bin" "$target_dir/$triple/release/$bin"
done
cp "$ca_bundle" "$context/ca-certificates.crt"
cp conf/image/Containerfile "$context/"

previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
podman build --quiet --pull=never --network=none --file "$context/Containerfile" \
    --tag "$image" "$context" >/dev/null
# Unchanged binaries hit the layer cache and give the same image; a changed build leaves the
# previous one untagged: remove it (and its layers) rather than pile them up.
current=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$image"
