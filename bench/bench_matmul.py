"""Matmul benchmark (see lowbit/bench/): `python bench/bench_matmul.py [--quick] [--json F]`."""
from lowbit.bench import main

if __name__ == "__main__":
    main()
