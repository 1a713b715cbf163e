"""MFDV-SNN (seed 004): a stochastic penultimate layer whose per-feature noise scale is trained.

The classifier head sees ``z = h + sigma * eps`` with ``eps ~ N(0, I)`` instead of the penultimate
features ``h`` (seed 004, Sec. 3), and the network and ``sigma`` are trained together on

    CE(head(h + sigma * eps), y) - lambda1 * sum_i ln sigma_i + lambda2 * ||w||^2.

Readings of what the paper leaves open (docs/trained-defenses.md):

- ``sigma = exp(s)`` with ``s`` the trainable vector, ``sigma`` initialised from U(0, 1) as the paper
  (``s = ln u``; ``u`` clamped at 1e-3 so that no dimension starts at ``ln 0``), drawn from the global RNG
  like every other initial weight (the training seeds it).
- ``-lambda1 * sum_i ln sigma_i`` is a **sum** over the D features (the paper's Sigma), added to the mean
  cross-entropy of the batch: on the MNIST CNN (D = 128), lambda1 from 1e-4 to 1e-1 spans noise that
  changes nothing to noise that costs several points of accuracy. ``lambda1 = 0`` is the paper's
  ablation (sigma then only shrinks).
- ``lambda2 ||w||^2`` is the recipe's AdamW weight decay on every weight: without it ``||h||`` can grow
  until ``sigma`` does nothing, so :meth:`MfdvTraining.loss` logs the mean ``sigma_i / std(h_i)``.
- ``h`` is the input of the classifier head (:func:`sinai.defenses.sites.classifier_head`): after the
  last ReLU (CNN) or the final norm (ViT).

``s`` lives on the head module as the parameter ``mfdv_log_sigma``
(:data:`sinai.defenses.sites.LEARNED_STD`), so it is saved in and loaded from the state dict. The
training noise is added only inside :meth:`MfdvTraining.loss` (a pre-hook registered for that forward
and removed after it): the plain model, in train or eval mode, is the sigma = 0 network. At inference
the noise comes from ``protect(model, "MFDV")`` (the ``feature`` site with the learned vector std,
drawn from the defended model's generator), and ``"MFDV:mc=15"`` predicts with the mean of 15 passes
as the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sinai.defenses.sites import LEARNED_STD, classifier_head

__all__ = ["MFDV_INITS", "MFDV_OPTIONS", "MfdvTraining", "head_features", "learned_log_sigma"]

#: How sigma is initialised: ``"uniform"``, sigma ~ U(0, 1) per feature (seed 004).
MFDV_INITS = ("uniform",)
#: The options a ``mnist-cnn-mfdv:<options>`` model name may carry.
MFDV_OPTIONS = ("lambda1", "init", "sigma_lr")
#: Smallest initial sigma (a U(0, 1) draw below it is raised to it, so that ln sigma is finite).
MIN_INIT_SIGMA = 1e-3
#: Passes of the mean-softmax prediction the paper uses (seed 004, Sec. 4).
PAPER_MC = 15


def _tidy(value: float) -> float:
    """A float rounded to 12 significant digits (so that equal recipes hash alike)."""
    return float(f"{value:.12g}")


def learned_log_sigma(model: nn.Module) -> nn.Parameter | None:
    """The model's trainable ``ln sigma`` (on its classifier head), or ``None`` when it has none."""
    return getattr(classifier_head(model)[1], LEARNED_STD, None)


def head_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """The classifier head's input ``h`` (flattened to (N, D)) for images ``x``: clean forwards, no grad."""
    _, head = classifier_head(model)
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = head.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
    finally:
        handle.remove()
    return torch.cat(seen)


def _sigma_over_std(sigma: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """(mean over features of sigma_i / std(h_i), mean std(h_i)); features that never vary (dead ReLUs,
    std <= 1e-6) are left out of the ratio."""
    std = h.float().std(dim=0) if len(h) > 1 else torch.zeros_like(sigma)
    live = std > 1e-6
    ratio = (sigma[live] / std[live]).mean().item() if bool(live.any()) else math.inf
    return ratio, std.mean().item()


@dataclass(frozen=True)
class MfdvTraining:
    """MFDV-SNN training (seed 004): a trained per-feature noise std at the classifier head's input.

    ``lambda1``: weight of ``-sum_i ln sigma_i`` (>= 0; 0 is the paper's ablation), a sum over the
    features added to the batch's mean cross-entropy. ``init``: how sigma starts (:data:`MFDV_INITS`).
    The paper's ``lambda2 ||w||^2`` is the recipe's weight decay, on the weights, not on ln sigma.
    ``sigma_lr``: the learning rate of ln sigma as a multiple of the recipe's (:meth:`param_groups`):
    Adam moves ln sigma by at most about the learning rate per step, so at the recipe's rate sigma
    cannot travel far enough in a short recipe for lambda1 to matter (the paper gives no optimiser).
    A :class:`TrainingMethod` of :mod:`sinai.models.embedded`.
    """

    lambda1: float = 0.01
    init: str = "uniform"
    sigma_lr: float = 10.0

    def __post_init__(self) -> None:
        value = self.lambda1
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"MFDV lambda1 must be a finite number >= 0 (the weight of -sum ln sigma; 0 = no push "
                f"towards noise), got {value!r}"
            )
        if self.init not in MFDV_INITS:
            raise ValueError(f"MFDV init must be one of {', '.join(MFDV_INITS)}, got {self.init!r}")
        object.__setattr__(self, "lambda1", _tidy(float(value)))
        scale = self.sigma_lr
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ValueError(
                f"MFDV sigma_lr must be a finite number > 0 (ln sigma's learning rate as a multiple of the "
                f"recipe's), got {scale!r}"
            )
        object.__setattr__(self, "sigma_lr", _tidy(float(scale)))

    # ---------------------------------------------------------------------------------- recipe text
    def key(self) -> dict:
        """What determines the training (enters the cache hash)."""
        return {"method": "mfdv", "lambda1": self.lambda1, "init": self.init, "sigma_lr": self.sigma_lr}

    def options(self, default: MfdvTraining) -> str:
        """The ``lambda1=..,init=..`` text that turns ``default`` into this recipe ('' if equal)."""
        parts = []
        if self.lambda1 != default.lambda1:
            parts.append(f"lambda1={self.lambda1:g}")
        if self.init != default.init:
            parts.append(f"init={self.init}")
        if self.sigma_lr != default.sigma_lr:
            parts.append(f"sigma_lr={self.sigma_lr:g}")
        return ",".join(parts)

    @classmethod
    def parse_options(cls, text: str) -> dict[str, Any]:
        """``"lambda1=0.1"`` -> ``{"lambda1": 0.1}``: the options of a ``mnist-cnn-mfdv:<options>`` name."""
        found: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key not in MFDV_OPTIONS:
                raise ValueError(
                    f"expected {', '.join(o + '=...' for o in MFDV_OPTIONS)} after ':' in an MFDV model "
                    f"name, got {item!r}"
                )
            if key in found:
                raise ValueError(f"option {key!r} given twice in {text!r}")
            if key == "init":
                found[key] = value
                continue
            try:
                found[key] = float(value)
            except ValueError:
                raise ValueError(f"MFDV {key} must be a number, got {value!r}") from None
        if not found:
            raise ValueError(f"no options after ':' (expected e.g. lambda1=0.01), got {text!r}")
        return found

    def describe(self) -> str:
        """``MFDV-SNN, lambda1 0.01, sigma0 ~ U(0,1), sigma lr x10``."""
        return f"MFDV-SNN, lambda1 {self.lambda1:g}, sigma0 ~ U(0,1), sigma lr x{self.sigma_lr:g}"

    # ------------------------------------------------------------------------------------ training
    def attach(self, model: nn.Module) -> None:
        """Add the trainable ``ln sigma`` (one per input feature of the classifier head) to the head as
        the parameter ``mfdv_log_sigma``, initialised as :attr:`init` says (global RNG). A model that
        already has it keeps it."""
        name, head = classifier_head(model)
        if getattr(head, LEARNED_STD, None) is not None:
            return
        weight = getattr(head, "weight", None)
        if not isinstance(head, nn.Linear) or weight is None:
            raise ValueError(
                f"MFDV-SNN needs a linear classifier head (its input is the noised feature vector), "
                f"but {name!r} is a {type(head).__name__}"
            )
        u = torch.rand(head.in_features).clamp_min(MIN_INIT_SIGMA)
        head.register_parameter(LEARNED_STD, nn.Parameter(u.log().to(weight.device, weight.dtype)))

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float) -> list[dict]:
        """The optimiser's parameter groups: every weight at ``lr`` with ``weight_decay`` (the paper's
        lambda2), and ln sigma at ``sigma_lr * lr`` without weight decay (sigma is not a weight)."""
        log_sigma = self._log_sigma(model)
        weights = [p for p in model.parameters() if p is not log_sigma]
        return [
            {"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": [log_sigma], "lr": lr * self.sigma_lr, "weight_decay": 0.0},
        ]

    def prepare(self, model: nn.Module, data: Any, *, device: Any = None, progress: bool = False) -> dict:
        """Nothing to do before the main loop; returns the initial sigma's mean."""
        log_sigma = self._log_sigma(model)
        return {"sigma_init_mean": round(log_sigma.detach().exp().mean().item(), 6)}

    def loss(
        self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``CE(noisy forward) - lambda1 * sum ln sigma`` for one batch, with ``z = h + sigma * eps`` at the
        head's input (``eps`` from the global RNG, which the training seeds).

        Logs ``ce``, ``sigma`` (mean sigma) and ``sigma_over_std`` (mean over features of
        ``sigma_i / std(h_i)`` over the batch: it falls if ``||h||`` grows to cancel the noise).
        """
        log_sigma = self._log_sigma(model)
        _, head = classifier_head(model)
        seen: dict[str, torch.Tensor] = {}

        def noisy(module: nn.Module, args: tuple) -> tuple:
            h = args[0]
            seen["h"] = h.detach()
            return (h + log_sigma.exp() * torch.randn_like(h), *args[1:])

        handle = head.register_forward_pre_hook(noisy)
        try:
            logits = model(xb)
        finally:
            handle.remove()
        ce = F.cross_entropy(logits, yb)
        total = ce - self.lambda1 * log_sigma.sum() if self.lambda1 else ce
        with torch.no_grad():
            sigma = log_sigma.exp()
            ratio, _ = _sigma_over_std(sigma, seen["h"].reshape(-1, seen["h"].shape[-1]))
        return total, {"ce": ce.item(), "sigma": sigma.mean().item(), "sigma_over_std": ratio}

    def finish(self, model: nn.Module, data: Any, *, batch_size: int = 500, seed: int = 0) -> dict:
        """Metrics of the trained model (eval mode) on ``data.x_test``: sigma's mean / min / max, the mean
        ``sigma_i / std(h_i)`` and mean ``std(h_i)`` on the test images, ``logit_noise_over_std`` (per
        class, the std the noise gives the logit, ``sqrt(sum_i W_ki^2 sigma_i^2)``, over that logit's
        std on the clean test images, mean over classes: what is left of the noise once the head has
        weighted the features; large sigma on features the head ignores does not count), and the test
        accuracy of the sigma = 0 network, with one noisy pass (``protect(model, "MFDV")``) and with
        the mean of 15 (``"MFDV:mc=15"``), the noise seeded with ``seed``."""
        from sinai.defenses.protect import protect

        x, y = data.x_test, data.y_test
        sigma = self._log_sigma(model).detach().exp().float()
        h = head_features(model, x, batch_size=batch_size)
        ratio, h_std = _sigma_over_std(sigma, h)
        _, head = classifier_head(model)
        with torch.no_grad():
            weight = head.weight.detach().float()
            logit_noise = (weight.square() @ sigma.square()).sqrt()
            logit_std = head(h.to(head.weight.dtype)).float().std(dim=0).clamp_min(1e-12)
        metrics = {
            "mfdv": self.key(),
            "sigma_mean": sigma.mean().item(),
            "sigma_min": sigma.min().item(),
            "sigma_max": sigma.max().item(),
            "sigma_over_std": ratio,
            "h_std_mean": h_std,
            "logit_noise_over_std": (logit_noise / logit_std).mean().item(),
            "clean_accuracy_sigma0": _accuracy(model, x, y, batch_size),
        }
        for key, text in (
            ("noisy_accuracy", "MFDV"),
            (f"noisy_accuracy_mc{PAPER_MC}", f"MFDV:mc={PAPER_MC}"),
        ):
            defended = protect(model, text, seed=seed)
            try:
                metrics[key] = _accuracy(defended, x, y, batch_size)
            finally:
                defended.remove()
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}

    def _log_sigma(self, model: nn.Module) -> nn.Parameter:
        log_sigma = learned_log_sigma(model)
        if log_sigma is None:
            raise ValueError("this model has no learned sigma: call MfdvTraining.attach(model) first")
        return log_sigma


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(y), batch_size)
    )
    return correct / max(len(y), 1)
