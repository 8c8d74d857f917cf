SRC=${1:-/work/main/cpp/avx2/matmul_avx2.cpp}
g++ -O3 -DNDEBUG -ffp-contract=off -mavx2 -mfma -mf16c -std=gnu++17 -DLOWBIT_ISA_NS=avx2 -I/work/main/cpp -DKERNEL_SRC="\"$SRC\"" bench.cpp -o bench || exit 1
./bench 1024 1 200; ./bench 4096 1 50; ./bench 11008 12 3
