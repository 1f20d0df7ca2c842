#!/usr/bin/env bash
# Packs the Python packages that the lent GPU machines lack (DALI for CUDA 13 with the nvImageCodec
# and nvJPEG libraries it loads to decode JPEGs, and pycocotools) for the device tool, which carries
# at most 64 MiB a call, working tree included, and reaches no package index.
#
# Writes .device/part1/, .device/part2/, ... (git-ignored), each under PART_MIB (default 58) MiB:
# one xz-compressed tar of the packages' files, ready to unpack into site-packages, split in pieces,
# and part1/MANIFEST ("<parts> <sha256 of the whole .tar.xz> <what it holds>").
#
# Then, on a warm machine, one call per part, back to back (a machine goes back after 30 s idle):
#   run(command="true",                       carry=[".device/part1"])
#   run(command="true",                       carry=[".device/part2"])   ...
#   run(command="tools/gpu_check.sh /tmp/gc $OUT", carry=[".device/partN"])
# Ignored paths a call does not name stay on the machine, so the last call finds every part;
# gpu_check.sh checks the sum and unpacks them into the interpreter's site-packages.
#
#   usage: tools/device_bundle.sh      (PYTHON, PYVER=3.12: the device image's Python, DALI, PART_MIB)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
pyver=${PYVER:-3.12}
dali=${DALI:-nvidia-dali-cuda130==2.4.0}
part_mib=${PART_MIB:-58}
out=$repo/.device
# On the device image already (KINDS.md of the device tool): left out, so that its versions stay.
on_image='^(numpy|scipy|pyyaml|six|packaging|typing_extensions|wheel)-'
# What decoding COCO's JPEGs never loads (BENCHMARKS.md, "Running it with DALI"): DALI's wheel
# requires them, but links none: libdali_operators.so dlopens nvCOMP only for the operators that
# decompress, and nvImageCodec loads one extension a format (JPEG 2000 and TIFF ones dropped below).
# nvJPEG (GPU decoding) and libjpeg-turbo (the CPU fallback) stay.
not_for_jpeg='^nvidia_(libnvcomp|nvjpeg2k|nvtiff)_'

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/wheels" "$stage/site"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
echo "device_bundle: downloading $dali and pycocotools for CPython $pyver" >&2
$py -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp "${platforms[@]}" \
  -d "$stage/wheels" "$dali" pycocotools
held=()
for wheel in "$stage/wheels"/*.whl; do
  name=$(basename "$wheel")
  [[ $name =~ $on_image || $name =~ $not_for_jpeg ]] && continue
  held+=("${name%%-*}")
  unzip -q -o "$wheel" -d "$stage/site"
done
# What this Python never loads: the extension modules built for other CPython versions, C++ headers,
# the wheels' scripts, and nvidia/__init__.py (nvidia must stay a namespace package beside the
# image's nvidia-* libraries).
abi="cpython-${pyver/./}-"
find "$stage/site" -name '*.cpython-3*' ! -name "*${abi}*" -delete
rm -rf "$stage/site/nvidia/dali/include" "$stage/site"/*.data "$stage/site/nvidia/__init__.py"
for ext in nvjpeg2k nvtiff tiff; do  # nvImageCodec's JPEG 2000 and TIFF decoders
  found=("$stage/site/nvidia/nvimgcodec/extensions/lib${ext}_ext.so"*)
  [ -e "${found[0]}" ] || { echo "device_bundle: no nvImageCodec lib${ext}_ext to leave out (renamed?)" >&2; continue; }
  rm -f "${found[@]}"
done
[ -n "$(find "$stage/site/nvidia/dali" -name "backend_impl.${abi}*")" ] \
  || { echo "device_bundle: $dali has no extension for CPython $pyver" >&2; exit 1; }

echo "device_bundle: compressing $(du -sh "$stage/site" | cut -f1) (xz -9, a few minutes on 2 cores)" >&2
tar -C "$stage/site" -cf - . | xz -9 -T0 > "$stage/bundle.tar.xz"
sha=$(sha256sum "$stage/bundle.tar.xz" | cut -d' ' -f1)
split -b "${part_mib}M" -d -a 2 "$stage/bundle.tar.xz" "$stage/piece."
rm -rf "$out"/part*
pieces=("$stage"/piece.*)
for k in "${!pieces[@]}"; do
  mkdir -p "$out/part$((k + 1))"
  mv "${pieces[$k]}" "$out/part$((k + 1))/bundle.xz.$((k + 1))"
done
echo "${#pieces[@]} $sha ${held[*]}" > "$out/part1/MANIFEST"
echo "device_bundle: ${#pieces[@]} parts in $out ($(du -sh "$stage/bundle.tar.xz" | cut -f1) compressed): ${held[*]}" >&2
