"""``sinai report``: the papers' tables and plots from the result stores of a run folder."""

from __future__ import annotations

import click


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: FOLDER/report.")
def report(folder: str, out: str | None) -> None:
    """Paper-style tables (Markdown, CSV, JSON) and plots from the result stores under FOLDER."""
    from ..reports.console import paper_tables
    from ..reports.report import make_report

    result = make_report(folder, out)
    click.echo(paper_tables(result.tables))
    click.echo("\nwritten: " + ", ".join(str(f) for f in result.files), err=True)
