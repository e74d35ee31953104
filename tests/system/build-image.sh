#!/usr/bin/env bash
# Builds (once) the Debian bookworm root filesystem the container tests boot
# with systemd-nspawn, and prints its path on the last line of stdout.
#
#   tests/system/build-image.sh            # base image only
#
# The image is cached as $DEPLOY_AGENT_IMAGE_CACHE/base-<hash> (default
# /var/cache/deploy-agent-tests, outside the clone, so a fresh clone's CI
# finds it built), where <hash> covers this script and the package list
# below: it is rebuilt only when either changes. Builds are serialized by a
# lock, so .ci/run can start one in the background and the container test
# waits for it instead of starting its own. The .deb is NOT baked in: it changes on every build, and the tests
# install it inside each booted container with `dpkg -i` (the operator's own
# path), in the container's throwaway overlay. See docs/containers.md.
#
# If this script dies midway, only a `base-<hash>.tmp.*` directory is left:
# the final directory appears by rename after debootstrap succeeded, and the
# next run deletes stale temporaries.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/../.."

SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,ca-certificates,curl,python3
OUT=${DEPLOY_AGENT_IMAGE_CACHE:-/var/cache/deploy-agent-tests}

if [ "$(id -u)" != 0 ]; then
  echo "build-image.sh: debootstrap needs root" >&2
  exit 2
fi
command -v debootstrap >/dev/null || { echo "build-image.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 2; }

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
hash=$( { cat "$self"; echo "$SUITE $INCLUDE"; } | sha256sum | cut -c1-16)
base=$OUT/base-$hash
if [ -f "$base/.image-complete" ]; then
  echo "$base"
  exit 0
fi

# The mirror apt already uses here (deb822 .sources first, then sources.list).
mirror=$(
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources || true;
    grep -hs '^deb ' /etc/apt/sources.list || true; } |
  awk '$1 == "URIs:" {print $2} $1 == "deb" {print ($2 ~ /^\[/ ? $3 : $2)}' |
  grep -v -e security -e '^$' | head -n1 || true
)
mirror=${mirror:-http://deb.debian.org/debian}

# Stale temporaries and older images (a different hash) are garbage.
find "$OUT" -maxdepth 1 -name 'base-*' ! -name "base-$hash" -exec rm -rf {} +
tmp=$(mktemp -d "$OUT/base-$hash.tmp.XXXXXX")
echo "build-image.sh: debootstrap $SUITE from $mirror into $tmp (about 3-4 minutes)" >&2
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$mirror" >&2
# A container needs an identity and no first-boot wizard; the tests give
# each its own hostname with nspawn --hostname.
rm -f "$tmp/etc/machine-id" && : > "$tmp/etc/machine-id"
# Slimmer image: the apt lists and .debs are not needed at test time.
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
touch "$tmp/.image-complete"
mv "$tmp" "$base"
echo "$base"
