"""``sinai report FOLDER --compare A,B``: two table rows (methods) compared on the same images.

For every attack both rows were evaluated with (same column label, same threat model), at every budget
both runs reached, and for the worst case over the attacks both share: the images both runs attacked
are paired by dataset index; the images one row kept robust and the other lost (the discordant images)
decide the exact McNemar test, and the difference of the two robust accuracies gets Newcombe's paired
95% interval (:mod:`.stats`). Clean accuracy is not compared: the store keeps no per-image data of the
noisy clean passes.

A row is named as the tables print it (``RND ≈1%``; ``≈`` and ``~`` and spaces may be left out:
``RND1%``), by its method alone where a model has one row of it, or by its defense text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .paper import Run, _label_order, _row_order
from .stats import ALPHA, Paired, paired
from .table import markdown_table
from .worst import RowKey, Threat, threat_key, threat_text, worst_case


@dataclass(frozen=True)
class Comparison:
    """One column of the comparison: ``model``, the column (``square @1000``, ``Worst case``), the
    threat model and the paired counts of rows A and B on their common images."""

    model: str
    column: str
    threat: Threat
    test: Paired
    row_a: str = ""
    row_b: str = ""


def parse_pair(text: str) -> tuple[str, str]:
    """``"A,B"`` -> ``("A", "B")``; anything else is a ``ValueError`` saying what is valid."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"--compare takes two row names separated by one comma, e.g. 'RND ≈1%,SINAI ≈1%', got {text!r}"
        )
    if _norm(parts[0]) == _norm(parts[1]):
        raise ValueError(f"--compare needs two different rows, got {parts[0]!r} twice")
    return parts[0], parts[1]


def _norm(text: str) -> str:
    return re.sub(r"[\s≈~]", "", text.lower())


def row_name(key: RowKey) -> str:
    """A row as the tables print it: ``method level``."""
    _model, method, level = key
    return method + (f" {level}" if level else "")


def _resolve(runs: Sequence[Run], name: str) -> dict[str, RowKey]:
    """Per model, the row ``name`` means there (models without such a row are left out); a name that
    fits several rows of one model is a ``ValueError`` listing them."""
    keys = sorted({(r.model, r.method, r.level) for r in runs}, key=_row_order)
    wanted = _norm(name)
    found: dict[str, RowKey] = {}
    for model in dict.fromkeys(k[0] for k in keys):
        mine = [k for k in keys if k[0] == model]
        defenses = {
            k: {_norm(r.defense_text) for r in runs if (r.model, r.method, r.level) == k} for k in mine
        }
        by_name = [k for k in mine if _norm(row_name(k)) == wanted]
        by_method = [k for k in mine if _norm(k[1]) == wanted]
        by_defense = [k for k in mine if wanted in defenses[k]]
        for matches in (by_name, by_method, by_defense):
            if len(matches) > 1:
                listed = ", ".join(repr(row_name(k)) for k in matches)
                raise ValueError(f"{name!r} fits several rows of {model}: {listed}; name one with its level")
            if matches:
                found[model] = matches[0]
                break
    return found


def compare(runs: Sequence[Run], a: str, b: str) -> list[Comparison]:
    """Rows ``a`` and ``b`` compared per model (where both exist): every shared attack at every budget
    both runs reached, then the worst case over the shared attacks; a ``ValueError`` naming the rows
    there are when no model has both or they share no attacked image."""
    attacked = [r for r in runs if r.attack != "none" and r.results]
    rows_a, rows_b = _resolve(attacked, a), _resolve(attacked, b)
    common = [m for m in rows_a if m in rows_b]
    if not common:
        names = sorted({f"{r.model}: {row_name((r.model, r.method, r.level))}" for r in attacked})
        missing = a if not rows_a else b if not rows_b else f"{a} and {b} in one model"
        raise ValueError(f"no attacked row {missing!r} in the stores; rows there: {'; '.join(names)}")
    out: list[Comparison] = []
    for model in common:
        if rows_a[model] == rows_b[model]:
            raise ValueError(f"{a!r} and {b!r} name the same row of {model}: {row_name(rows_a[model])!r}")
        mine_a = [r for r in attacked if (r.model, r.method, r.level) == rows_a[model]]
        mine_b = [r for r in attacked if (r.model, r.method, r.level) == rows_b[model]]
        names = {"row_a": row_name(rows_a[model]), "row_b": row_name(rows_b[model])}
        out += [replace(c, **names) for c in _compare_rows(model, mine_a, mine_b)]
    if not out:
        raise ValueError(f"{a!r} and {b!r} share no attack on the same images: nothing to compare")
    return out


def _pick(runs: Sequence[Run]) -> Run:
    """The run of a column: the largest budget, then the most images."""
    return max(runs, key=lambda r: (r.budget, len(r.results)))


def _compare_rows(model: str, runs_a: Sequence[Run], runs_b: Sequence[Run]) -> list[Comparison]:
    out = []
    columns = {(r.label, threat_key(r.settings)) for r in runs_a} & {
        (r.label, threat_key(r.settings)) for r in runs_b
    }
    threats = {t for _, t in columns}
    labels = _label_order(runs_a)
    shared: dict[Threat, tuple[list[Run], list[Run]]] = {}
    for label, threat in sorted(columns, key=lambda c: (labels.index(c[0]), threat_text(c[1]))):
        run_a = _pick([r for r in runs_a if (r.label, threat_key(r.settings)) == (label, threat)])
        run_b = _pick([r for r in runs_b if (r.label, threat_key(r.settings)) == (label, threat)])
        suffix = f" ({threat_text(threat)})" if len(threats) > 1 else ""
        top = min(run_a.budget, run_b.budget)
        budgets = {run_a.budget, run_b.budget}
        budgets |= {int(x) for r in (run_a, run_b) for x in r.settings.get("budgets") or ()}
        try:
            for budget in sorted(x for x in budgets if x <= top):
                test = paired(run_a.robust_outcomes(budget), run_b.robust_outcomes(budget))
                out.append(Comparison(model, f"{label} @{budget}{suffix}", threat, test))
        except ValueError:  # no common image: this attack cannot be paired
            continue
        pair = shared.setdefault(threat, ([], []))
        pair[0].append(run_a)
        pair[1].append(run_b)
    for threat, (mine_a, mine_b) in shared.items():
        wc_a, wc_b = worst_case(mine_a), worst_case(mine_b)
        if wc_a is None or wc_b is None or not (set(wc_a.images) & set(wc_b.images)):
            continue
        suffix = f" ({threat_text(threat)})" if len(threats) > 1 else ""
        out.append(Comparison(model, f"Worst case{suffix}", threat, paired(wc_a.outcomes, wc_b.outcomes)))
    return out


def verdict(test: Paired, a: str, b: str, alpha: float = ALPHA) -> str:
    """Which row is significantly more robust (two-sided exact McNemar at ``alpha``), or neither."""
    if test.p_value >= alpha:
        return "no significant difference"
    return f"{a} more robust" if test.only_a > test.only_b else f"{b} more robust"


def comparison_table(comparisons: Sequence[Comparison], a: str, b: str) -> str:
    """The comparison as Markdown, under a line naming the rows and over the notes that explain it."""
    rows = []
    for c in comparisons:
        t = c.test
        low, high = t.interval
        rows.append(
            [
                c.model, c.column, t.n, f"{100 * t.rate_a:.1f}", f"{100 * t.rate_b:.1f}", t.only_a, t.only_b,
                f"{100 * t.difference:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]", _p(t.p_value),
                verdict(t, "A", "B"),
            ]
        )  # fmt: skip
    headers = [
        "model", "column", "n", "A robust %", "B robust %", "only A robust", "only B robust",
        "A - B [95%]", "p (McNemar)", "result",
    ]  # fmt: skip
    return "\n".join(
        [
            f"A = {_names(comparisons, 'row_a', a)}, B = {_names(comparisons, 'row_b', b)}: robust accuracy "
            "on the images both runs attacked (paired by dataset index)",
            markdown_table(headers, rows),
            "only A robust / only B robust: the discordant images (robust under one row, broken under the "
            "other); p: exact McNemar test on them (two-sided binomial at 1/2); A - B: the difference in "
            "points with Newcombe's 95% interval for paired rates; result at p < "
            f"{ALPHA:g} (near it the interval and the exact test may disagree; the result follows the "
            "test). Worst case: over the attacks both rows share. Clean accuracy is not compared (no "
            "per-image data of the clean passes).",
        ]
    )


def _names(comparisons: Sequence[Comparison], field: str, given: str) -> str:
    """The row names a comparison resolved (one per model, usually the same), else the name given."""
    names = dict.fromkeys(getattr(c, field) for c in comparisons if getattr(c, field))
    return " / ".join(names) or given


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"
