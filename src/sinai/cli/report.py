"""``sinai report``: the papers' tables and plots from the result stores of a run folder."""

from __future__ import annotations

import click


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: FOLDER/report.")
def report(folder: str, out: str | None) -> None:
    """Paper-style tables (Markdown, CSV, JSON) and plots from the result stores under FOLDER.

    table1 / table2 / table4: score, decision and EOT query attacks; whitebox: seed 001 Table 1 (PGD-20,
    FGSM, MI-FGSM, CW with its median l2, AutoAttack); worst_case: per model and method every attack,
    the worst case (an image is robust only if no attack broke it, 95% Wilson interval) and its gap to
    the best query attack. Tables 1, 2 and whitebox carry the Worst case column too. table6: seed 001
    Table 6, SINAI-selective's ratio / N:M sweep with naive and BPDA attacks side by side and BitOPs
    (whitebox gains the BitOPs columns when a row is SINAI-selective). Runs whose
    successes were confirmed by fresh noisy passes get a "conf." column next to each attack column of
    tables 1 and 2 (an image counts as broken only if most of the fresh passes misclassify the returned
    example) and worst_case a "Worst case conf." column.
    """
    from ..reports.console import paper_tables
    from ..reports.report import make_report

    result = make_report(folder, out)
    click.echo(paper_tables(result.tables))
    click.echo("\nwritten: " + ", ".join(str(f) for f in result.files), err=True)
