"""Square against AAA by an attacker who knows it: undo the linear variant's margin map on every answer.

AAA (Chen et al. 2022; :mod:`sinai.defenses.aaa`) answers a query whose true top-1 / top-2 margin is m0
with logits of margin t = a - alpha (m0 - a), a = (floor(m0 / tau) + 1/2) tau the centre of m0's interval
of width tau. For alpha <= 1, t stays in the same interval, so the map is invertible from the answer alone:
a = (floor(t / tau) + 1/2) tau and m0 = a - (t - a) / alpha (alpha = 1: m0 = 2a - t). This attack is
Square (:class:`sinai.attacks.square.Square`, unchanged) run through a view of the Oracle that rewrites
every logits answer so that its margin is the inverted one (the top-1 logit moves; the argmax, which AAA
keeps, is unchanged), so Square's margin loss sees the undefended margin again, up to how closely AAA's
optimisation reached its target. Every query still goes through the Oracle: it counts, checks the threat
model and decides success as for any attack; only what the attack reads is changed.

Measured on the embedded MNIST CNN (:mod:`sinai.defenses.aaa` has the details): the inverted margin is
within 0.19 of the true one on 90% of images, but with the authors' beta = 5 AAA does not reach its
targets below a true margin of ~1.2 (its calibration term wins), where the inverted margin rises again:
the attack walks every image down to a margin of ~0.4-1.1 and stalls there. Square, linf 0.1, 1000
queries, 50 images: 96% success on the base model, 18% on AAA, 22% for this attack on AAA; with
``AAA:beta=1`` (targets reached) Square gets 14% and this attack 78%.

The authors' own adaptive attacks (``square.py`` in https://github.com/Sizhe-Chen/AAA: "up" and "bi"
Square, which also accept a rising margin) do not use the map; this one assumes the defender's tau and
alpha are known (Kerckhoffs), and against the sine variant it is merely Square with a wrong correction.
"""

from __future__ import annotations

import torch

from ..defenses.aaa import undo_linear
from ..defenses.spec import AAASpec
from .base import register_attack
from .oracle import Oracle
from .square import Square


class InvertedAnswers:
    """An Oracle seen through AAA's inverted linear margin map: ``__call__`` forwards the query to
    ``oracle`` (counted there as usual) and returns :func:`~sinai.defenses.aaa.undo_linear` of its logits;
    every other attribute (``threat``, ``budget``, ``eot``, ``live``...) is the oracle's."""

    def __init__(self, oracle: Oracle, tau: float, alpha: float) -> None:
        self.oracle, self.tau, self.alpha = oracle, tau, alpha

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = self.oracle(x, idx)
        if logits.dim() != 2:  # labels: nothing to invert
            return logits
        return undo_linear(logits, self.tau, self.alpha)

    def __getattr__(self, name: str) -> object:
        return getattr(self.oracle, name)


@register_attack("square-aaa")
class SquareAAA(Square):
    """Square that inverts AAA's linear margin map (interval ``tau``, slope ``alpha`` in (0, 1]) on every
    logits answer before its margin loss; ``p_init`` and ``max_redraws`` as :class:`Square`."""

    def __init__(
        self, *, tau: float = 6.0, alpha: float = 1.0, p_init: float | None = None, max_redraws: int = 32
    ) -> None:
        super().__init__(p_init=p_init, max_redraws=max_redraws)
        spec = AAASpec(tau=tau, alpha=alpha)  # the same checks (and messages) as the defense's
        self.tau, self.alpha = spec.tau, spec.alpha

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        return super().run(InvertedAnswers(oracle, self.tau, self.alpha), x, y, seed=seed)  # type: ignore[arg-type]
