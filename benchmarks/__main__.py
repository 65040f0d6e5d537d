"""`make bench`: runs `run()` of every module in this package and prints the figures it returns.

A benchmark module's `run()` returns a list of `(figure, value)` pairs; progress goes to stderr.
"""
import importlib
import pkgutil
import sys
import time

import benchmarks


def benchmark_modules():
    names = sorted(name for _, name, is_package in pkgutil.iter_modules(list(benchmarks.__path__))
                   if not is_package and not name.startswith("_"))
    return [importlib.import_module("benchmarks." + name) for name in names]


def main():
    for module in benchmark_modules():
        if not hasattr(module, "run"):
            continue
        started = time.time()
        print("== {}: {}".format(module.__name__.split(".")[-1], (module.__doc__ or "").strip().splitlines()[0]))
        sys.stdout.flush()
        for figure, value in module.run():
            print("  {:<58} {}".format(figure, value))
        print("  ({:.0f} s)".format(time.time() - started))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
