"""API keys: who may query, and how much.

The key file (``--api-keys FILE``) is JSON and never holds a key, only its SHA-256::

    {"version": 1,
     "keys": [{"name": "alice", "sha256": "<64 hex digits>", "budget": 100000, "rate": 200.0,
               "burst": null, "created": "2026-01-01T00:00:00+00:00"}]}

``budget``: queries (images) the key may send in all (null: unlimited); ``rate``: queries per second,
a token bucket holding ``burst`` queries (null: ``max(rate, the server's --max-batch)``); null rate:
unlimited. A key is 32 random bytes (``secrets.token_urlsafe``) behind the prefix ``sk-sinai-``: with
that much entropy one unsalted SHA-256 is enough (nobody can search the key space), and a lookup by
hash leaks nothing about other keys. ``sinai serve keys add --file FILE --name NAME`` writes an entry
and prints the key once.

Usage is counted in the server process (a restart starts from zero).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "sk-sinai-"
FILE_VERSION = 1


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key`` (what the key file stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, kw_only=True)
class KeyEntry:
    """One key of the key file (its hash, never the key)."""

    name: str
    sha256: str
    budget: int | None = None
    rate: float | None = None
    burst: int | None = None
    created: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 128:
            raise ValueError(
                f"key name must be a non-empty string of at most 128 characters, got {self.name!r}"
            )
        if (
            not isinstance(self.sha256, str)
            or len(self.sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"key {self.name!r}: sha256 must be 64 lowercase hex digits")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0
        ):
            raise ValueError(f"key {self.name!r}: budget must be a number of queries >= 0 or null")
        if self.rate is not None:
            if (
                isinstance(self.rate, bool)
                or not isinstance(self.rate, (int, float))
                or not 0 < self.rate < math.inf
            ):
                raise ValueError(f"key {self.name!r}: rate must be queries per second > 0, or null")
            object.__setattr__(self, "rate", float(self.rate))
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise ValueError(f"key {self.name!r}: burst must be a number of queries >= 1, or null")

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "budget": self.budget,
            "rate": self.rate,
            "burst": self.burst,
            "created": self.created,
        }


def read_keys(path: str | os.PathLike) -> list[KeyEntry]:
    """The entries of key file ``path`` (ValueError naming the problem for a malformed file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"API key file {path} is not JSON: {err}") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != FILE_VERSION
        or not isinstance(data.get("keys"), list)
    ):
        raise ValueError(
            f'API key file {path} must be {{"version": {FILE_VERSION}, "keys": [...]}}; '
            "create it with `sinai serve keys add`"
        )
    entries = []
    for item in data["keys"]:
        if not isinstance(item, dict):
            raise ValueError(f"API key file {path}: every key must be an object, got {item!r}")
        unknown = set(item) - {"name", "sha256", "budget", "rate", "burst", "created"}
        if unknown:
            raise ValueError(
                f"API key file {path}: unknown fields {sorted(unknown)} in key {item.get('name')!r}"
            )
        entries.append(KeyEntry(**item))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"API key file {path}: key names must be unique, got {names}")
    if len({e.sha256 for e in entries}) != len(entries):
        raise ValueError(f"API key file {path}: two entries hold the same key")
    return entries


def write_keys(path: str | os.PathLike, entries: list[KeyEntry]) -> None:
    """Write the key file atomically, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"version": FILE_VERSION, "keys": [e.to_dict() for e in entries]}, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def add_key(
    path: str | os.PathLike,
    name: str,
    *,
    budget: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
) -> str:
    """Add a key called ``name`` to key file ``path`` (created if missing); return the key (shown once)."""
    path = Path(path)
    entries = read_keys(path) if path.exists() else []
    if any(e.name == name for e in entries):
        raise ValueError(
            f"key file {path} already has a key named {name!r}; remove it first or pick another name"
        )
    key = new_key()
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries.append(
        KeyEntry(name=name, sha256=hash_key(key), budget=budget, rate=rate, burst=burst, created=created)
    )
    write_keys(path, entries)
    return key


def remove_key(path: str | os.PathLike, name: str) -> None:
    """Remove the key called ``name`` from key file ``path``."""
    entries = read_keys(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise ValueError(f"key file {path} has no key named {name!r}; it has {[e.name for e in entries]}")
    write_keys(path, kept)


class Refused(Exception):
    """A request the key may not make now: ``status`` (429), a one-line ``message``, ``retry_after`` s."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class KeyUsage:
    """A key's limits and what it has used; ``tokens`` is its rate bucket."""

    entry: KeyEntry
    capacity: float
    queries: int = 0
    requests: int = 0
    rejected: int = 0
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def admit(self, images: int) -> None:
        """Charge ``images`` queries, or raise :class:`Refused` (budget spent, or rate exceeded)."""
        budget, rate = self.entry.budget, self.entry.rate
        if budget is not None and self.queries + images > budget:
            self.rejected += 1
            raise Refused(
                429,
                f"query budget exhausted: key {self.entry.name!r} has used {self.queries} of {budget} "
                f"queries and this request needs {images}",
            )
        if rate is not None:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            if images > self.capacity:
                self.rejected += 1
                raise Refused(
                    429,
                    f"a request of {images} images exceeds the burst of {self.capacity:g} queries of key "
                    f"{self.entry.name!r}; send smaller batches",
                )
            if self.tokens < images:
                self.rejected += 1
                wait = max(1, math.ceil((images - self.tokens) / rate))
                raise Refused(
                    429, f"rate limit of {rate:g} queries/s exceeded; retry in {wait} s", retry_after=wait
                )
            self.tokens -= images
        self.queries += images
        self.requests += 1

    def to_dict(self) -> dict[str, object]:
        budget = self.entry.budget
        return {
            "key": self.entry.name,
            "queries": self.queries,
            "requests": self.requests,
            "rejected": self.rejected,
            "budget": budget,
            "remaining": None if budget is None else budget - self.queries,
            "rate": self.entry.rate,
            "burst": self.capacity if self.entry.rate is not None else None,
        }


class KeyRing:
    """The keys a server accepts (from its key file), each with its usage; lookups by hash."""

    def __init__(self, entries: list[KeyEntry], *, max_batch: int) -> None:
        self._by_hash: dict[str, KeyUsage] = {}
        for e in entries:
            capacity = float(e.burst if e.burst is not None else max(e.rate or 0.0, max_batch))
            self._by_hash[e.sha256] = KeyUsage(entry=e, capacity=capacity, tokens=capacity)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, max_batch: int) -> KeyRing:
        entries = read_keys(path)
        if not entries:
            raise ValueError(f"API key file {path} holds no key; add one with `sinai serve keys add`")
        return cls(entries, max_batch=max_batch)

    def lookup(self, key: str | None) -> KeyUsage | None:
        """The usage record of ``key``, or None when it is missing or unknown."""
        if not key:
            return None
        return self._by_hash.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._by_hash)
