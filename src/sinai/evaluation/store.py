"""The result store: one SQLite file per output folder, written as results arrive.

A run is identified by its full settings (model, defense, attack and its hyper-parameters, norm, eps,
budget, images, seed, ...). Asking for the same settings again resumes that run; other settings make
another run in the same store, so one folder can hold every row of a paper-style table.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
"""Version of the tables and of the run settings (``EvalConfig.settings``); other versions are refused."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    settings TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS clean (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    pass INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    PRIMARY KEY (run_id, pass)
);
CREATE TABLE IF NOT EXISTS results (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    image INTEGER NOT NULL,           -- position in the run's image selection
    dataset_index INTEGER NOT NULL,   -- index in the dataset
    label INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL,   -- 1 if the (defended) model's vote was right before the attack
    success_at INTEGER,               -- counted queries at the verified success; NULL = none
    queries INTEGER NOT NULL,         -- counted queries spent
    vote_passes INTEGER NOT NULL,     -- uncounted verification passes
    norm REAL NOT NULL,               -- final perturbation norm (of the verified example if any)
    PRIMARY KEY (run_id, image)
);
CREATE TABLE IF NOT EXISTS confirmations (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    image INTEGER NOT NULL,
    rate REAL,                        -- share of fresh passes misclassifying the returned example
    passes INTEGER NOT NULL,          -- fresh uncounted confirmation passes
    capped INTEGER NOT NULL,          -- 1 if the image reached its cap of verification passes
    PRIMARY KEY (run_id, image)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    image INTEGER NOT NULL,
    budget INTEGER NOT NULL,          -- counted queries
    norm REAL,                        -- smallest norm of a query labelled adversarial by then; NULL = none
    PRIMARY KEY (run_id, image, budget)
);
CREATE TABLE IF NOT EXISTS mismatches (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    image INTEGER NOT NULL,
    mismatches INTEGER NOT NULL,      -- counted queries labelled differently from the noise-free model
    PRIMARY KEY (run_id, image)
);
"""


@dataclass(frozen=True)
class ImageResult:
    """One attacked image: ``success_at`` is None when no verified success within the budget.

    ``checkpoint_norms``: (budget, norm) pairs, the smallest perturbation norm of a query labelled
    adversarial within that many counted queries (None = none yet; SND Table 3). ``mismatches``:
    counted queries labelled differently from the noise-free model (P_mis, SND Table 5), None when
    not tracked. ``confirm_rate``: the share of ``confirm_passes`` fresh noisy passes that misclassify
    the returned adversarial example (None: no example, or a run without confirmation); ``capped``: the
    image reached its cap of verification passes.
    """

    image: int
    dataset_index: int
    label: int
    clean_correct: bool
    success_at: int | None
    queries: int
    vote_passes: int
    norm: float
    checkpoint_norms: tuple[tuple[int, float | None], ...] = ()
    mismatches: int | None = None
    confirm_rate: float | None = None
    confirm_passes: int = 0
    capped: bool = False

    def norm_at(self, budget: int) -> float | None:
        """The recorded smallest adversarial norm at checkpoint ``budget`` (None if none or not recorded)."""
        return dict(self.checkpoint_norms).get(budget)

    def robust_at(self, budget: int) -> bool:
        """Not broken within ``budget`` counted queries (and correctly classified to begin with)."""
        return self.clean_correct and (self.success_at is None or self.success_at > budget)

    def robust_confirmed_at(self, budget: int) -> bool:
        """As :meth:`robust_at`, but a success counts only when the majority of the fresh confirmation
        passes misclassify the returned example (the attack's decision where none was made)."""
        if self.robust_at(budget):
            return True
        return self.clean_correct and self.confirm_rate is not None and self.confirm_rate <= 0.5


def settings_key(settings: Mapping[str, object]) -> str:
    """A stable short hash of the settings (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    """SQLite store of runs, clean accuracies and per-image attack results (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Several processes may write one store (e.g. two demos with different --models): short
            # transactions, and a writer waits for the lock instead of failing.
            self.db = sqlite3.connect(self.path, timeout=60)
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "runs" in tables and "meta" not in tables:
                version = "1"  # written before the schema was versioned: leave it untouched
            else:
                self.db.executescript(SCHEMA)
                with self.db:
                    self.db.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                    )
                version = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"{self.path} is not a sinai result store ({err}); write to another folder"
            ) from err
        if version != str(SCHEMA_VERSION):
            self.db.close()
            raise ValueError(
                f"{self.path} was written by another version of sinai (store schema {version}, this "
                f"version reads {SCHEMA_VERSION}); its runs cannot be resumed: write to another folder"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_id(self, settings: Mapping[str, object]) -> int:
        """The id of the run with these settings, created if new."""
        key = settings_key(settings)
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO runs (key, settings, created) VALUES (?, ?, ?)",
                (key, json.dumps(settings, sort_keys=True, default=str), time.time()),
            )
        return self.db.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()[0]

    def runs(self) -> list[tuple[int, dict, bool]]:
        """(id, settings, finished) of every run in the store."""
        rows = self.db.execute("SELECT id, settings, finished FROM runs ORDER BY id").fetchall()
        return [(i, json.loads(s), f is not None) for i, s, f in rows]

    def add_clean(self, run_id: int, accuracies: Iterable[float]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO clean (run_id, pass, accuracy) VALUES (?, ?, ?)",
                [(run_id, i, a) for i, a in enumerate(accuracies)],
            )

    def clean(self, run_id: int) -> list[float]:
        rows = self.db.execute("SELECT accuracy FROM clean WHERE run_id = ? ORDER BY pass", (run_id,))
        return [r[0] for r in rows]

    def add_results(self, run_id: int, results: Iterable[ImageResult]) -> None:
        """Write a batch of image results in one transaction (all or nothing)."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        r.image,
                        r.dataset_index,
                        r.label,
                        int(r.clean_correct),
                        r.success_at,
                        r.queries,
                        r.vote_passes,
                        r.norm,
                    )
                    for r in results
                ],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                [(run_id, r.image, b, n) for r in results for b, n in r.checkpoint_norms],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO mismatches VALUES (?, ?, ?)",
                [(run_id, r.image, r.mismatches) for r in results if r.mismatches is not None],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO confirmations VALUES (?, ?, ?, ?, ?)",
                [
                    (run_id, r.image, r.confirm_rate, r.confirm_passes, int(r.capped))
                    for r in results
                    if r.confirm_passes or r.capped
                ],
            )

    def results(self, run_id: int) -> list[ImageResult]:
        rows = self.db.execute(
            "SELECT image, dataset_index, label, clean_correct, success_at, queries, vote_passes, norm "
            "FROM results WHERE run_id = ? ORDER BY image",
            (run_id,),
        ).fetchall()
        checkpoints: dict[int, list[tuple[int, float | None]]] = {}
        for image, budget, norm in self.db.execute(
            "SELECT image, budget, norm FROM checkpoints WHERE run_id = ? ORDER BY image, budget", (run_id,)
        ):
            checkpoints.setdefault(image, []).append((budget, norm))
        mismatches = dict(
            self.db.execute("SELECT image, mismatches FROM mismatches WHERE run_id = ?", (run_id,)).fetchall()
        )
        confirmed = {
            image: (rate, passes, bool(capped))
            for image, rate, passes, capped in self.db.execute(
                "SELECT image, rate, passes, capped FROM confirmations WHERE run_id = ?", (run_id,)
            )
        }
        return [
            ImageResult(
                i,
                d,
                lab,
                bool(c),
                s,
                q,
                v,
                n,
                tuple(checkpoints.get(i, ())),
                mismatches.get(i),
                *confirmed.get(i, (None, 0, False)),
            )  # fmt: skip
            for i, d, lab, c, s, q, v, n in rows
        ]

    def copy_run(
        self, settings: Mapping[str, object], clean: Iterable[float], results: Iterable[ImageResult]
    ) -> int:
        """Store finished results under other settings (the same configuration met under another name)."""
        run_id = self.run_id(settings)
        self.add_clean(run_id, clean)
        self.add_results(run_id, results)
        self.finish(run_id)
        return run_id

    def finish(self, run_id: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished = ? WHERE id = ?", (time.time(), run_id))
