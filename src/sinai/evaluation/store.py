"""The result store: one SQLite file per output folder (or one PostgreSQL database), written as results
arrive.

A run is identified by its full settings (model, defense, attack and its hyper-parameters, norm, eps,
budget, images, seed, ...). Asking for the same settings again resumes that run; other settings make
another run in the same store, so one folder can hold every row of a paper-style table.

``ResultStore("postgresql://user@host:port/db")`` keeps the same tables in PostgreSQL (psycopg), so that
sweep workers on many machines share one store. The ``tasks`` table is the ledger of ``sinai sweep``:
one row per (run, shard) with its state, attempts, owner and timings (:mod:`sinai.sweep`); a task is
claimed by one transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, one ``UPDATE`` on SQLite) and its
results are written in the same transaction that marks it done, so a shard is stored whole and once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
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
CREATE TABLE IF NOT EXISTS tasks (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    shard INTEGER NOT NULL,           -- -1: the run's clean accuracy; 0, 1, ...: its attack shards
    state TEXT NOT NULL,              -- pending | running | done | failed
    attempts INTEGER NOT NULL,        -- claims so far
    completions INTEGER NOT NULL,     -- times its results were written (1 once done)
    owner TEXT,                       -- host:pid:token of the current or last claim
    host TEXT,
    claimed REAL,
    heartbeat REAL,                   -- refreshed by the owner while it works
    finished REAL,
    seconds REAL,                     -- compute time of the successful attempt
    error TEXT,                       -- last failure, one line
    PRIMARY KEY (run_id, shard)
);
"""

TASK_STATES = ("pending", "running", "done", "failed")


@dataclass(frozen=True)
class Task:
    """One ledger row (see the ``tasks`` table)."""

    run_id: int
    shard: int
    state: str
    attempts: int
    completions: int
    owner: str | None
    host: str | None
    claimed: float | None
    heartbeat: float | None
    finished: float | None
    seconds: float | None
    error: str | None


_TASK_COLUMNS = (
    "run_id, shard, state, attempts, completions, owner, host, claimed, heartbeat, finished, seconds, error"
)


def owner_id() -> str:
    """A claim's owner: host, process id and a fresh token (``host:pid:token``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process of ``owner`` still runs: None when it ran on another host (unknowable here)."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(rest.partition(":")[0]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def _pg_schema() -> list[str]:
    """The SQLite schema in PostgreSQL's types (doubles for REAL, an identity key for runs)."""
    text = SCHEMA.replace(
        "id INTEGER PRIMARY KEY,", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
    )
    text = text.replace(" REAL", " DOUBLE PRECISION").replace("run_id INTEGER", "run_id BIGINT")
    lines = [line.split("--")[0] for line in text.splitlines()]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


class _Postgres:
    """A psycopg connection that speaks like ``sqlite3``'s: ``?`` placeholders, ``with db:`` is one
    transaction (autocommit outside it)."""

    def __init__(self, url: str, timeout: float) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
        self._tx: list = []

    def execute(self, sql: str, params: Sequence[object] = ()):  # noqa: ANN201 - a psycopg cursor
        return self.conn.execute(sql.replace("?", "%s"), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    def __enter__(self) -> _Postgres:
        tx = self.conn.transaction()
        tx.__enter__()
        self._tx.append(tx)
        return self

    def __exit__(self, *exc: object) -> None:
        self._tx.pop().__exit__(*exc)

    def close(self) -> None:
        self.conn.close()


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

    def __init__(self, path: str | Path, *, timeout: float = 60) -> None:
        """``path``: a SQLite file, or a ``postgresql://`` URL (unreachable: ValueError within
        ``timeout`` seconds, at most 10)."""
        if is_postgres(path):
            self._open_postgres(str(path), min(timeout, 10))
            return
        self.postgres = False
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"cannot create the folder of {self.path}: {err.strerror or err}; write to another folder"
            ) from None
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
                        "INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT DO NOTHING",
                        (str(SCHEMA_VERSION),),
                    )
                version = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        except sqlite3.OperationalError as err:  # cannot open or write the file (permissions, read-only disk)
            raise ValueError(
                f"cannot open {self.path} to write results ({err}); write to another folder"
            ) from None
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

    @staticmethod
    def describe(location: str | Path) -> str:
        """``location`` for messages: a PostgreSQL URL without its user and password."""
        text = str(location)
        return f"postgresql://{text.split('@')[-1]}" if is_postgres(text) and "@" in text else text

    def _open_postgres(self, url: str, timeout: float) -> None:
        import psycopg

        self.postgres = True
        self.url = url
        self.path = self.describe(url)  # for messages: no password
        try:
            self.db = _Postgres(url, timeout)
        except psycopg.Error as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot reach the PostgreSQL store {self.path}: {reason}") from None
        with self.db:  # one creator at a time: CREATE TABLE IF NOT EXISTS races on PostgreSQL
            self.db.execute("SELECT pg_advisory_xact_lock(7151807)")
            for statement in _pg_schema():
                self.db.execute(statement)
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
        version = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if version != str(SCHEMA_VERSION):
            self.db.close()
            raise ValueError(
                f"{self.path} was written by another version of sinai (store schema {version}, this "
                f"version reads {SCHEMA_VERSION}); use another database"
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
                "INSERT INTO runs (key, settings, created) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (key, json.dumps(settings, sort_keys=True, default=str), time.time()),
            )
        return self.db.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()[0]

    def runs(self) -> list[tuple[int, dict, bool]]:
        """(id, settings, finished) of every run in the store."""
        rows = self.db.execute("SELECT id, settings, finished FROM runs ORDER BY id").fetchall()
        return [(i, self._settings_of(i, s), f is not None) for i, s, f in rows]

    def _settings_of(self, run_id: int, text: object) -> dict:
        """The stored settings of a run, decoded; a one-line ``ValueError`` naming the file if damaged."""
        try:
            settings = json.loads(text) if isinstance(text, (str, bytes)) else None
        except json.JSONDecodeError:
            settings = None
        if not isinstance(settings, dict):
            raise self._damaged("runs", f"run {run_id}", "settings", text, "the run's settings as JSON")
        return settings

    def _damaged(self, table: str, where: str, column: str, value: object, expected: str) -> ValueError:
        return ValueError(
            f"{self.path} is damaged: table {table}, {where}, column {column} holds {value!r:.40}, expected "
            f"{expected}; delete it or write to another folder"
        )

    def add_clean(self, run_id: int, accuracies: Iterable[float]) -> None:
        with self.db:
            self._insert_clean(run_id, accuracies)

    def _insert_clean(self, run_id: int, accuracies: Iterable[float]) -> None:
        self.db.executemany(
            "INSERT INTO clean (run_id, pass, accuracy) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id, pass) DO UPDATE SET accuracy = excluded.accuracy",
            [(run_id, i, a) for i, a in enumerate(accuracies)],
        )

    def clean(self, run_id: int) -> list[float]:
        rows = self.db.execute("SELECT pass, accuracy FROM clean WHERE run_id = ? ORDER BY pass", (run_id,))
        accuracies = []
        for i, accuracy in rows:
            if not _number(accuracy) or not 0 <= accuracy <= 1:
                raise self._damaged(
                    "clean", f"run {run_id} pass {i}", "accuracy", accuracy, "a number in [0, 1]"
                )
            accuracies.append(accuracy)
        return accuracies

    def add_results(self, run_id: int, results: Iterable[ImageResult]) -> None:
        """Write a batch of image results in one transaction (all or nothing)."""
        with self.db:
            self._insert_results(run_id, list(results))

    def _insert_results(self, run_id: int, results: list[ImageResult]) -> None:
        self.db.executemany(
            _upsert(
                "results",
                "run_id, image, dataset_index, label, clean_correct, success_at, queries, vote_passes, norm",
                2,
            ),
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
            _upsert("checkpoints", "run_id, image, budget, norm", 3),
            [(run_id, r.image, b, n) for r in results for b, n in r.checkpoint_norms],
        )
        self.db.executemany(
            _upsert("mismatches", "run_id, image, mismatches", 2),
            [(run_id, r.image, r.mismatches) for r in results if r.mismatches is not None],
        )
        self.db.executemany(
            _upsert("confirmations", "run_id, image, rate, passes, capped", 2),
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
        self._check_results(run_id, rows, checkpoints, mismatches, confirmed)
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

    def _check_results(
        self, run_id: int, rows: list, checkpoints: dict, mismatches: dict, confirmed: dict
    ) -> None:
        """Every stored value of run ``run_id`` has its column's type and range (SQLite keeps whatever is
        written); a one-line ``ValueError`` naming the file, the table and the value otherwise."""
        count, flag, maybe = "an integer >= 0", "0 or 1", "a number >= 0 or NULL"
        for row in rows:
            where = f"run {run_id} image {row[0]}"
            for column, value, ok, expected in (
                ("image", row[0], _count(row[0]), count),
                ("dataset_index", row[1], _count(row[1]), count),
                ("label", row[2], _count(row[2]), count),
                ("clean_correct", row[3], row[3] in (0, 1), flag),
                ("success_at", row[4], row[4] is None or _count(row[4]), "an integer >= 0 or NULL"),
                ("queries", row[5], _count(row[5]), count),
                ("vote_passes", row[6], _count(row[6]), count),
                ("norm", row[7], _number(row[7]) and row[7] >= 0, "a number >= 0"),
            ):
                if not ok:
                    raise self._damaged("results", where, column, value, expected)
        for image, pairs in checkpoints.items():
            for budget, norm in pairs:
                where = f"run {run_id} image {image}"
                if not _count(budget):
                    raise self._damaged("checkpoints", where, "budget", budget, count)
                if norm is not None and not (_number(norm) and norm >= 0):
                    raise self._damaged("checkpoints", where, "norm", norm, maybe)
        for image, value in mismatches.items():
            if not _count(value):
                raise self._damaged("mismatches", f"run {run_id} image {image}", "mismatches", value, count)
        for image, (rate, passes, _) in confirmed.items():
            where = f"run {run_id} image {image}"
            if rate is not None and not (_number(rate) and 0 <= rate <= 1):
                raise self._damaged("confirmations", where, "rate", rate, "a number in [0, 1] or NULL")
            if not _count(passes):
                raise self._damaged("confirmations", where, "passes", passes, count)

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

    # ------------------------------------------------------------------ the sweep ledger (tasks)
    def add_tasks(self, tasks: Iterable[tuple[int, int]]) -> int:
        """Record (run_id, shard) tasks as pending unless already recorded; returns how many were new."""
        rows = [(run_id, shard) for run_id, shard in tasks]
        before = self._count_tasks()
        with self.db:
            self.db.executemany(
                "INSERT INTO tasks (run_id, shard, state, attempts, completions) "
                "VALUES (?, ?, 'pending', 0, 0) ON CONFLICT DO NOTHING",
                rows,
            )
        return self._count_tasks() - before

    def _count_tasks(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

    def tasks(self, run_ids: Sequence[int] | None = None) -> list[Task]:
        """Ledger rows (of ``run_ids``, or all), by run and shard."""
        rows = self.db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY run_id, shard").fetchall()
        wanted = None if run_ids is None else set(run_ids)
        return [Task(*row) for row in rows if wanted is None or row[0] in wanted]

    def claim(self, run_ids: Sequence[int], owner: str, *, retries: int = 3) -> tuple[int, int] | None:
        """Claim the first pending task of ``run_ids`` (or a failed one with fewer than ``retries``
        attempts) for ``owner``: one transaction, so two workers never get the same task."""
        if not run_ids:
            return None
        now = time.time()
        marks = ", ".join("?" for _ in run_ids)
        pick = (
            f"FROM tasks WHERE run_id IN ({marks}) AND (state = 'pending' OR "
            "(state = 'failed' AND attempts < ?)) ORDER BY run_id, shard LIMIT 1"
        )
        claim = (
            "UPDATE tasks SET state = 'running', attempts = attempts + 1, owner = ?, host = ?, claimed = ?, "
            "heartbeat = ?, error = NULL"
        )
        params = (owner, owner.partition(":")[0], now, now, *run_ids, retries)
        with self.db:
            if self.postgres:
                row = self.db.execute(
                    f"{claim} WHERE (run_id, shard) = (SELECT run_id, shard {pick} FOR UPDATE SKIP LOCKED) "
                    "RETURNING run_id, shard",
                    params,
                ).fetchone()
            else:  # one statement: SQLite serialises writers
                row = self.db.execute(
                    f"{claim} WHERE rowid = (SELECT rowid {pick}) RETURNING run_id, shard", params
                ).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def claim_task(
        self, run_id: int, shard: int, owner: str, *, lease: float = 120, retries: int = 3
    ) -> bool:
        """Claim one given task for ``owner`` if nobody works on it: pending, failed (fewer than
        ``retries`` attempts), or running for an owner that is dead (same host) or silent for ``lease``
        seconds. False when it is done or in live hands."""
        row = self.db.execute(
            "SELECT state, owner, heartbeat, attempts FROM tasks WHERE run_id = ? AND shard = ?",
            (run_id, shard),
        ).fetchone()
        if row is None:
            raise ValueError(f"no task (run {run_id}, shard {shard}) in the ledger of {self.path}")
        state, old, heartbeat, attempts = row
        if state == "done" or (state == "failed" and attempts >= retries):
            return False
        if state == "running" and not _stale(old, heartbeat, lease):
            return False
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, owner = ?, host = ?, "
                "claimed = ?, heartbeat = ?, error = NULL WHERE run_id = ? AND shard = ? AND state = ? AND "
                + ("owner IS NULL" if old is None else "owner = ?"),
                (
                    owner,
                    owner.partition(":")[0],
                    now,
                    now,
                    run_id,
                    shard,
                    state,
                    *([] if old is None else [old]),
                ),
            )
            return cur.rowcount == 1

    def beat(self, owner: str) -> None:
        """The owner is alive: refresh the heartbeat of its running task."""
        with self.db:
            self.db.execute(
                "UPDATE tasks SET heartbeat = ? WHERE owner = ? AND state = 'running'", (time.time(), owner)
            )

    def complete(
        self,
        run_id: int,
        shard: int,
        owner: str,
        *,
        seconds: float,
        results: Sequence[ImageResult] = (),
        clean: Sequence[float] | None = None,
    ) -> bool:
        """Mark the task done and write its results in one transaction, only while ``owner`` still holds
        it (a task taken over from a presumed-dead owner is written once, by whoever finishes first
        while holding it). Returns False, writing nothing, when ``owner`` lost it."""

        class Lost(Exception):
            pass

        try:
            with self.db:
                cur = self.db.execute(
                    "UPDATE tasks SET state = 'done', completions = completions + 1, finished = ?, "
                    "seconds = ?, error = NULL WHERE run_id = ? AND shard = ? AND owner = ? "
                    "AND state = 'running'",
                    (time.time(), seconds, run_id, shard, owner),
                )
                if cur.rowcount != 1:
                    raise Lost
                if clean is not None:
                    self._insert_clean(run_id, clean)
                if results:
                    self._insert_results(run_id, list(results))
        except Lost:
            return False
        return True

    def fail(self, run_id: int, shard: int, owner: str, error: str) -> None:
        """Record a failed attempt (``error``: one line); the next claim retries it."""
        with self.db:
            self.db.execute(
                "UPDATE tasks SET state = 'failed', error = ?, finished = ? WHERE run_id = ? AND shard = ? "
                "AND owner = ? AND state = 'running'",
                (error[:2000], time.time(), run_id, shard, owner),
            )

    def release(self, run_ids: Sequence[int] | None = None, *, lease: float = 120) -> int:
        """Put back to pending the running tasks whose owner died (same host) or went silent for
        ``lease`` seconds; returns how many."""
        released = 0
        for task in self.tasks(run_ids):
            if task.state == "running" and _stale(task.owner, task.heartbeat, lease):
                with self.db:
                    cur = self.db.execute(
                        "UPDATE tasks SET state = 'pending', error = ? WHERE run_id = ? AND shard = ? AND "
                        "owner = ? AND state = 'running'",
                        (f"worker {task.owner} died", task.run_id, task.shard, task.owner),
                    )
                released += cur.rowcount
        return released

    def reset_failed(self, run_ids: Sequence[int]) -> int:
        """Give failed tasks a fresh set of attempts (a re-run of the sweep retries them)."""
        marks = ", ".join("?" for _ in run_ids)
        with self.db:
            cur = self.db.execute(
                "UPDATE tasks SET state = 'pending', attempts = 0 "
                f"WHERE state = 'failed' AND run_id IN ({marks})",
                tuple(run_ids),
            )
        return cur.rowcount

    def set_meta(self, key: str, value: str) -> None:
        """Keep a named value (a sweep keeps its runs under ``sweep:NAME``)."""
        with self.db:
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def settings(self, run_id: int) -> dict:
        """The settings of run ``run_id``."""
        row = self.db.execute("SELECT settings FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(f"no run {run_id} in {self.path}")
        return self._settings_of(run_id, row[0])


def _count(value: object) -> bool:
    """Whether a stored value is an integer >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: object) -> bool:
    """Whether a stored value is a finite number."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )


def _stale(owner: str | None, heartbeat: float | None, lease: float) -> bool:
    """A running task's owner is gone: its process died on this host, or it has not beaten for ``lease`` s."""
    if owner is None:
        return True
    alive = owner_alive(owner)
    if alive is False:
        return True
    return heartbeat is None or time.time() - heartbeat > lease


def _upsert(table: str, columns: str, keys: int) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` over ``columns`` whose first ``keys`` are the key
    (the same text works in SQLite >= 3.24 and PostgreSQL)."""
    names = [c.strip() for c in columns.split(",")]
    marks = ", ".join("?" for _ in names)
    update = ", ".join(f"{c} = excluded.{c}" for c in names[keys:])
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(names[:keys])}) DO UPDATE SET {update}"
    )
