"""Attack-engine throughput: counted queries per second / the model's own forward images per second.

Both are measured in one run on the same model, images and batch size. The threat model uses a small
eps so that few images are broken and the live set stays full: the ratio then shows what the attack
costs beyond the forwards it asks for (target >= 0.9).

The forward rate is measured on images like the attack's queries: each clean image moved to the edge
of the threat ball along seeded random signs, inside [0, 1]. A model's forward can depend on its
input's values: the embedded CNN forwarded such images about 10% slower than MNIST's clean ones, whose
background is exactly zero. Against clean images that difference would count as engine overhead.

On a shared or small machine one timing moves by 10-20% from run to run, so each attack is measured in
``rounds`` interleaved rounds (forward rate, then the attack) and the median ratio is reported with
its range. ``forward_share`` is a second, in-run view of the same overhead: the fraction of the
attack's wall time spent inside the model's forwards (1 = no engine overhead at all).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..attacks import ATTACKS, Oracle, QueryRules, ThreatModel, attack_class, make_attack
from ..attacks.square import random_sign
from ..attacks.threat import project
from ..evaluation.clean import predict

#: The query-based attacks (score- and decision-based), the default of :func:`measure_attacks`: their
#: queries/s ratio is the point. White-box and transfer attacks can be named too, but their time goes
#: into gradients and surrogate queries, not counted queries, so their ratio says little.
QUERY_ATTACKS: tuple[str, ...] = tuple(a for a in ATTACKS if attack_class(a).kind in ("score", "decision"))


@dataclass(frozen=True)
class ThroughputRow:
    """One attack's throughput: medians over the rounds, and the range of the ratio."""

    attack: str
    images: int
    queries: int
    seconds: float
    queries_per_s: float
    forward_images_per_s: float
    ratio: float
    ratio_min: float
    ratio_max: float
    forward_share: float


@torch.no_grad()
def query_like(x: torch.Tensor, threat: ThreatModel, seed: int = 0) -> torch.Tensor:
    """``x`` moved to the edge of ``threat``'s ball along seeded random signs (projected onto the ball
    and [0, 1]): images like an attack's queries."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    step = random_sign(tuple(x.shape), gen, x.device).mul_(max(1.0, threat.eps))  # (past the edge)
    return project(x + step, x, threat.norm, threat.eps)


def forward_rate(model: nn.Module, x: torch.Tensor, batch_size: int, repeats: int = 5) -> float:
    """Images per second of ``model`` on ``x`` forwarded in chunks of ``batch_size`` (median of repeats)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])  # the first is a warm-up
    return len(x) / times[len(times) // 2]


class Stopwatch(nn.Module):
    """``model`` that adds the wall time of each of its forwards to ``seconds``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes, self.seconds = model, model.num_classes, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(x)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        return out


def measure_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str] = QUERY_ATTACKS,
    *,
    eps: float = 0.05,
    l2_eps: float = 0.5,
    budget: int = 200,
    batch_size: int = 128,
    rounds: int = 3,
    seed: int = 0,
) -> list[ThroughputRow]:
    """Run each attack ``rounds`` times on all of ``x`` and relate its query rate to the forward rate.

    ``attacks``: any registered attacks (default: the query attacks, :data:`QUERY_ATTACKS`). Attacks
    defined for linf run with ``eps``; l2-only attacks with ``l2_eps``. Every round runs the same seeded
    attack, so it asks for the same queries.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rows = []
    for name in attacks:
        threat = ThreatModel("linf", eps) if "linf" in attack_class(name).norms else ThreatModel("l2", l2_eps)
        attack = make_attack(name)
        probe = query_like(x, threat, seed)
        rates, seconds, shares, queries = [], [], [], 0
        for _ in range(rounds):
            rates.append(forward_rate(model, probe, batch_size))
            timed = Stopwatch(model)
            rules = QueryRules(budget=budget, votes=0)
            oracle = Oracle(
                timed, x, y, threat=threat, rules=rules, output=attack.output, batch_size=batch_size
            )
            start = time.perf_counter()
            attack(oracle, seed=seed)
            seconds.append(time.perf_counter() - start)
            shares.append(timed.seconds / seconds[-1])
            queries = int(oracle.queries.sum())
        ratios = [queries / s / r for s, r in zip(seconds, rates, strict=True)]
        median_s, ratio = statistics.median(seconds), statistics.median(ratios)
        rate, share = statistics.median(rates), statistics.median(shares)
        row = ThroughputRow(name, len(x), queries, median_s, queries / median_s, rate, ratio, min(ratios),
                            max(ratios), share)  # fmt: skip
        rows.append(row)
    return rows


def random_weight_setup(
    name: str, images: int, *, device: torch.device | str = "cpu", cache_dir: str | None = None, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A zoo model with random weights, ``images`` seeded uniform images of its input shape and, as
    labels, its own predictions (every image starts correctly classified): the large models of
    ``sinai bench attacks --large`` need no dataset on disk."""
    from ..models.zoo import load_model

    model = load_model(name, weights="random", device=device, cache_dir=cache_dir, progress=False)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((images, *model.input_shape), generator=gen).to(device)
    with torch.no_grad():
        y = predict(model, x).to(device)
    return model, x, y


@dataclass(frozen=True)
class PeerRow:
    tool: str
    images: int
    seconds: float
    success_rate: float
    median_norm: float | None = None  # of the successful examples (minimum-norm attacks)


def compare_square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 0.3,
    budget: int = 1000,
    p_init: float = 0.05,
    batch_size: int = 128,
    rounds: int = 1,
    seed: int = 0,
) -> list[PeerRow]:
    """sinai's Square vs torchattacks' ``Square`` vs ART's ``SquareAttack``: same model, images, eps, budget.

    Success = the final image is misclassified (for all three, over all images). Each tool runs
    ``rounds`` times in turn (seeded, so every round gives the same images) and reports its median
    time. Peers missing from the environment are skipped; install them with ``pip install 'sinai[peers]'``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    tools: list[tuple[str, Callable[[], float]]] = []

    def ours() -> float:
        oracle = Oracle(
            model,
            x,
            y,
            threat=ThreatModel("linf", eps),
            rules=QueryRules(budget=budget, votes=0),
            batch_size=batch_size,
        )
        make_attack("square", p_init=p_init)(oracle, seed=seed)
        return oracle.success.float().mean().item()

    tools.append(("sinai Square", ours))
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    if torchattacks is not None:

        def theirs() -> float:
            attack = torchattacks.Square(
                model, norm="Linf", eps=eps, n_queries=budget, p_init=p_init, seed=seed
            )
            adv = torch.cat(
                [attack(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
            )
            return _misclassified(model, adv, y)

        tools.append(("torchattacks Square", theirs))
    try:
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        SquareAttack = None
    if SquareAttack is not None:
        import numpy as np

        def art() -> float:
            clf = PyTorchClassifier(
                model=model,
                loss=nn.CrossEntropyLoss(),
                input_shape=tuple(x.shape[1:]),
                nb_classes=int(model.num_classes),
                clip_values=(0.0, 1.0),
                device_type="gpu" if x.is_cuda else "cpu",
            )
            attack = SquareAttack(clf, norm=np.inf, eps=eps, max_iter=budget, p_init=p_init, nb_restarts=1,
                                  batch_size=batch_size, verbose=False)  # fmt: skip
            adv = attack.generate(x=x.cpu().numpy(), y=y.cpu().numpy())
            return _misclassified(model, torch.from_numpy(adv), y)

        tools.append(("ART SquareAttack", art))
    seconds: dict[str, list[float]] = {name: [] for name, _ in tools}
    success: dict[str, float] = {}
    for _ in range(rounds):  # interleaved, so that a slow spell of the machine hits every tool alike
        for name, run in tools:
            start = time.perf_counter()
            success[name] = run()
            seconds[name].append(time.perf_counter() - start)
    return [PeerRow(name, len(x), statistics.median(seconds[name]), success[name]) for name, _ in tools]


def _misclassified(model: nn.Module, adv: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, adv) != y.cpu()).float().mean().item()


def compare_hsja(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    iterations: int = 10,
    batch_size: int = 128,
    seed: int = 0,
) -> list[PeerRow]:
    """sinai's HopSkipJump vs ART's ``HopSkipJump`` vs foolbox's ``HopSkipJumpAttack`` (l2, untargeted).

    All three run ``iterations`` iterations of the paper's algorithm with its defaults (B0 = 100,
    at most 10^4 probes, gamma = 1) on the same model and images; success = the final image is
    misclassified, and the median l2 perturbation of the successful ones is reported. sinai runs with an
    eps so small that no query counts as a success, so it too runs every iteration. Peers missing from
    the environment are skipped (``pip install 'sinai[peers]'``).
    """
    rows = []
    start = time.perf_counter()
    oracle = Oracle(
        model,
        x,
        y,
        threat=ThreatModel("l2", 1e-6),
        rules=QueryRules(budget=10**6, votes=0),
        output="labels",
        batch_size=batch_size,
    )
    adv = make_attack("hsja", max_iter=iterations)(oracle, seed=seed)
    rows.append(_min_norm_row("sinai HopSkipJump", model, x, adv, y, time.perf_counter() - start))
    try:
        from art.attacks.evasion import HopSkipJump
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        HopSkipJump = None
    if HopSkipJump is not None:
        clf = PyTorchClassifier(
            model=_Float32(model),  # ART's binary search hands the model float64 arrays
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=int(model.num_classes),
            clip_values=(0.0, 1.0),
            device_type="gpu" if x.is_cuda else "cpu",
        )
        attack = HopSkipJump(clf, batch_size=batch_size, targeted=False, norm=2, max_iter=iterations,
                             max_eval=10_000, init_eval=100, init_size=100, verbose=False)  # fmt: skip
        start = time.perf_counter()
        adv = torch.from_numpy(attack.generate(x=x.cpu().numpy()))
        rows.append(_min_norm_row("ART HopSkipJump", model, x, adv, y, time.perf_counter() - start))
    try:
        import foolbox
    except ImportError:
        foolbox = None
    if foolbox is not None:
        fmodel = foolbox.PyTorchModel(model.eval(), bounds=(0.0, 1.0), device=x.device)
        attack = foolbox.attacks.HopSkipJumpAttack(
            steps=iterations, initial_gradient_eval_steps=100, max_gradient_eval_steps=10_000, gamma=1.0
        )
        init = foolbox.attacks.LinearSearchBlendedUniformNoiseAttack()
        start = time.perf_counter()
        advs = []
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            # foolbox's HSJA refuses a batch where its noise start fails: start them here, attack the rest
            starts = init.run(fmodel, xb, yb)
            ok = predict(model, starts).to(x.device) != yb
            adv = xb.clone()
            if ok.any():
                adv[ok] = attack.run(fmodel, xb[ok], yb[ok], starting_points=starts[ok])
            advs.append(adv)
        adv = torch.cat(advs)
        rows.append(_min_norm_row("foolbox HopSkipJumpAttack", model, x, adv, y, time.perf_counter() - start))
    return rows


class _Float32(nn.Module):
    """Casts inputs to float32 before ``model`` (for peers that compute in float64)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float())


def _min_norm_row(
    tool: str, model: nn.Module, x: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, seconds: float
) -> PeerRow:
    adv = adv.to(x.device).float()
    wrong = predict(model, adv) != y.cpu()
    norms = (adv - x).flatten(1).norm(dim=1).cpu()[wrong]
    median = float(norms.median()) if len(norms) else None
    return PeerRow(tool, len(x), seconds, wrong.float().mean().item(), median)
