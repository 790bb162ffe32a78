"""Command line: ``python -m gpntk demo`` (or the ``gpntk`` console script)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpntk", description="Infinitely wide neural networks as GPyTorch GPs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="trained-ensemble posteriors and NTK/NNGP GPs on built-in problems")
    demo.add_argument("--figure", default="gpntk-demo.png", help="where to save the figure (PNG); '' for none")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(figure=args.figure or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
