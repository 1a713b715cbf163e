"""Stateful detection of query-based attacks: Blacklight (Li et al., USENIX Security 2022).

A query-based attack sends thousands of images that differ from each other in a few pixels. Blacklight
fingerprints every query: quantise the pixels (step 50 of 255), flatten, hash every window of
``window`` consecutive values with SHA-256 and keep the ``hashes`` lexicographically largest hashes; a
query is an attack query when it shares at least ``match`` hashes with one earlier query of the same
client (the count is per earlier query, not over all of them; an image with fewer than ``match``
distinct windows, e.g. a blank one, must share all of them). Benign queries of different images share
few windows; an attack's neighbouring queries share most of them.

The paper's CIFAR-10 settings (window 20, 50 hashes, match >= 25) count on 3072 values per image;
MNIST's 784 pixels are 80 % background zeros and its strokes look alike, so windows of 20 values are
shared by different digits: with the paper's settings 5.9 % of the distinct test images are flagged. The
defaults keep the paper's quantisation, 50 hashes and match >= 25 and widen the window to 56 values
(two image rows): no distinct or naturally varied test image is flagged, and the attacks are flagged
as soon as the paper's (measured with ``benchmarks/blacklight.py --tune``; docs/serving.md, "Stateful
detection"). The implementation follows the paper's algorithm; the OARS code (Feng et al., CCS 2023,
MIT: ``models/statefuldefense.py``) was read to check the details (pixel quantisation by rounding,
duplicate windows hashed once, the top hashes after sorting, a match count per earlier query).

Memory is bounded: each client remembers its last ``history`` queries (the oldest is forgotten first)
and at most ``clients`` clients are tracked (the least recently seen is forgotten first, bans are kept).
A remembered query costs its ``hashes`` 8-byte hash prefixes (ints) in a dict of id lists (about
:data:`BYTES_PER_HASH` bytes each in CPython), so the bound is about ``clients * history * hashes *
BYTES_PER_HASH`` bytes; a hash keeps the ``fanout`` most recent ids that hold it, so matching a query
costs at most ``hashes * fanout`` steps however long an attacker's stream of similar queries is.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from ..checks import check_count

DETECTORS = ("blacklight",)
POLICIES = ("flag", "reject", "ban")
"""What happens to a flagged query: ``flag`` answers it (and counts it), ``reject`` answers 403 (the
images are still charged), ``ban`` answers 403 and refuses every later request of the client."""

BYTES_PER_HASH = 150
"""Approximate CPython memory of one remembered hash (its int in the fingerprint, a dict entry, a list of
ids), measured with tracemalloc over 1000 distinct MNIST queries (docs/serving.md), for the bound."""


@dataclass(frozen=True, kw_only=True)
class Blacklight:
    """Blacklight's parameters: ``quant`` (quantisation step on the 0-255 scale), ``window`` (values per
    hashed window), ``stride`` (between windows), ``hashes`` (top hashes kept per query), ``match``
    (shared hashes with one earlier query that flag a query), ``history`` (queries remembered per
    client), ``clients`` (clients tracked), ``fanout`` (most recent queries kept per hash). Defaults:
    the paper's CIFAR-10 settings, with the window widened from 20 to 56 for 28x28 MNIST
    (docs/serving.md)."""

    quant: int = 50
    window: int = 56
    stride: int = 1
    hashes: int = 50
    match: int = 25
    history: int = 10_000
    clients: int = 32
    fanout: int = 256

    def __post_init__(self) -> None:
        check_count("quant", self.quant, 1, "quantisation step on the 0-255 scale")
        if self.quant > 255:
            raise ValueError(f"quant must be in [1, 255], got {self.quant}")
        check_count("window", self.window, 1, "pixels per hashed window")
        check_count("stride", self.stride, 1, "pixels between windows")
        check_count("hashes", self.hashes, 1, "hashes kept per query")
        check_count("match", self.match, 1, "shared hashes that flag a query")
        if self.match > self.hashes:
            raise ValueError(f"match {self.match} is more than the {self.hashes} hashes kept per query")
        check_count("history", self.history, 1, "queries remembered per client")
        check_count("clients", self.clients, 1, "clients tracked")
        check_count("fanout", self.fanout, 1, "most recent queries kept per hash")

    @classmethod
    def parse(cls, text: str) -> Blacklight:
        """``"blacklight"`` or ``"blacklight:window=30,hashes=20,match=10"``."""
        name, _, options = str(text).strip().partition(":")
        if name.strip().lower() != "blacklight":
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {name!r}")
        fields = {f for f in cls.__dataclass_fields__}
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in options.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                raise ValueError(
                    f"blacklight option {part!r} is not key=value with key one of {', '.join(sorted(fields))}"
                )
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(f"blacklight option {key} must be an integer, got {value!r}") from None
        return cls(**values)

    def describe(self) -> str:
        return (
            f"blacklight:quant={self.quant},window={self.window},stride={self.stride},hashes={self.hashes},"
            f"match={self.match},history={self.history},clients={self.clients},fanout={self.fanout}"
        )

    @property
    def memory_bound(self) -> int:
        """About the most bytes the detector's state can take (see the module docstring)."""
        return self.clients * self.history * self.hashes * BYTES_PER_HASH

    def fingerprint(self, image: np.ndarray) -> tuple[int, ...]:
        """The query's top hashes (8-byte prefixes of SHA-256 as ints, largest first) of one image in
        [0, 1], any shape (flattened in C order: channel, row, column)."""
        levels = np.rint(np.asarray(image, dtype=np.float32).reshape(-1) * (255.0 / self.quant))
        flat = levels.astype(np.uint8)
        if flat.size < self.window:
            windows = {flat.tobytes()}
        else:
            view = np.lib.stride_tricks.sliding_window_view(flat, self.window)[:: self.stride]
            windows = {row.tobytes() for row in view}
        digests = sorted((hashlib.sha256(w).digest() for w in windows), reverse=True)[: self.hashes]
        return tuple(int.from_bytes(d[:8], "big") for d in digests)


@dataclass
class ClientHistory:
    """One client's remembered fingerprints: ``table`` maps a hash to the ids of the queries holding it
    (oldest first), ``order`` the remembered (id, fingerprint) pairs, oldest first."""

    table: dict[int, list[int]] = field(default_factory=dict)
    order: deque[tuple[int, tuple[int, ...]]] = field(default_factory=deque)
    seen: int = 0  # images inspected
    flagged: int = 0  # images flagged
    first: int | None = None  # the query number (1-based) of the first flagged image

    def best_match(self, fp: tuple[int, ...]) -> int:
        """The most hashes ``fp`` shares with one remembered query."""
        counts = Counter(chain.from_iterable(self.table.get(h, ()) for h in fp))
        return counts.most_common(1)[0][1] if counts else 0

    def remember(self, qid: int, fp: tuple[int, ...], history: int, fanout: int) -> None:
        """Remember query ``qid`` (ids increase); forget the oldest beyond ``history`` queries. A hash keeps
        the ``fanout`` most recent ids that hold it, so a match costs at most ``hashes * fanout`` steps."""
        for h in fp:
            ids = self.table.get(h)
            if ids is None:
                self.table[h] = [qid]
            else:
                ids.append(qid)
                if len(ids) > fanout:
                    del ids[0]
        self.order.append((qid, fp))
        while len(self.order) > history:
            old, old_fp = self.order.popleft()
            for h in old_fp:
                ids = self.table[h]
                if ids[0] == old:  # the oldest query is the oldest id of its hashes, or already dropped
                    del ids[0]
                    if not ids:
                        del self.table[h]

    @property
    def remembered(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class Verdict:
    """What the detector says about one request: ``flagged`` images, their best ``matches``, and
    whether the client is (now) ``banned``."""

    flagged: int
    matches: tuple[int, ...]
    banned: bool = False


class Detector:
    """Blacklight per client (an API key's name, or the client's address without keys), with a policy.

    Not thread-safe: the app calls it from one thread (in request order).
    """

    def __init__(self, params: Blacklight, *, policy: str = "flag") -> None:
        if not isinstance(params, Blacklight):
            raise TypeError(f"params must be Blacklight parameters, got {params!r}")
        if policy not in POLICIES:
            raise ValueError(f"detection policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.params, self.policy = params, policy
        self.clients: OrderedDict[str, ClientHistory] = OrderedDict()
        self.banned: set[str] = set()
        self._next_id = 0
        self._remembered = 0

    def is_banned(self, client: str) -> bool:
        return client in self.banned

    def _history(self, client: str) -> ClientHistory:
        record = self.clients.get(client)
        if record is None:
            record = self.clients[client] = ClientHistory()
            while len(self.clients) > self.params.clients:
                _, old = self.clients.popitem(last=False)  # the least recently seen client is forgotten
                self._remembered -= old.remembered
        else:
            self.clients.move_to_end(client)
        return record

    def inspect(self, client: str, x: np.ndarray) -> Verdict:
        """Fingerprint the images of ``x`` (B, C, H, W) in order, match each against the client's
        remembered queries (earlier images of the same batch included), remember them all."""
        record = self._history(client)
        matches = []
        flagged = 0
        for image in x:
            fp = self.params.fingerprint(image)
            best = record.best_match(fp)
            self._next_id += 1
            before = record.remembered
            record.remember(self._next_id, fp, self.params.history, self.params.fanout)
            self._remembered += record.remembered - before
            record.seen += 1
            matches.append(best)
            if best >= min(self.params.match, len(fp)):  # a near-blank image: all of its few hashes
                flagged += 1
                record.flagged += 1
                if record.first is None:
                    record.first = record.seen
        banned = bool(flagged) and self.policy == "ban"
        if banned:
            self.banned.add(client)
        return Verdict(flagged=flagged, matches=tuple(matches), banned=banned)

    def usage(self, client: str) -> dict[str, object]:
        """The client's detection record (for ``GET /v1/usage``)."""
        record = self.clients.get(client)
        return {
            "policy": self.policy,
            "inspected": record.seen if record else 0,
            "flagged": record.flagged if record else 0,
            "first_flagged_query": record.first if record else None,
            "banned": client in self.banned,
        }

    @property
    def remembered(self) -> int:
        """Queries remembered over all clients (kept as a count: safe to read from another thread)."""
        return self._remembered
