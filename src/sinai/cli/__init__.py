"""The ``sinai`` command line: every command is a short path through protect -> evaluate -> report.

One module per command group; the options they share (model, data, device, budgets, ...) and the
model/data loading live in :mod:`sinai.cli.options`, the tables they print in :mod:`sinai.reports.console`.
"""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from .analyze import analyze
from .bench import bench
from .calibrate import calibrate
from .check import check
from .demo import demo
from .eval import eval_command
from .models import sites, train
from .report import report
from .serve import serve
from .sweep import sweep
from .tune import tune


class _Group(click.Group):
    """Turns the errors the library raises on purpose for bad input (``ValueError``,
    ``FileNotFoundError``) into one-line messages; anything else is a bug and shows its traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own control flow
        except (ValueError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sinai")
def cli() -> None:
    """Protect image classifiers against query-based black-box attacks with inference-time noise."""


for _command in (demo, calibrate, tune, report, eval_command, sites, train, bench, analyze, check, serve):
    cli.add_command(_command)
cli.add_command(sweep)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sinai never downloads
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="sinai")


__all__ = ["cli", "main"]
