"""Argument parsing of the command line: ``gpntk demo`` / ``gpntk fit`` (``python -m gpntk`` too)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from .options import ACTIVATION_NAMES, DEFAULT_DIAG_REG, DEFAULT_TIMES, parse_time  # no torch: --help stays light

__all__ = ["main", "build_parser"]


def _time(text: str) -> float:
    """``type`` of ``--times``: :func:`~gpntk.cli.options.parse_time`, its errors as argparse's."""
    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error) if "times" in str(error) else f"not a time: {text!r}") from None


def _non_negative_int(text: str) -> int:
    """``type`` of ``--depth``: an integer ``>= 0`` (checked while parsing: no torch import for a bad value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _real(name: str, strict: bool = False) -> Callable[[str], float]:
    """The ``type`` of an option holding a finite number ``>= 0`` (``> 0`` if ``strict``), its name in the errors."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            bound = "> 0" if strict else ">= 0"
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {bound}, got {text!r}")
        return value

    return parse


def _add_fit_arguments(fit: argparse.ArgumentParser) -> None:
    """The options of ``gpntk fit``: :func:`~gpntk.cli.csv_fit.fit_csv`'s arguments."""
    fit.add_argument("train", help="training CSV file with a header row")
    fit.add_argument("--target", nargs="+", default=None, metavar="COLUMN",
                     help="target column(s) (default: the last column)")
    fit.add_argument("--features", nargs="+", default=None, metavar="COLUMN",
                     help="input columns (default: all columns that are not targets)")
    fit.add_argument("--predict", default=None, metavar="CSV",
                     help="CSV file with the feature columns to predict at (default: the training rows); "
                     "if it has the target column(s), test RMSE and mean NLL are printed per time")
    fit.add_argument("--times", nargs="+", type=_time, default=list(DEFAULT_TIMES), metavar="T",
                     help="training times in gradient-descent steps, >= 0 or inf (default: 100 1000 inf)")
    fit.add_argument("--output", "-o", default="predictions.csv",
                     help="output CSV, '-' for stdout (default: predictions.csv); columns: the features, then "
                     "mean_<target>_t<time> and std_<target>_t<time>")
    fit.add_argument("--depth", type=_non_negative_int, default=3, help="hidden layers (default: 3)")
    fit.add_argument("--activation", default="relu", type=str.lower, choices=ACTIVATION_NAMES, metavar="NAME",
                     help=f"activation (default: relu; one of {', '.join(ACTIVATION_NAMES)})")
    fit.add_argument("--weight-variance", type=_real("σw²"), default=2.0, help="σw² (default: 2.0)")
    fit.add_argument("--bias-variance", type=_real("σb²"), default=0.1, help="σb² (default: 0.1)")
    fit.add_argument("--regime", choices=("ntk", "nngp", "ntkgp"), default="ntk",
                     help="ntk: all layers trained; nngp: readout only; ntkgp: NTK-GP (default: ntk)")
    fit.add_argument("--diag-reg", type=_real("diag_reg"), default=DEFAULT_DIAG_REG,
                     help=f"absolute ridge added to the training kernel (default: {DEFAULT_DIAG_REG:g})")
    fit.add_argument("--learning-rate", type=_real("learning rate", strict=True), default=None,
                     help="gradient-descent learning rate the times are counted in (default: half the largest "
                     "stable one, 0.5 * max_learning_rate(regime))")
    fit.add_argument("--no-standardize", dest="standardize", action="store_false",
                     help="do not standardize features and targets with the training mean and std")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``gpntk`` parser with its sub-commands ``demo`` and ``fit``; returns it and the ``fit`` parser."""
    parser = argparse.ArgumentParser(prog="gpntk", description="Infinitely wide neural networks as GPyTorch GPs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="trained-ensemble posteriors and NTK/NNGP GPs on built-in problems")
    demo.add_argument("--figure", default="gpntk-demo.png", help="where to save the figure (PNG); '' for none")
    fit = sub.add_parser(
        "fit",
        help="fit a CSV file with a trained ensemble of infinitely wide MLPs; write predictions with uncertainty",
        description="Fit the CSV file TRAIN (header row, numeric cells) with an infinite ensemble of infinitely "
        "wide MLPs trained by gradient descent for each of --times steps, and write the ensemble's mean and "
        "standard deviation (the spread over random initialisations: epistemic, no noise term) at the rows "
        "of --predict, or at the training rows.",
    )
    _add_fit_arguments(fit)
    return parser, fit


def main(argv: list[str] | None = None) -> int:
    """Run ``gpntk`` with the arguments ``argv`` (default: ``sys.argv[1:]``); returns the exit status 0.

    Errors in the arguments, the files or the data exit through argparse (``SystemExit`` with
    status 2 and the message on stderr). The commands import torch only when they run.
    """
    parser, fit = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(figure=args.figure or None)
    elif args.command == "fit":
        _run_fit(fit, args)
    return 0


def _run_fit(fit: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``gpntk fit``: check that the input files exist, then :func:`~gpntk.cli.csv_fit.fit_csv`.

    The options were checked while parsing and a missing file is reported here, all before torch
    is imported. Every error exits through ``fit.error`` (status 2, the message on stderr).
    """
    for path in (args.train, args.predict):
        if path is not None and not os.path.exists(path):
            fit.error(f"file not found: {path}")
    from .csv_fit import CSVFitError, fit_csv

    try:
        fit_csv(
            args.train, targets=args.target, features=args.features, predict_path=args.predict,
            times=args.times, output=args.output, depth=args.depth, activation=args.activation,
            weight_variance=args.weight_variance, bias_variance=args.bias_variance, regime=args.regime,
            diag_reg=args.diag_reg, learning_rate=args.learning_rate, standardize_data=args.standardize,
            print_fn=(lambda s: print(s, file=sys.stderr)) if args.output == "-" else print,
        )
    except CSVFitError as error:
        fit.error(str(error))
