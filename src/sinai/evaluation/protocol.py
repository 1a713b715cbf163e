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
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks import make_attack
from ..attacks.base import perturbation_norm, with_verified
from ..attacks.oracle import Oracle
from ..defenses import DefendedModel, Defense, parse_defense, protect
from .clean import clean_accuracy
from .store import ImageResult, ResultStore


@dataclass(frozen=True)
class EvalResult:
    """Clean accuracy over M passes and per-image results of one run."""

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
    *,
    attack: str = "square",
    defense: Defense | str | None = None,
    norm: str = "linf",
    eps: float = 0.05,
    budgets: Sequence[int] = (1000,),
    attack_kwargs: Mapping[str, object] | None = None,
    seed: int = 0,
    passes: int = 3,
    eot: int = 1,
    votes: int = 9,
    lucky: bool = False,
    batch_size: int = 128,
    shard_size: int = 100,
    dataset_indices: Sequence[int] | None = None,
    store: ResultStore | None = None,
    describe: Mapping[str, object] | None = None,
    progress: bool = True,
    track_mismatch: bool = False,
) -> EvalResult:
    """Run ``attack`` on every image against ``model`` protected by ``defense``; see the module docstring.

    ``describe`` adds identifying settings (model and dataset names) to the run's key in ``store``.
    ``track_mismatch`` records P_mis (one extra noise-free forward per query, not counted).
    """
    budgets = tuple(sorted({int(b) for b in budgets}))
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive numbers of queries, got {budgets}")
    if shard_size < 1 or passes < 1:
        raise ValueError("shard_size and passes must be >= 1")
    if not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot (samples per query, M) must be an integer >= 1, got {eot!r}")
    defense = parse_defense(defense) if isinstance(defense, str) else (defense or Defense(name="none"))
    attack_kwargs = dict(attack_kwargs or {})
    attacker = (
        make_attack(attack, norm=norm, eps=eps, seed=seed, **attack_kwargs) if attack != "none" else None
    )
    # Each shard gets its own attack seed: (seed, shard) -> same numbers on resume.
    make = lambda shard_seed: make_attack(attack, norm=norm, eps=eps, seed=shard_seed, **attack_kwargs)
    labels = torch.as_tensor(labels).long()
    indices = list(dataset_indices) if dataset_indices is not None else list(range(len(images)))
    settings = {
        **(describe or {}),
        "defense": defense.describe(),
        "attack": repr(attacker) if attacker else "none",
        "norm": norm,
        "eps": eps,
        "budget": budgets[-1],
        "images": len(images),
        "dataset_indices": indices,
        "seed": seed,
        "passes": passes,
        "eot": eot,
        "votes": votes,
        "lucky": lucky,
        "shard_size": shard_size,  # shards seed the noise and the attack: part of what makes the numbers
    }
    if track_mismatch:  # only when asked, so the keys of existing runs do not change
        settings["track_mismatch"] = True
    store = store or ResultStore(":memory:")
    run_id = store.run_id(settings)
    start = time.perf_counter()
    defended = (
        protect(model, defense, seed=seed) if defense.specs else DefendedModel(model, defense, seed=seed)
    )
    # A model with noise of its own (``randomized = True``, e.g. analysis wrappers) gets the M passes
    # and the success votes of a randomized model even without defense sites.
    randomized = bool(defended.sites) or bool(getattr(model, "randomized", False))
    try:
        clean = store.clean(run_id)
        if not clean:
            acc = clean_accuracy(
                defended, images, labels, passes=passes if randomized else 1, batch_size=batch_size
            )
            store.add_clean(run_id, acc.per_pass)
            clean = list(acc.per_pass)
        done = {r.image for r in store.results(run_id)}
        if attacker is not None:
            _attack_shards(
                defended, images, labels, indices, attacker.name, make, store, run_id, done,
                budget=budgets[-1], seed=seed, eot=eot, votes=votes if randomized else 0, lucky=lucky,
                batch_size=batch_size, shard_size=shard_size, progress=progress,
                norm=norm, eps=eps, budgets=budgets, track_mismatch=track_mismatch,
            )  # fmt: skip
            store.finish(run_id)
    finally:
        defended.remove()
    return EvalResult(settings, tuple(clean), tuple(store.results(run_id)), time.perf_counter() - start)


def _attack_shards(
    defended: DefendedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: list[int],
    name: str,
    make,
    store: ResultStore,
    run_id: int,
    done: set[int],
    *,
    budget: int,
    seed: int,
    eot: int,
    votes: int,
    lucky: bool,
    batch_size: int,
    shard_size: int,
    progress: bool,
    norm: str,
    eps: float,
    budgets: tuple[int, ...],
    track_mismatch: bool,
) -> None:
    n = len(images)
    device = next(defended.parameters()).device
    previous = store.results(run_id)
    bar = tqdm(total=n, initial=len(done), unit="img", desc=name, disable=not progress)
    spent = sum(r.queries for r in previous)
    robust = [r.robust_at(budget) for r in previous]

    def show(queries: int = 0) -> None:
        nonlocal spent
        spent += queries
        rate = f"{100 * sum(robust) / len(robust):.1f}%" if robust else "-"
        bar.set_postfix(queries=spent, robust=rate, refresh=False)

    for shard, start in enumerate(range(0, n, shard_size)):
        members = [i for i in range(start, min(start + shard_size, n)) if i not in done]
        if not members:
            continue
        if len(members) != min(shard_size, n - start):
            raise RuntimeError(
                f"result store holds part of shard {shard}: delete {store.path} or choose another --out"
            )
        x = images[start : start + len(members)].to(device)
        y = labels[start : start + len(members)].to(device)
        defended.reseed(_shard_seed(seed, shard))
        attacker = make(_shard_seed(seed, shard))
        oracle = Oracle(
            defended, y, budget=budget, output=attacker.output, eot=eot, votes=votes, lucky=lucky,
            batch_size=batch_size, x_orig=x, norm=norm, eps=eps, checkpoints=budgets,
            track_mismatch=track_mismatch,
        )  # fmt: skip
        oracle.on_query = show
        clean_ok = oracle.predict(x, passes=max(votes, 1)) == y
        oracle.mark_broken(~clean_ok)
        x_final = with_verified(oracle, attacker.run(oracle, x, y).to(device))
        norms = perturbation_norm(x_final, x, attacker.norm)
        results = [
            ImageResult(
                image=start + j,
                dataset_index=indices[start + j],
                label=int(y[j]),
                clean_correct=bool(clean_ok[j]),
                success_at=int(oracle.success_at[j]) if clean_ok[j] and oracle.success[j] else None,
                queries=int(oracle.queries[j]),
                vote_passes=int(oracle.vote_passes[j]),
                norm=float(norms[j]) if clean_ok[j] else 0.0,
                checkpoint_norms=tuple(
                    (b, float(v) if math.isfinite(v) else None)
                    for b, v in zip(budgets, oracle.checkpoint_norms[j].tolist(), strict=True)
                ),
                mismatches=int(oracle.mismatches[j]) if track_mismatch else None,
            )
            for j in range(len(members))
        ]
        store.add_results(run_id, results)
        robust += [r.robust_at(budget) for r in results]
        show()
        bar.update(len(members))
    bar.close()
