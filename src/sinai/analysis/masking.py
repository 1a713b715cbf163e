"""Gradient-masking checks: does the white-box evaluation of a defense behave as a sound one must?

A defense that only hides its gradients (shattered, stochastic or vanishing gradients, Athalye et al.
2018, "Obfuscated Gradients Give a False Sense of Security") looks robust to gradient attacks while it
is not. Carlini et al. 2019 ("On Evaluating Adversarial Robustness", section 5 and the checklist)
list the symptoms; :func:`check_masking` runs the attacks that expose them through the project's own
protocol (:func:`sinai.evaluation.evaluate` with :class:`~sinai.evaluation.EvalConfig`: the deployed
defended model, success judged by the Oracle's vote, every run in the result store) and compares:

1. *iterative beats single-step*: PGD-20 breaks at least what FGSM breaks;
2. *white-box beats black-box and transfer*: PGD-20 breaks at least what Square (a score attack
   through the Oracle, ``queries`` queries) breaks (2a), and what PGD-20 crafted on the undefended
   model and judged on the defended one (``transfer`` from ``source="base"``) breaks (2b);
3. *robust accuracy falls with eps to ~0*: PGD-20 at eps x 1, 2, 4 and at the largest eps of the norm
   (linf 1; l2 the diameter of the image cube, sqrt(C*H*W)) is non-increasing in eps (3a), and the
   largest, an unbounded attack, leaves (almost) no image robust (3b). The unbounded run starts from
   the clean image (PGD's ``random_start=False``): a uniform random start in the whole cube is
   already a random image that no classifier labels right, so with it every model, masked or not,
   would pass 3b;
4. *EOT does not lower success*: PGD-20 with ``EvalConfig(eot=M)`` (M noisy forwards averaged per
   gradient) breaks at least what plain PGD-20 breaks (on a deterministic model EOT is the plain attack,
   equal by construction; still reported);
5. *more steps do not lower success*: PGD-100 breaks at least what PGD-20 breaks.

Every check is a "should be at least as strong" comparison on the same n images, except 3b. Sampling
noise (the noisy defense, the attacks' random starts) makes two runs of equally strong attacks differ
by a few images, so a warning needs more than a lower count. The rule is a paired one, since both
attacks see the same images: count the images broken only by the should-be-weaker attack (``w``) and
only by the should-be-stronger one (``s``); under "equally strong" each of these ``s + w`` discordant
images is as likely to fall either way, so the check warns when the one-sided exact sign test
(McNemar's exact test) gives P(Bin(s + w, 1/2) >= w) < ``alpha`` (0.05). The paired test is sharper
than comparing two Wilson intervals (the images both attacks break or both miss carry no information
about the difference) and needs no normal approximation for small n. Check 3b warns when the 95%
Wilson interval of the robust accuracy at the largest eps lies entirely above ``tolerance`` (1%): at
n = 100, 0-2 robust images pass and 3 warn; at n = 20 or 50, 0-1 pass and 2 warn. The robust accuracies
are reported with their 95% Wilson intervals (:func:`sinai.reports.stats.wilson_interval`).

A warning is a finding to look at, not an error: a noise defense that the plain PGD loses against
(2a warns, 4 shows EOT winning) has stochastic gradients that EOT must average; a model whose
unbounded attack fails (3b) has gradients that do not lead anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..attacks.threat import ThreatModel
from ..checks import check_count
from ..defenses import Defense
from ..evaluation.config import EvalConfig
from ..evaluation.protocol import EvalResult, evaluate
from ..evaluation.store import ResultStore
from ..reports.stats import wilson_interval
from ..reports.table import markdown_table

STAGE = "masking-check"
"""``describe["stage"]`` of every run the checks store: ``sinai report`` leaves staged runs out of its
tables, so a check's PGD at eps = 1 never enters a worst-case column."""

Status = Literal["pass", "warn"]


@dataclass(frozen=True)
class Measured:
    """One attack run on the check's images: ``robust`` of ``n`` images kept their label; ``broken``
    the positions (in the check's images) of the others, for the paired comparisons."""

    attack: str
    robust: int
    n: int
    broken: frozenset[int] = field(default=frozenset(), repr=False, compare=False)

    @property
    def accuracy(self) -> float:
        """Robust accuracy (fraction)."""
        return self.robust / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the robust accuracy (fractions)."""
        return wilson_interval(self.robust, self.n)

    def text(self) -> str:
        """``PGD-20 12.0 [6.9, 19.9]``: robust accuracy % with its 95% interval."""
        lo, hi = self.interval
        return f"{self.attack} {100 * self.accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


@dataclass(frozen=True)
class Paired:
    """Two attacks on the same images: how many images only one of them broke, and the sign test.

    ``p_value``: one-sided exact sign test of "``weaker`` breaks more than ``stronger``",
    P(Bin(stronger_only + weaker_only, 1/2) >= weaker_only); 1 when no image is discordant.
    """

    stronger: str
    weaker: str
    stronger_only: int
    weaker_only: int
    p_value: float

    def text(self) -> str:
        return f"{self.stronger} only {self.stronger_only} / {self.weaker} only {self.weaker_only}"


@dataclass(frozen=True)
class CheckResult:
    """One gradient-masking check: ``check`` its number (1-5, see the module docstring), ``part``
    ("a"/"b" where a check has two comparisons, else ""), ``name`` what it asks, ``status`` "pass" or
    "warn", the runs it compared (``measured``, robust accuracies) and the paired comparisons that
    decided it (``paired``; empty for 3b), and a one-line ``explanation``."""

    check: int
    part: str
    name: str
    status: Status
    measured: tuple[Measured, ...]
    paired: tuple[Paired, ...]
    explanation: str

    @property
    def id(self) -> str:
        """``"2a"``, ``"5"``: the check's number and part."""
        return f"{self.check}{self.part}"

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def sign_test(stronger_only: int, weaker_only: int) -> float:
    """P(Bin(stronger_only + weaker_only, 1/2) >= weaker_only): exact one-sided McNemar p-value."""
    n = stronger_only + weaker_only
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(weaker_only, n + 1)) / 2**n)


def largest_eps(norm: str, input_shape: Sequence[int]) -> float:
    """The eps that makes the ball cover the whole image cube [0, 1]^d: linf 1, l2 sqrt(d)."""
    return 1.0 if norm == "linf" else math.sqrt(math.prod(input_shape))


def check_masking(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    defense: Defense,
    threat: ThreatModel,
    *,
    store: ResultStore | None = None,
    seed: int = 0,
    eot: int = 10,
    steps: int = 20,
    more_steps: int = 100,
    queries: int = 1000,
    eps_factors: Sequence[float] = (1, 2, 4),
    votes: int = 9,
    bpda: bool = False,
    alpha: float = 0.05,
    tolerance: float = 0.01,
    describe: Mapping[str, object] | None = None,
    dataset_indices: Sequence[int] | None = None,
    batch_size: int = 128,
    progress: bool = False,
) -> list[CheckResult]:
    """Run the gradient-masking checks of the module docstring on ``model`` under ``defense``.

    ``images``/``labels``: the n images every attack runs on (the same ones: comparisons are paired).
    ``threat``: the threat model of checks 1, 2, 4, 5 and the base eps of check 3. ``store``: the
    result store every run goes to (a rerun with the same arguments resumes and reads the same
    numbers; default: in memory). ``seed``: the evaluation seed of every run (the same seed gives
    every PGD run the same random start). ``eot``: M of check 4 (>= 2 for an EOT run). ``steps``: PGD
    steps of every PGD run (Carlini et al.'s PGD-20); ``more_steps`` (> ``steps``): check 5's longer run.
    ``queries``: Square's query budget (check 2a). ``eps_factors``: multiples of ``threat.eps`` in
    check 3a (those at or above the largest eps of the norm are dropped; the largest is always run).
    ``votes``: the Oracle's uncounted confirming passes on a randomized model. ``bpda``: white-box runs
    pass gradients straight through the defense's non-smooth steps. ``alpha``: level of the paired
    sign test; ``tolerance``: robust accuracy still counted as "~0" by check 3b. ``describe``: labels
    stored with every run (model, dataset, ...; ``stage`` is set to :data:`STAGE`).

    Returns one :class:`CheckResult` per comparison, in the order 1, 2a, 2b, 3a, 3b, 4, 5.
    """
    check_count("eot", eot, 2, "noisy forwards averaged per gradient in the EOT check, M")
    check_count("steps", steps, 1, "PGD steps")
    check_count("more_steps", more_steps, 1, "PGD steps of the longer run")
    if more_steps <= steps:
        raise ValueError(f"more_steps ({more_steps}) must be more than steps ({steps})")
    check_count("queries", queries, 1, "Square's queries per image")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    factors = tuple(float(f) for f in eps_factors)
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
        raise ValueError(f"eps_factors must be positive numbers, got {tuple(eps_factors)!r}")
    if len(images) < 1:
        raise ValueError("the checks need at least one image")
    shape = tuple(getattr(model, "input_shape", None) or images.shape[1:])
    top = largest_eps(threat.norm, shape)
    if threat.eps > top:
        raise ValueError(f"{threat.norm} eps {threat.eps:g} is larger than the largest eps {top:g}")

    runner = _Runner(
        model, images, labels, defense, store=store or ResultStore(":memory:"), seed=seed, votes=votes,
        describe={**(describe or {}), "stage": STAGE}, dataset_indices=dataset_indices,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    wb = {"bpda": True} if bpda else {}
    pgd_args = {"steps": steps}
    pgd_name = f"PGD-{steps}"
    pgd = runner.run(pgd_name, "pgd", pgd_args, threat, **wb)
    fgsm = runner.run("FGSM", "fgsm", {}, threat, **wb)
    square = runner.run(f"Square-{queries}", "square", {}, threat, budget=queries)
    transfer = runner.run(
        f"transfer {pgd_name} from base", "transfer",
        {"source": "base", "attack": "pgd", "attack_args": pgd_args}, threat,
    )  # fmt: skip
    epsilons = sorted({threat.eps * f for f in factors if threat.eps * f < top})
    by_eps = [
        pgd if e == threat.eps else runner.run(f"{pgd_name} eps={e:g}", "pgd", pgd_args, _at(threat, e), **wb)
        for e in epsilons
    ]
    # The unbounded run starts at the clean image: a random start in the whole cube is already a
    # random image, which no classifier labels right, masked gradients or not.
    unbounded_args = {**pgd_args, "random_start": False}
    unbounded = f"{pgd_name} eps={top:g} (no random start)"
    by_eps.append(runner.run(unbounded, "pgd", unbounded_args, _at(threat, top), **wb))
    with_eot = runner.run(f"EOT-{eot} {pgd_name}", "pgd", pgd_args, threat, eot=eot, budget=eot, **wb)
    longer = runner.run(f"PGD-{more_steps}", "pgd", {"steps": more_steps}, threat, **wb)

    deterministic = runner.deterministic(pgd)
    results = [
        _at_least(1, "", "iterative beats single-step", pgd, fgsm, alpha,
                  "a single step breaking images PGD misses means PGD's steps do not follow the loss"),
        _at_least(2, "a", "white-box beats black-box", pgd, square, alpha,
                  "a gradient-free attack beating the gradient attack means the gradients mislead it"),
        _at_least(2, "b", "white-box beats transfer", pgd, transfer, alpha,
                  "images crafted on the undefended model break more than gradients through the defense"),
        _monotone(by_eps, alpha),
        _unbounded(by_eps[-1], tolerance),
        _at_least(4, "", "EOT does not lower success", with_eot, pgd, alpha,
                  "averaging the noise's gradients lost images: the EOT gradient is the weaker one",
                  note="deterministic model: EOT is the plain attack, equal by construction"
                  if deterministic else ""),
        _at_least(5, "", "more steps do not lower success", longer, pgd, alpha,
                  "more steps lost images: the loss landscape stops PGD from converging"),
    ]  # fmt: skip
    return results


def checks_table(results: Sequence[CheckResult]) -> str:
    """The checks as a Markdown table: status, robust accuracy % [95% Wilson interval] of each run
    compared, the paired counts and the sign test's p-value; the explanations follow, one a line."""
    n = results[0].measured[0].n if results else 0
    rows = []
    for r in results:
        rows.append(
            [
                r.id,
                r.name,
                r.status.upper() if r.status == "warn" else r.status,
                "; ".join(m.text() for m in r.measured),
                "; ".join(f"{p.stronger_only} / {p.weaker_only}" for p in r.paired) or "-",
                "; ".join(f"{p.p_value:.2g}" for p in r.paired) or "-",
            ]
        )
    headers = ["#", "check", "status", f"robust % [95% CI], n = {n}", "only stronger / only weaker", "p"]
    lines = [f"{r.id} {r.status}: {r.explanation}" for r in results]
    return "\n".join([markdown_table(headers, rows), "", *lines])


# ------------------------------------------------------------------------------------------ internals


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _at(threat: ThreatModel, eps: float) -> ThreatModel:
    return ThreatModel(threat.norm, eps)


class _Runner:
    """Runs the evaluations of one check session on the same images into one store (a run whose
    settings the store holds is read back, not attacked again)."""

    def __init__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, defense: Defense, *,
        store: ResultStore, seed: int, votes: int, describe: Mapping[str, object],
        dataset_indices: Sequence[int] | None, batch_size: int, progress: bool,
    ) -> None:  # fmt: skip
        self.model, self.images, self.labels, self.defense = model, images, labels, defense
        self.store, self.seed, self.votes, self.describe = store, seed, votes, describe
        self.indices, self.batch_size, self.progress = dataset_indices, batch_size, progress
        self.results: dict[str, EvalResult] = {}

    def run(
        self, label: str, attack: str, args: Mapping[str, object], threat: ThreatModel, *,
        eot: int = 1, budget: int = 1, bpda: bool = False,
    ) -> Measured:  # fmt: skip
        """One evaluation (white-box and transfer runs cost one judging query of ``eot`` samples per
        image, so their budget is ``eot``); its robust accuracy at the run's budget."""
        config = EvalConfig(
            attack=attack, attack_args=args, defense=self.defense, threat=threat, budgets=(budget,),
            seed=self.seed, eot=eot, votes=self.votes, bpda=bpda, describe=self.describe,
        )  # fmt: skip
        result = evaluate(
            self.model, self.images, self.labels, config, dataset_indices=self.indices, store=self.store,
            batch_size=self.batch_size, progress=self.progress,
        )  # fmt: skip
        self.results[label] = result
        broken = frozenset(r.image for r in result.results if not r.robust_at(config.budget))
        return Measured(label, len(result.results) - len(broken), len(result.results), broken)

    def deterministic(self, measured: Measured) -> bool:
        """No noise site applies to the model and the model has no noise of its own."""
        result = self.results[measured.attack]
        return not result.config.defense.specs and not getattr(self.model, "randomized", False)


def _pair(stronger: Measured, weaker: Measured) -> Paired:
    s, w = len(stronger.broken - weaker.broken), len(weaker.broken - stronger.broken)
    return Paired(stronger.attack, weaker.attack, s, w, sign_test(s, w))


def _at_least(
    check: int, part: str, name: str, stronger: Measured, weaker: Measured, alpha: float, meaning: str,
    *, note: str = "",
) -> CheckResult:  # fmt: skip
    paired = _pair(stronger, weaker)
    warn = paired.p_value < alpha
    counts = (
        f"{weaker.attack} alone broke {_images(paired.weaker_only)}, {stronger.attack} alone "
        f"{paired.stronger_only} (sign test p = {paired.p_value:.2g})"
    )
    if warn:
        explanation = f"{counts}: {meaning}"
    else:
        explanation = f"{stronger.attack} is at least as strong as {weaker.attack}: {counts}"
        if note:
            explanation += f"; {note}"
    return CheckResult(
        check, part, name, "warn" if warn else "pass", (stronger, weaker), (paired,), explanation
    )


def _monotone(by_eps: Sequence[Measured], alpha: float) -> CheckResult:
    pairs = tuple(_pair(big, small) for small, big in zip(by_eps, by_eps[1:], strict=False))
    bad = [p for p in pairs if p.p_value < alpha]
    name = "robust accuracy falls with eps"
    if bad:
        worst = min(bad, key=lambda p: p.p_value)
        explanation = (
            f"{worst.stronger} left robust {_images(worst.weaker_only)} that {worst.weaker} broke "
            f"({worst.stronger_only} the other way; sign test p = {worst.p_value:.2g}): a larger ball "
            "must not help the model; the attack does not use its room"
        )
    elif pairs:
        explanation = "robust accuracy does not rise significantly with eps: " + ", ".join(
            f"{100 * m.accuracy:.1f}%" for m in by_eps
        )
    else:
        explanation = "only one eps to compare (the threat's eps is already the largest)"
    return CheckResult(3, "a", name, "warn" if bad else "pass", tuple(by_eps), pairs, explanation)


def _unbounded(last: Measured, tolerance: float) -> CheckResult:
    lo, _ = last.interval
    warn = lo > tolerance
    lead = f"{last.attack}, a ball around the whole image cube, left {last.robust} of {last.n} images robust"
    if warn:
        explanation = (
            f"{lead}, 95% interval above {100 * tolerance:g}%: an unbounded attack must break every "
            "image; its gradients lead nowhere"
        )
    else:
        explanation = f"{lead}: consistent with ~100% success (tolerance {100 * tolerance:g}%)"
    return CheckResult(
        3, "b", "unbounded attack reaches ~100%", "warn" if warn else "pass", (last,), (), explanation
    )
