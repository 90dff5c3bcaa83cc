"""``python -m benchmarks`` from a checkout: the same as ``mcu bench`` (the suite is :mod:`mcu.bench`)."""

import sys

from mcu.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
