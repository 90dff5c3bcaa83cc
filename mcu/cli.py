"""Command line: ``mcu info | bench | demo``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from mcu.core.info import backend_info, format_info

    print(format_info(backend_info()))
    return 0


def _delegate(module: str) -> "callable":
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).main(args.rest)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcu", description="Monte Carlo dropout uncertainty toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="installed frameworks, the selected backend and why").set_defaults(run=_info)
    for name, module, text in (
        ("bench", "benchmarks.__main__", "benchmark the sampling strategies (speed, memory, precision)"),
        ("demo", "mcu.demo", "train a small dropout classifier on bundled digits and report its uncertainty"),
    ):
        command = sub.add_parser(name, help=text, add_help=False)
        command.add_argument("rest", nargs=argparse.REMAINDER)
        command.set_defaults(run=_delegate(module))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
