"""The ``sinai`` command line: every command is a short path through protect -> evaluate -> report.

One module per command group; the options they share (model, data, device, budgets, ...) and the
model/data loading live in :mod:`sinai.cli.options`, the tables they print in :mod:`sinai.reports.console`.
"""

from __future__ import annotations

import dis
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

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

_PACKAGE = Path(__file__).resolve().parents[1]  # the sinai package's source folder

INTERRUPTED = 130
"""Exit code after ctrl-C (128 + SIGINT, as shells report it)."""


def on_purpose(err: BaseException) -> bool:
    """Whether sinai raised ``err`` on purpose: its innermost frame is a ``raise`` statement in sinai's own
    source (read from the bytecode, so an edited file cannot fool it). A ``ValueError`` from a builtin or
    a library (``range(0, n, 0)``, ``int("x")``) is a bug."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not Path(code.co_filename).resolve().is_relative_to(_PACKAGE):
        return False
    return any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS" for i in dis.get_instructions(code))


def path_error(err: BaseException) -> bool:
    """Whether ``err`` is the operating system refusing a path the user gave (missing, not writable, a
    file where a folder should be): the message names the path."""
    kinds = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)
    return isinstance(err, kinds) and (err.filename is not None or on_purpose(err))


class _QuietInterrupt(logging.Filter):
    """Drops the log records of a trial that ctrl-C cut short (Optuna logs each failed trial, with the
    KeyboardInterrupt's traceback and then its value): the command prints one line for it instead."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.exc_info[0] is not None
            and issubclass(record.exc_info[0], KeyboardInterrupt)
        ):
            self.interrupted = True
            return False
        return not (self.interrupted and "failed with value" in record.getMessage())


def _end_progress_bars() -> None:
    """Close the progress bars still open, so that the one line that follows starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _interrupted() -> NoReturn:
    """ctrl-C: one line on stderr, exit code 130."""
    _end_progress_bars()
    click.echo("interrupted (ctrl-C); a run stored so far resumes when the command is run again", err=True)
    raise click.exceptions.Exit(INTERRUPTED) from None


class _Group(click.Group):
    """Turns the errors the library raises on purpose for bad input (a ``ValueError`` raised by sinai, a
    path the system refuses) into one-line messages, and ctrl-C into one line and exit code 130; anything
    else is a bug and shows its traceback."""

    def make_context(self, *args: object, **kwargs: object) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:  # while the options are read
            _interrupted()

    def invoke(self, ctx: click.Context) -> object:
        quiet = _QuietInterrupt()
        optuna_log = logging.getLogger("optuna.study._optimize")
        optuna_log.addFilter(quiet)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own control flow
        except KeyboardInterrupt:
            _interrupted()
        except ValueError as err:
            if not on_purpose(err):
                raise  # a bug: the traceback says where
            _end_progress_bars()
            raise click.ClickException(" ".join(str(err).split("\n"))) from err
        except OSError as err:
            if not path_error(err):
                raise
            _end_progress_bars()
            raise click.ClickException(str(err)) from err
        finally:
            optuna_log.removeFilter(quiet)


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
