"""Command line: ``python -m gpntk demo`` (or the ``gpntk`` console script)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpntk", description="Infinitely wide neural networks as GPyTorch GPs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fit NTK/NNGP Gaussian processes to a built-in problem and print the results")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
