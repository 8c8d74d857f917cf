#!/usr/bin/env bash
# Interleaved A/B of cpp/avx2/matmul_avx2.cpp at two git revisions (or working-tree files):
#   bash bench/ab_avx2/run.sh REV_A REV_B "BITS GROUP M [FLOAT [K N]]" ...
#   e.g. bash bench/ab_avx2/run.sh 9ffed4a HEAD "4 128 2" "4 128 8" "8 4096 4"
# A revision "." means the working tree. Both builds use this tree's cpp/common headers.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
src() { if [ "$1" = . ]; then cat "$root/cpp/avx2/matmul_avx2.cpp"; else git -C "$root" show "$1:cpp/avx2/matmul_avx2.cpp"; fi; }
src "$1" > "$out/a.cpp"
src "$2" > "$out/b.cpp"
flags="-std=c++17 -O3 -ffp-contract=off -fno-math-errno -mavx2 -mfma -mf16c -I$root/cpp"
g++ $flags -DLOWBIT_ISA_NS=va -c "$out/a.cpp" -o "$out/a.o"
g++ $flags -DLOWBIT_ISA_NS=vb -c "$out/b.cpp" -o "$out/b.o"
g++ $flags -c "$root/bench/ab_avx2/main.cpp" -o "$out/main.o"
g++ "$out/main.o" "$out/a.o" "$out/b.o" -o "$out/ab"
shift 2
for case in "$@"; do "$out/ab" $case; done
