"""``sinai demo``: the main job on the embedded default (two MNIST models, no download).

For now it trains (once) both embedded models, protects each with every preset at a few noise levels
and prints clean accuracy (mean ± std over M noisy passes). Rows are appended to
``OUT/clean.jsonl`` as they finish, and a re-run reuses the rows already there, so a killed demo
loses nothing it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from .defenses import Defense, preset, protect
from .evaluation.clean import clean_accuracy
from .models.data import mnist, sample
from .models.zoo import load_model
from .reports.table import markdown_table

MODELS = ("mnist-cnn", "mnist-vit")

# (preset, kind, stds) swept per model; ranges chosen around where each kind starts to cost accuracy
# on the embedded models (see README "Embedded models").
GRID: tuple[tuple[str, dict[str, tuple[dict, ...]]], ...] = (
    ("RND", {"input": ({"std": 0.02}, {"std": 0.05}, {"std": 0.1})}),
    ("FND", {"feature": ({"std": 0.5}, {"std": 1.0}, {"std": 2.0})}),
    ("SINAI-Attn", {"attn": ({"std": 0.1}, {"std": 0.25}, {"std": 0.5})}),
    (
        "SINAI-FFN",
        {"gelu": ({"std": 0.2, "ratio": 0.7}, {"std": 0.4, "ratio": 0.7}, {"std": 0.8, "ratio": 0.7})},
    ),
    (
        "SINAI",
        {
            "attn": ({"std": 0.1}, {"std": 0.25}, {"std": 0.5}),
            "gelu": ({"std": 0.2, "ratio": 0.7}, {"std": 0.4, "ratio": 0.7}, {"std": 0.8, "ratio": 0.7}),
            "relu": ({"std": 0.2, "ratio": 0.5}, {"std": 0.4, "ratio": 0.5}, {"std": 0.8, "ratio": 0.5}),
        },
    ),
)


def demo_defenses(quick: bool = False) -> list[Defense]:
    """The grid of defenses the demo evaluates (the middle level only with ``quick``)."""
    levels = (1,) if quick else (0, 1, 2)
    return [
        preset(name, **{kind: specs[i] for kind, specs in kinds.items()})
        for name, kinds in GRID
        for i in levels
    ]


def _load_rows(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["key"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that row is simply computed again
    return rows


def run_demo(
    *,
    out: Path,
    quick: bool = False,
    images: int | None = None,
    passes: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
) -> list[dict]:
    """Run the demo, print its table, write ``clean.jsonl`` and ``clean.md`` under ``out``."""
    n = images or (200 if quick else 1000)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "clean.jsonl"
    done = _load_rows(store)
    x, y = sample(mnist("test"), n, seed)
    rows = []
    with store.open("a") as sink:
        for model_name in MODELS:
            model = load_model(model_name, device=device, cache_dir=cache_dir)
            todo = [Defense(name="Base")] + demo_defenses(quick)
            for defense in tqdm(todo, desc=model_name, unit="defense"):
                key = f"{model_name}|{defense.describe()}|n={n}|seed={seed}|M={passes}"
                if key not in done:
                    row = _evaluate(model, model_name, defense, x, y, passes=passes, seed=seed, device=device)
                    row["key"] = key
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    done[key] = row
                if not done[key].get("skipped"):
                    rows.append(done[key])
    table = _table(rows)
    (out / "clean.md").write_text(table + "\n")
    click.echo(
        f"\nClean accuracy on {n} MNIST test images (seed {seed}), mean ± std over M = {passes} passes:"
    )
    click.echo(table)
    click.echo(f"\nrows: {store}")
    return rows


def _evaluate(model, model_name, defense, x, y, *, passes, seed, device) -> dict:
    """One table row; a defense whose sites the model lacks gives a row marked ``skipped``."""
    x, y = x.to(device), y.to(device)
    if not defense.specs:
        acc = clean_accuracy(model, x, y, passes=1)
        return {
            "model": model_name,
            "defense": "Base",
            "setting": "-",
            "mean": acc.mean,
            "std": 0.0,
            "sites": 0,
        }
    try:
        defended = protect(model, defense, seed=seed)
    except ValueError as err:  # e.g. attention noise on the CNN: not applicable
        return {"model": model_name, "defense": defense.name, "skipped": str(err)}
    acc = clean_accuracy(defended, x, y, passes=passes)
    kinds = {s.kind for s in defended.sites}
    setting = ", ".join(
        f"{k} {s.std:g}" + (f"/{s.ratio:.0%}" if s.ratio < 1 else "")
        for k, s in defense.specs.items()
        if k in kinds
    )
    sites = len(defended.sites)
    defended.remove()
    return {
        "model": model_name,
        "defense": defense.name,
        "setting": setting,
        "mean": acc.mean,
        "std": acc.std,
        "sites": sites,
    }


def _table(rows: list[dict]) -> str:
    base = {r["model"]: r["mean"] for r in rows if r["defense"] == "Base"}
    body = [
        [
            r["model"],
            r["defense"],
            r["setting"],
            f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
            "-" if r["defense"] == "Base" else f"{100 * (base.get(r['model'], r['mean']) - r['mean']):.2f}",
        ]
        for r in rows
    ]
    return markdown_table(["model", "defense", "std (/ratio)", "clean acc %", "drop %"], body)
