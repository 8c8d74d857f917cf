#!/usr/bin/env bash
# Build and run the decode-layout study (see main.cpp): bash bench/decode_layouts/run.sh [K N]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
g++ -std=c++17 -O3 -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni \
  "$root/bench/decode_layouts/main.cpp" -o "$out/decode_layouts"
"$out/decode_layouts" "$@"
