"""Command line: ``mcu info | bench | demo | serve``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from mcu.core.info import backend_info, format_info

    info = backend_info()
    print(format_info(info))
    return 1 if info.get("error") else 0  # a misconfiguration is reported, and the exit status says so


_DELEGATED = {"bench": "mcu.bench.cli", "demo": "mcu.demo", "serve": "mcu.serve.cli"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and "--serve" in argv:  # the HTTP load benchmark of `mcu serve`
        return importlib.import_module("mcu.bench.serve").main([a for a in argv[1:] if a != "--serve"])
    if argv and argv[0] in _DELEGATED:  # the sub-command parses its own options (--quick, --out, ...)
        return importlib.import_module(_DELEGATED[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="mcu", description="Monte Carlo dropout uncertainty toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="installed frameworks, the selected backend and why").set_defaults(run=_info)
    sub.add_parser("bench", help="benchmark the sampling strategies (speed, memory, precision); see mcu bench -h")
    sub.add_parser("demo", help="train a dropout classifier on bundled digits and report its uncertainty; mcu demo -h")
    sub.add_parser("serve", help="serve MC-dropout predictions over HTTP (micro-batched, triage, drift); mcu serve -h")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
