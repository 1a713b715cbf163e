"""AAA, Adversarial Attack on Attackers: a deterministic per-query post-processing of the logits.

Chen, Huang, Tao, Wu, Xie, Huang, "Adversarial Attack on Attackers: Post-Process to Mitigate Black-Box
Score-Based Query Attacks", NeurIPS 2022 (arXiv:2205.12134). The facts below come from the authors' public
code, https://github.com/Sizhe-Chen/AAA (``victim.py``, classes ``AAALinear`` and ``AAASine``, read at
commit 91e350b). That repository has no license file, so it is all rights reserved: it was read for
facts only and none of its code is copied here.

Per query, with z0 the logits of the undefended model, c = argmax z0 and the margin m0 = z0[c] - max of the
other logits:

- attractors sit at the centres of intervals of width ``tau`` on the margin: a = (floor(m0/tau) + 1/2) tau.
  The authors write ``(round(m0/tau + 0.5) - 0.5) * tau``; that is the same value except at exact
  multiples of tau, where ``torch.round``'s half-to-even makes it alternate between the two neighbouring
  intervals;
- the target margin is t = a - alpha (m0 - a) (linear; alpha = ``reverse_step`` = 1) or
  t = m0 - 0.7 tau sin((1 - 2 (m0 - a)/tau) pi) (sine), both as in the code. With alpha <= 1 the linear
  target stays in the interval of m0 (for alpha = 1 it is its mirror image, t = 2a - m0); every target is
  > 0 when m0 > 0 (sine: t ~ (1 + 1.4 pi) m0 near 0), so a target never asks for another class;
- starting from z0, Adam (lr 0.1, betas 0.9 / 0.999, 100 steps) minimises
  |m(z) - t| + beta |softmax(z)[c] - max softmax(z0 / T)| (beta = 5, T = 1): the margin goes to the target,
  which reverses the trend of the margin inside each interval (a score attack that lowers the true margin
  sees it rise), while the confidence of the top-1 class is kept (calibration).

Where this module departs from the code, and why:

- No 8-bit input rounding. The authors' ``forward`` floors the input to 8 bits, but so does their
  undefended ``predict``: it is the pixel format of their evaluation pipeline (images stored as bytes),
  not part of AAA. Rounding only in the defended model would change its predictions on the attacks'
  off-grid candidates (breaking "AAA keeps the base model's predictions") and add a second,
  non-differentiable input step that masks gradients on its own. AAA here acts on the logits of the
  image it is given.
- The loss is summed over the batch, not averaged, so every image's answer is independent of the batch
  it is queried in (the same candidate always gets the same logits). Adam normalises each coordinate, so
  the two differ only through its eps (1e-8): with the authors' mean over a batch (128 in their
  ``square.py``, 1000 by default in ``victim.py``), logits whose gradient is tiny (classes of probability
  ~1e-8) move less. Measured on the 1000 MNIST images below: mean |z - z0| 2.53 with the sum, 2.43 with a
  mean over 100, 2.20 over 1000, while the margins and confidences reached are the same (|m(z) - t|
  median 0.025 / 0.025 / 0.027, 99th percentile 3.20 / 3.20 / 3.05; same |p - p0|).
- The margin in the loss is measured against the original top-1 class c (z[c] - max of the others), not
  as top-1 minus top-2 of the current logits; the two agree while c stays on top, and this form keeps
  pushing c above the others if a step ever crosses. The code does not enforce the argmax (it only
  measures it); here it is enforced: a row whose optimised logits do not have c strictly on top keeps its
  original logits z0 (counted in :attr:`AAAHook.fallbacks`; 0 of 1000 MNIST test images, see below).
- The gradient of the loss is written out (subgradients as autograd takes them: sign(0) = 0, the
  gradient of the max going to one maximiser) and Adam is the same update as ``torch.optim.Adam``, so
  the optimisation needs no autograd: it runs the same under ``torch.no_grad()`` and
  ``torch.inference_mode()``, never touches the model's parameters, and costs ~10 small tensor operations
  per step for the whole batch (tests compare it with autograd + ``torch.optim.Adam``).

Gradients (white-box attacks): the defended output is the optimised logits with a zero gradient with
respect to the input (gradient masking, as the real defense, whose logits come out of a detached
optimisation); with the owner's ``bpda`` flag (``DefendedModel.straight_through()``) the backward is the
identity (BPDA: the gradient of the undefended logits). ``DefendedModel.clean()`` bypasses AAA.

On the embedded MNIST CNN, tau = 6 fits its top-1 / top-2 margins (median 7.45, 99% below 12: two
intervals), AAA keeps all 1000 test predictions, and the answered margin is within 0.025 of its target
for the median image; near the decision boundary the calibration term wins and the linear map is not
exactly invertible. Measurements and commands: ``docs/aaa.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .hooks import SiteHook
from .sites import Site
from .spec import AAASpec

if TYPE_CHECKING:
    from .protect import DefendedModel

#: Adam's constants (``torch.optim.Adam`` defaults; the authors use them).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def attractors(margin: torch.Tensor, tau: float) -> torch.Tensor:
    """Centre of the interval of width ``tau`` that holds each margin: (floor(m / tau) + 1/2) tau."""
    return (torch.floor(margin / tau) + 0.5) * tau


def margin_targets(margin: torch.Tensor, spec: AAASpec) -> torch.Tensor:
    """The margin AAA answers for each original margin ``m0`` (linear or sine map, see the module)."""
    a = attractors(margin, spec.tau)
    if spec.variant == "linear":
        return a - spec.alpha * (margin - a)
    return margin - 0.7 * spec.tau * torch.sin((1 - 2 * (margin - a) / spec.tau) * math.pi)


def invert_linear_margin(margin: torch.Tensor, tau: float, alpha: float = 1.0) -> torch.Tensor:
    """The original margin m0 behind a linear-variant answer ``margin`` (t): for alpha <= 1 the target
    stays in the interval of m0, so a = (floor(t / tau) + 1/2) tau and m0 = a - (t - a) / alpha
    (for alpha = 1, m0 = 2a - t), clamped to that interval (an answer off its target by more than the
    map allows, alpha < 1, would otherwise land outside it)."""
    a = attractors(margin, tau)
    return (a - (margin - a) / alpha).clamp(a - tau / 2, a + tau / 2)


def undo_linear(logits: torch.Tensor, tau: float, alpha: float = 1.0) -> torch.Tensor:
    """``logits`` (N, K) with the top-1 logit moved so that the top-1 / top-2 margin is the inverted one
    (:func:`invert_linear_margin`): an attacker's estimate of the undefended margin. NaN rows stay NaN."""
    top = logits.topk(2, dim=1)
    margin = top.values[:, 0] - top.values[:, 1]
    first = top.values[:, 1] + invert_linear_margin(margin, tau, alpha)
    return logits.scatter(1, top.indices[:, :1], first[:, None])


def check_logits(z: torch.Tensor, num_classes: int | None = None) -> None:
    """Raise a one-line ``ValueError`` unless ``z`` looks like logits: (N, classes), classes >= 2 (and
    ``num_classes`` when known), and not rows of probabilities (non-negative, summing to 1)."""
    if z.dim() != 2 or z.shape[1] < 2 or (num_classes and z.shape[1] != num_classes):
        want = f"(N, {num_classes})" if num_classes else "(N, classes) with classes >= 2"
        raise ValueError(
            f"AAA post-processes a classifier's logits, of shape {want}, but the model's output has shape "
            f"{tuple(z.shape)}; protect the classifier whose forward returns the logits"
        )
    if len(z) and bool((z >= 0).all()) and float((z.sum(1) - 1).abs().max()) <= 1e-4:
        raise ValueError(
            "AAA needs logits, but the model's outputs are probabilities (every row is non-negative and sums "
            "to 1, as after a final Softmax); give it the logits before the softmax (log-probabilities work)"
        )


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Intra-op parallelism off on CPU: every tensor of the loop is (N, classes), far too small to gain
    from threads, and on shared cores some of its operations (exp, pow, softmax, sqrt) wait for a
    second thread that is not scheduled (on busy shared cores, many times slower than one thread)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def aaa_logits(z0: torch.Tensor, spec: AAASpec) -> tuple[torch.Tensor, torch.Tensor]:
    """AAA's answer to logits ``z0`` (N, K), batched: ``(logits, kept)``.

    ``logits`` has the dtype and device of ``z0`` and no autograd history; ``kept`` (N,) is False for the
    rows that returned ``z0`` because the optimised logits lost the original argmax (see the module).
    Computed in float32 (float64 for float64 input); deterministic.
    """
    with _one_thread(z0.device):
        return _optimise(z0, spec)


def _optimise(z0: torch.Tensor, spec: AAASpec) -> tuple[torch.Tensor, torch.Tensor]:
    work = torch.float64 if z0.dtype == torch.float64 else torch.float32
    z0w = z0.detach().to(work)
    n, k = z0w.shape
    c = z0w.argmax(1, keepdim=True)
    is_c = torch.zeros((n, k), dtype=torch.bool, device=z0.device).scatter_(1, c, True)
    m0 = z0w.gather(1, c).squeeze(1) - z0w.masked_fill(is_c, -math.inf).amax(1)
    target = margin_targets(m0, spec)[:, None]
    p0 = F.softmax(z0w / spec.temperature, dim=1).amax(1, keepdim=True)

    z = z0w.clone()
    avg, avg_sq = torch.zeros_like(z), torch.zeros_like(z)
    (b1, b2), lr, beta = ADAM_BETAS, spec.lr, spec.beta
    for step in range(1, spec.steps + 1):
        p = F.softmax(z, dim=1)
        pc = p.gather(1, c)
        j = z.masked_fill(is_c, -math.inf).argmax(1, keepdim=True)
        s_margin = torch.sign(z.gather(1, c) - z.gather(1, j) - target)  # d|m - t| / dm
        s_calib = beta * torch.sign(pc - p0) * pc  # beta d|p_c - p0| / dp_c, times p_c
        # d p_c / dz = p_c (e_c - p) gives the calibration gradient; the margin adds +-1 on c and j.
        grad = (-s_calib) * p
        grad.scatter_add_(1, c, s_calib + s_margin).scatter_add_(1, j, -s_margin)
        avg.lerp_(grad, 1 - b1)
        avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (avg_sq.sqrt() / math.sqrt(1 - b2**step)).add_(ADAM_EPS)
        z.addcdiv_(avg, denom, value=-lr / (1 - b1**step))

    final = z.gather(1, c).squeeze(1) - z.masked_fill(is_c, -math.inf).amax(1)
    kept = final > 0  # c strictly on top (NaN rows fail too)
    out = torch.where(kept[:, None], z, z0w).to(z0.dtype)
    return out, kept


class _Substitute(torch.autograd.Function):
    """Forward: AAA's logits. Backward: zero (``straight=False``) or the identity (BPDA)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, out: torch.Tensor, straight: bool) -> torch.Tensor:  # noqa: ANN001
        ctx.straight = straight
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        return (grad if ctx.straight else torch.zeros_like(grad)), None, None


class AAAHook(SiteHook):
    """The hook at the ``output`` site: replaces the model's logits by AAA's while ``owner`` is active.

    ``owner``: the :class:`~sinai.defenses.protect.DefendedModel` (its ``active``, ``bpda``,
    ``recording`` and ``num_classes``). ``answered`` / ``fallbacks``: rows answered, and rows that kept
    their original logits because the optimisation lost the argmax.
    """

    def __init__(self, owner: DefendedModel, site: Site, spec: AAASpec) -> None:
        super().__init__(site)
        self.owner = owner
        self.spec = spec
        self.calls = 0
        self.answered = 0
        self.fallbacks = 0

    def enabled(self) -> bool:
        return self.owner.active

    def tensor(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if getattr(self.owner, "recording", None) is not None:  # calibrating noise thresholds
            return z
        check_logits(z, getattr(self.owner, "num_classes", None))
        out, kept = aaa_logits(z, self.spec)
        self.answered += len(kept)
        self.fallbacks += int((~kept).sum())
        if not (torch.is_grad_enabled() and z.requires_grad):
            return out
        return _Substitute.apply(z, out, bool(getattr(self.owner, "bpda", False)))


__all__ = [
    "AAAHook",
    "aaa_logits",
    "attractors",
    "check_logits",
    "invert_linear_margin",
    "margin_targets",
    "undo_linear",
]
