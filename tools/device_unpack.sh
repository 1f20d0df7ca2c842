#!/usr/bin/env bash
# Unpacks a bundle written by tools/device_bundle.sh (DIR/part1/MANIFEST, DIR/partK/bundle.xz.K)
# into SITE (a site-packages folder), once every part is there and their sha256 is the manifest's.
#
#   usage: tools/device_unpack.sh DIR SITE
set -euo pipefail
dir=${1:?usage: tools/device_unpack.sh DIR SITE}
site=${2:?usage: tools/device_unpack.sh DIR SITE}
manifest=$dir/part1/MANIFEST
[ -s "$manifest" ] || { echo "device_unpack: $manifest is missing or empty" >&2; exit 1; }
read -r parts sha held < "$manifest"
[[ $parts =~ ^[1-9][0-9]*$ && $sha =~ ^[0-9a-f]{64}$ ]] \
  || { echo "device_unpack: $manifest: expected '<parts> <sha256> <packages>', got '$(head -c 200 "$manifest")'" >&2; exit 1; }
pieces=()
for k in $(seq 1 "$parts"); do
  piece=$dir/part$k/bundle.xz.$k
  [ -f "$piece" ] || { echo "device_unpack: $piece is missing: carry all $parts parts of $dir" >&2; exit 1; }
  pieces+=("$piece")
done
got=$(cat "${pieces[@]}" | sha256sum | cut -d' ' -f1)
[ "$got" = "$sha" ] || { echo "device_unpack: the $parts parts of $dir sum to sha256 $got, $manifest says $sha" >&2; exit 1; }
mkdir -p "$site"
cat "${pieces[@]}" | xz -d -T0 | tar -x -C "$site"
echo "device_unpack: $held -> $site"
