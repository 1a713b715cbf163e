"""``sinai report``: the papers' tables and plots from the result stores of a run folder."""

from __future__ import annotations

import click


@click.command()
@click.argument("folder", type=click.Path())
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the tables and plots. Default: FOLDER/report.",
)
@click.option(
    "--compare",
    "pair",
    default=None,
    metavar="A,B",
    help="Instead of the tables, compare two rows on the same images, e.g. 'RND ≈1%,SINAI ≈1%' (≈ may be "
    "left out): per shared attack and budget and for the worst case, the images only one row kept robust, "
    "the exact McNemar p-value and the difference with its 95% interval. Writes no files.",
)
def report(folder: str, out: str | None, pair: str | None) -> None:
    """Paper-style tables (Markdown, CSV, JSON) and plots from every results.sqlite under FOLDER (at any
    depth; FOLDER may also be one results.sqlite).

    table1 / table2 / table4: score, decision and EOT query attacks, a column per requested budget;
    whitebox: seed 001 Table 1 (PGD-20, FGSM, MI-FGSM, CW with its median l2, AutoAttack); worst_case: per
    model and method every attack, the worst case (an image is robust only if no attack broke it) and its
    gap to the best query attack. Tables 1, 2 and whitebox carry the Worst case column too. table6: seed
    001 Table 6, SINAI-selective's ratio / N:M sweep with naive and BPDA attacks side by side and BitOPs
    (whitebox gains the BitOPs columns when a row is SINAI-selective). Runs whose successes were confirmed
    by fresh noisy passes get a "conf." column next to each attack column of tables 1 and 2 (an image
    counts as broken only if most of the fresh passes misclassify the returned example) and worst_case a
    "Worst case conf." column.

    Every row names its defense with its std and ratio; every accuracy carries its 95% interval (Wilson
    over the images; clean accuracy: of the mean over the noisy passes); a value is bold only when a paired
    test (exact McNemar, p < 0.05) finds it better than every other defended row of its model on the same
    images. The plots draw the same intervals as bands and error bars.
    """
    from ..reports.console import paper_tables
    from ..reports.report import compare_report, make_report

    if pair is not None:
        click.echo(compare_report(folder, pair))
        return
    result = make_report(folder, out)
    click.echo(paper_tables(result.tables))
    click.echo("\nwritten: " + ", ".join(str(f) for f in result.files), err=True)
