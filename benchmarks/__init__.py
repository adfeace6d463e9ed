"""The benchmark suite of umt-distill: what caching the frozen teacher buys and costs.

A package, run as modules from the repository root:

    .venv/bin/python -m benchmarks.run --help         # the whole suite (see benchmarks/README.md)
    .venv/bin/python -m benchmarks.bench_step --help  # one benchmark on its own

No module edits ``sys.path``: ``python -m`` puts the current directory (the repository root) first on it,
so ``benchmarks.*`` and ``umt_distill`` import. Child processes (a forkserver preloading
``benchmarks.common``) import these modules by package name and inherit the parent's ``sys.path``.
"""
