"""``sinai.attack(name, model, x, y, eps=..., budget=...)``: one attack in one call, torchattacks-style.

The call goes through the same door as ``sinai eval``: the model is wrapped by ``protect`` (with
``defense``, or none), every query passes through the :class:`~sinai.attacks.oracle.Oracle`, which
counts it against ``budget`` and confirms a success on a randomized model by the vote (RFD App. D.4).
Images the model already misclassifies (by the vote) count as broken at query 0 and are not attacked,
as in the papers' protocol (RFD section 4.1). The noise and the attack are seeded exactly as shard 0 of
:func:`sinai.evaluate`, so with ``shard_size >= len(x)`` both give the same per-image results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .threat import ThreatModel

if TYPE_CHECKING:
    from ..evaluation.config import EvalConfig


@dataclass(frozen=True)
class AttackResult:
    """What :func:`attack` found, per image (tensors on the device of the images given).

    ``adversarials``: the final images; the rows of ``success`` hold a verified adversarial example
    inside the eps-ball (or the clean image, when the model already got it wrong). ``queries``: counted
    queries each image used. ``success``: the image ends misclassified (verified by the vote).
    ``success_at``: the counted query of the verified success (0: misclassified before any query, -1:
    never). ``clean_correct``: the (defended) model classified the clean image correctly.
    Unpacks as ``adversarials, queries, success = sinai.attack(...)``.
    """

    adversarials: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor
    success_at: torch.Tensor
    clean_correct: torch.Tensor
    attack: str
    threat: ThreatModel
    budget: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.adversarials, self.queries, self.success))

    @property
    def robust_accuracy(self) -> float:
        """Share of the images with no verified adversarial example within the budget (RFD section 4.1)."""
        return 1.0 - float(self.success.float().mean()) if len(self.success) else 0.0

    @property
    def success_rate(self) -> float:
        """Share of the correctly classified images that the attack broke (SND's attack success rate)."""
        attacked = self.clean_correct
        return float(self.success[attacked].float().mean()) if bool(attacked.any()) else 0.0


class _WithClasses(nn.Module):
    """A plain classifier with the ``num_classes`` (and ``input_shape``) the Oracle needs."""

    def __init__(self, model: nn.Module, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.num_classes, self.input_shape = model, num_classes, input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _classifier(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` itself when it says how many classes it has, else wrapped with the count its output shows."""
    if getattr(model, "num_classes", None):
        return model
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(x[:1].to(device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(
            "model must return logits of shape (B, classes) for images (B, C, H, W); got "
            f"{type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}"
        )
    return _WithClasses(model, int(out.shape[1]), tuple(x.shape[1:]))


def attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    budget: int = 1000,
    defense: object = None,
    norm: str = "linf",
    seed: int = 0,
    eot: int = 1,
    votes: int = 9,
    vote_rule: str = "sequential",
    lucky: bool = False,
    batch_size: int = 128,
    **attack_args: object,
) -> AttackResult:
    """Attack the images ``x`` (N, C, H, W) in [0, 1] with labels ``y`` through an Oracle.

    ``name``: a registered attack (``sinai.attacks.ATTACKS``; score-based, decision-based, white-box or
    transfer); ``attack_args``: its hyper-parameters (e.g. ``p_init=0.1`` for Square). ``eps``: radius
    of the ``norm`` ball in [0, 1] pixel units. ``budget``: counted queries per image (``eot`` samples
    per query, each counted). ``defense``: ``None`` (the model as given, e.g. an already protected
    :class:`~sinai.DefendedModel` with its own noise generator), a :class:`~sinai.Defense` or its text
    form (``"RND:std=0.05"``), applied with noise seeded from ``seed`` and removed afterwards.
    ``votes``, ``vote_rule``, ``lucky``: how a success on a randomized model is confirmed (see
    :class:`~sinai.attacks.QueryRules`). ``batch_size``: forward chunk size. The model runs in eval mode
    during the attack and is returned to its mode afterwards.
    """
    from ..checks import check_count
    from ..defenses import DefendedModel, Defense, parse_defense
    from ..evaluation.config import EvalConfig
    from ..evaluation.protocol import _shard_seed
    from ..models.classifier import check_images

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module taking [0, 1] images, got {type(model).__name__}")
    if not isinstance(name, str) or name.lower() == "none":
        raise ValueError(f"name must be an attack name such as 'square', got {name!r}")
    check_images(x, getattr(model, "input_shape", None))
    y = torch.as_tensor(y)
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(
            f"y must hold one integer label per image ({len(x)}), got {y.dtype} of shape {tuple(y.shape)}"
        )
    check_count("budget", budget, 1, "counted queries per image")
    if isinstance(defense, str):
        defense = parse_defense(defense)
    if defense is not None and not isinstance(defense, Defense):
        raise TypeError(f"defense must be None, a Defense or its text form, got {defense!r}")
    if defense is not None and isinstance(model, DefendedModel):
        raise ValueError(
            "model is already protected (a DefendedModel): pass defense=None, or the unprotected model"
        )
    defense = defense if defense is not None else Defense(name="none")
    config = EvalConfig(
        attack=name, attack_args=attack_args, defense=defense,
        threat=ThreatModel(norm, eps), budgets=(budget,), seed=seed, eot=eot, votes=votes, lucky=lucky,
        vote_rule=vote_rule, confirm=0,
    )  # fmt: skip
    # As torchattacks: eval mode during the attack; afterwards every submodule gets its own mode back.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    owned = None  # the DefendedModel made here, removed after the attack
    try:
        if isinstance(model, DefendedModel):
            defended = model
        else:
            defended = owned = DefendedModel(_classifier(model, x), config.defense, seed=seed)
        return _run(
            defended, x, y, config, _shard_seed(seed, 0), reseed=owned is not None, batch_size=batch_size
        )
    finally:
        if owned is not None:
            owned.remove()
        for module, training in modes:
            module.train(training)


def _run(
    defended: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    seed: int,
    *,
    reseed: bool,
    batch_size: int,
) -> AttackResult:
    """Shard 0 of ``evaluate`` on every image, keeping the final images (see the module docstring)."""
    from .oracle import Oracle

    home = x.device
    device = next(defended.parameters()).device
    xs, ys = x.to(device), y.to(device).long()
    if reseed:
        defended.reseed(seed)
    randomized = defended.defense.randomized or bool(getattr(defended.model, "randomized", False))
    rules = config.rules if randomized or not config.votes else replace(config.rules, votes=0)
    oracle = Oracle(
        defended, xs, ys, threat=config.threat, rules=rules, output=config.attacker.output,
        batch_size=batch_size,
    )  # fmt: skip
    clean_ok = oracle.predict(xs, passes=max(rules.votes, 1)) == ys
    oracle.mark_broken(~clean_ok)
    x_adv = config.attacker(oracle, seed=seed)
    x_adv = torch.where(clean_ok.view(-1, 1, 1, 1), x_adv, xs)  # misclassified images: the clean image
    success_at = torch.where(oracle.success, oracle.success_at, torch.full_like(oracle.success_at, -1))
    return AttackResult(
        adversarials=x_adv.to(home),
        queries=oracle.queries.to(home),
        success=oracle.success.to(home),
        success_at=torch.where(clean_ok, success_at, torch.zeros_like(success_at)).to(home),
        clean_correct=clean_ok.to(home),
        attack=config.attack,
        threat=config.threat,
        budget=config.budget,
    )
