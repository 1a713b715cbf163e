"""The papers' robust-accuracy protocol (RFD section 4.1, SINAI section 5.1).

N seeded class-covering images; clean accuracy of the randomized model as the mean over M noisy
passes; each image attacked through an Oracle with the largest budget; robust accuracy at every
budget from the query index of the verified success; images the model already gets wrong (by the vote)
count as not robust and cost no queries. Images are attacked in shards; each shard reseeds the noise
and the attack from (seed, shard) and is written to the result store in one transaction, so a killed
run resumes with identical numbers and a finished run is never recomputed.

The oracle gets the threat model, so only queries inside the eps-ball can be successes (decision-based
attacks query far outside it), and the attack's output mode (scores or labels) from the attack class.
Per image it also records the smallest norm of a query labelled adversarial at every budget, and, with
``track_mismatch``, the queries labelled differently from the noise-free model: the SND metrics
(attack success rate, mean perturbation norm at each budget, P_mis). ``eot=M`` is EOT (mean of M
samples) for score-based attacks and the T-query majority label (T = M) for decision-based ones; every
sample is a counted query.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.oracle import Oracle
from ..checks import check_count
from ..defenses import DefendedModel
from .clean import clean_accuracy
from .config import EvalConfig
from .store import ImageResult, ResultStore


@dataclass(frozen=True)
class EvalResult:
    """Clean accuracy over M passes and per-image results of one run (``config`` with the defense
    applicable to the model; ``settings`` its key in the store)."""

    config: EvalConfig
    settings: Mapping[str, object]
    clean: tuple[float, ...]
    results: tuple[ImageResult, ...]
    seconds: float

    @property
    def clean_mean(self) -> float:
        return statistics.fmean(self.clean)

    @property
    def clean_std(self) -> float:
        return statistics.pstdev(self.clean) if len(self.clean) > 1 else 0.0

    def robust_accuracy(self, budget: int) -> float:
        """Share of the N images with no verified adversarial example within ``budget`` queries."""
        return sum(r.robust_at(budget) for r in self.results) / max(len(self.results), 1)

    def attack_success_rate(self, budget: int) -> float:
        """SND's attack success rate: share of the correctly classified images broken within ``budget``."""
        attacked = [r for r in self.results if r.clean_correct]
        return sum(not r.robust_at(budget) for r in attacked) / max(len(attacked), 1)

    def mean_norm(self, budget: int) -> float | None:
        """SND Table 3: mean over the attacked images of the smallest adversarial query norm by ``budget``.

        Images with no query labelled adversarial by then are left out; None when no image has one.
        """
        norms = [r.norm_at(budget) for r in self.results if r.clean_correct]
        norms = [n for n in norms if n is not None]
        return statistics.fmean(norms) if norms else None

    @property
    def p_mis(self) -> float | None:
        """SND Table 5: share of all counted queries labelled differently from the noise-free model."""
        tracked = [r for r in self.results if r.mismatches is not None and r.clean_correct]
        queries = sum(r.queries for r in tracked)
        return sum(r.mismatches for r in tracked) / queries if queries else None


def _shard_seed(seed: int, shard: int) -> int:
    return seed * 1_000_003 + shard


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EvalConfig,
    *,
    dataset_indices: Sequence[int] | None = None,
    store: ResultStore | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> EvalResult:
    """Run ``config`` on every image against ``model``; see the module docstring.

    ``dataset_indices`` (the images' indices in their dataset) become part of the run's key in
    ``store``; ``batch_size`` is the forward chunk size.
    """
    check_count("batch_size", batch_size, 1, "images per forward")
    labels = torch.as_tensor(labels).long()
    indices = list(dataset_indices) if dataset_indices is not None else list(range(len(images)))
    if len(indices) != len(images) or len(labels) != len(images):
        raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(indices)} dataset indices")
    start = time.perf_counter()
    # Finds the sites once; its defense is the one applicable to this model (SINAI on a CNN is its
    # ReLU part), and that is what the run is stored under.
    defended = DefendedModel(model, config.defense, seed=config.seed)
    try:
        if defended.defense != config.defense:
            config = replace(config, defense=defended.defense)
        settings = config.settings(images=len(images), dataset_indices=indices)
        store = store or ResultStore(":memory:")
        run_id = store.run_id(settings)
        # A defense with noise, or a model with noise of its own (``randomized = True``, e.g. analysis
        # wrappers), gets the M passes and the success votes of a randomized model; AAA is deterministic.
        randomized = defended.defense.randomized or bool(getattr(model, "randomized", False))
        clean = store.clean(run_id)
        if not clean:
            acc = clean_accuracy(
                defended, images, labels, passes=config.passes if randomized else 1, batch_size=batch_size
            )
            store.add_clean(run_id, acc.per_pass)
            clean = list(acc.per_pass)
        if config.attacker is not None:
            _Shards(defended, config, store, run_id, randomized, batch_size).run(
                images, labels, indices, progress=progress
            )
            store.finish(run_id)
    finally:
        defended.remove()
    return EvalResult(
        config, settings, tuple(clean), tuple(store.results(run_id)), time.perf_counter() - start
    )


def attack_shard(
    defended: DefendedModel,
    config: EvalConfig,
    shard: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset_indices: Sequence[int],
    *,
    first: int,
    randomized: bool,
    batch_size: int = 128,
) -> list[ImageResult]:
    """Attack shard ``shard`` of a run (its images start at image ``first``) exactly as :func:`evaluate`
    does: noise and attack reseeded from (seed, shard), so the results do not depend on who runs the
    shard or when (what a sweep worker runs; nothing is stored). ``randomized``: the defended model
    draws noise (votes apply)."""
    if not len(images) == len(labels) == len(dataset_indices):
        raise ValueError(
            f"{len(images)} images, {len(labels)} labels and {len(dataset_indices)} dataset indices"
        )
    shards = _Shards(defended, config, None, -1, randomized, batch_size)  # type: ignore[arg-type] - unstored
    return shards._attack_shard(shard, images, labels, list(dataset_indices), first, lambda _queries=0: None)


@dataclass
class _Shards:
    """Attacks a run's images shard by shard, each seeded from (seed, shard) and stored in one transaction."""

    defended: DefendedModel
    config: EvalConfig
    store: ResultStore
    run_id: int
    randomized: bool
    batch_size: int

    def run(self, images: torch.Tensor, labels: torch.Tensor, indices: list[int], *, progress: bool) -> None:
        cfg, n = self.config, len(images)
        previous = self.store.results(self.run_id)
        done = {r.image for r in previous}
        bar = tqdm(total=n, initial=len(done), unit="img", desc=cfg.attack, disable=not progress)
        spent = sum(r.queries for r in previous)
        robust = [r.robust_at(cfg.budget) for r in previous]

        def show(queries: int = 0) -> None:
            nonlocal spent
            spent += queries
            rate = f"{100 * sum(robust) / len(robust):.1f}%" if robust else "-"
            bar.set_postfix(queries=spent, robust=rate, refresh=False)

        for shard, start in enumerate(range(0, n, cfg.shard_size)):
            members = [i for i in range(start, min(start + cfg.shard_size, n)) if i not in done]
            if not members:
                continue
            if len(members) != min(cfg.shard_size, n - start):
                raise ValueError(
                    f"result store {self.store.path} holds part of shard {shard}: delete it or write "
                    "the run to another store"
                )
            stop = start + len(members)
            results = self._attack_shard(
                shard, images[start:stop], labels[start:stop], indices[start:stop], start, show
            )
            self.store.add_results(self.run_id, results)
            robust += [r.robust_at(cfg.budget) for r in results]
            show()
            bar.update(len(members))
        bar.close()

    def _attack_shard(
        self, shard: int, x: torch.Tensor, y: torch.Tensor, indices: list[int], first: int, show
    ) -> list[ImageResult]:
        cfg, device = self.config, next(self.defended.parameters()).device
        x, y = x.to(device), y.to(device)
        seed = _shard_seed(cfg.seed, shard)
        self.defended.reseed(seed)
        # A deterministic model needs no votes: the query itself decides.
        rules = cfg.rules if self.randomized or not cfg.votes else replace(cfg.rules, votes=0)
        oracle = Oracle(
            self.defended, x, y, threat=cfg.threat, rules=rules, output=cfg.attacker.output,
            batch_size=self.batch_size, checkpoints=cfg.budgets, track_mismatch=cfg.track_mismatch,
            bpda=cfg.bpda,
        )  # fmt: skip
        oracle.on_query = show
        clean_ok = oracle.predict(x, passes=max(rules.votes, 1)) == y
        oracle.mark_broken(~clean_ok)
        x_adv = cfg.attacker(oracle, seed=seed)
        norms = cfg.threat.distance(x_adv, x)
        rates, passes = self._confirm(x_adv, y, oracle.success & clean_ok)
        return [
            ImageResult(
                image=first + j,
                dataset_index=indices[j],
                label=int(y[j]),
                clean_correct=bool(clean_ok[j]),
                success_at=int(oracle.success_at[j]) if clean_ok[j] and oracle.success[j] else None,
                queries=int(oracle.queries[j]),
                vote_passes=int(oracle.vote_passes[j]),
                norm=float(norms[j]) if clean_ok[j] else 0.0,
                checkpoint_norms=tuple(
                    (b, float(v) if math.isfinite(v) else None)
                    for b, v in zip(cfg.budgets, oracle.checkpoint_norms[j].tolist(), strict=True)
                ),
                mismatches=int(oracle.mismatches[j]) if cfg.track_mismatch else None,
                confirm_rate=rates.get(j),
                confirm_passes=passes if j in rates else 0,
                capped=bool(oracle.capped[j]),
            )
            for j in range(len(x))
        ]

    @torch.no_grad()
    def _confirm(
        self, x_adv: torch.Tensor, y: torch.Tensor, broken: torch.Tensor
    ) -> tuple[dict[int, float], int]:
        """Re-check every returned adversarial example (``broken`` rows) on ``confirm`` fresh, uncounted
        passes (one on a deterministic model): per row, the share that misclassifies it."""
        rows = torch.nonzero(broken).flatten().tolist()
        passes = (self.config.confirm if self.randomized else 1) if self.config.confirm else 0
        if not rows or not passes:
            return {}, passes
        xs, ys = x_adv[rows], y[rows]
        wrong = torch.zeros(len(rows), device=ys.device)
        chunk = max(1, self.batch_size // len(rows))
        for start in range(0, passes, chunk):
            block = min(chunk, passes - start)
            labels = self.defended(xs.repeat(block, 1, 1, 1)).argmax(1).view(block, len(rows))
            wrong += (labels != ys).sum(0)
        return dict(zip(rows, (wrong / passes).tolist(), strict=True)), passes
