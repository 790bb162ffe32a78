"""The ``gpntk`` command line: ``gpntk demo`` and ``gpntk fit`` (``python -m gpntk`` too).

``main`` (argument parsing and dispatch, :mod:`gpntk.cli.main`) imports nothing heavy, so
``gpntk --help`` runs without torch: the option values it shows are in :mod:`gpntk.cli.options`;
the commands import the library when they run. ``gpntk fit`` is :func:`gpntk.cli.csv_fit.fit_csv`
(its steps: columns, options, standardized data, the trained ensemble's predictions, the report),
which reads and writes its files through :mod:`gpntk.cli.csv_io`; ``gpntk demo`` is
:func:`gpntk.cli.demo.run`.
"""

from .main import main

__all__ = ["main"]
