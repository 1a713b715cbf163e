"""The Oracle: the only door to a model during an attack.

Attacks hand it a batch of candidate images and, for each, the index of the image it belongs to. It
returns logits (score mode) or labels (decision mode), counts queries per image exactly, masks the
candidates of images that are finished (verified success or budget spent), and decides success the way
the papers do on a randomized model: when a counted query sees a wrong label, 9 more noisy passes
of that candidate, not counted in the budget, must mostly agree (RFD Appendix D.4). ``lucky=True``
decides by the single query instead (RFD Table 15).

Every query is judged against the threat model (``threat``, a :class:`~sinai.attacks.threat.ThreatModel`
around the clean images ``x``): a wrong label counts as a success only for a candidate inside the
eps-ball (decision-based attacks query points outside it: they start far away and shrink). The oracle
also records, per image, the smallest perturbation norm of a candidate its query labelled adversarial
by each budget checkpoint (SND Table 3) and, opt-in, how many queries were labelled differently from
the noise-free model on the same input (``P_mis``, SND Table 5; one uncounted noise-free forward per
query).

Under EOT with M samples (``eot=M``) score mode returns the mean logits and label mode the majority
label of the M samples: the T-query adaptive attack of SND section 3.4 (Tables 4 and 6).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_count
from ..models.classifier import check_images, parameter_dtype
from .threat import ThreatModel

OUTPUTS = ("scores", "labels")
VOTE_RULES = ("sequential", "fixed")


@functools.lru_cache(maxsize=4096)  # called per vote; the levels repeat (one per vote number k)
def vote_threshold(passes: int, alpha: float, rate: float = 0.5) -> int:
    """The fewest wrong labels among ``passes`` fresh passes that reject "misclassification rate <= ``rate``"
    at level ``alpha``: the smallest c with P(Binomial(passes, rate) >= c) <= alpha (``passes + 1`` when
    even all passes wrong would not be enough)."""
    from scipy.stats import binom

    return int(binom.isf(alpha, passes, rate)) + 1


def spent_alpha(alpha: float, k: torch.Tensor) -> torch.Tensor:
    """The level of an image's k-th vote (k = 1, 2, ...): alpha * 6 / (pi^2 k^2), which sums to alpha over
    every vote the image can start (alpha spending over an attack, not per vote)."""
    return alpha * 6 / (math.pi**2 * k.double() ** 2)


def group_rank(idx: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries of the batch carry the same image index (0, 1, ...)."""
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    pos = torch.arange(len(idx), device=idx.device)
    new_group = torch.ones_like(sorted_idx, dtype=torch.bool)
    new_group[1:] = sorted_idx[1:] != sorted_idx[:-1]
    group_start = torch.cummax(torch.where(new_group, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - group_start
    return rank


@dataclass(frozen=True)
class QueryRules:
    """How the Oracle counts and verifies queries, checked once where it is made.

    ``budget``: counted queries per image. ``eot``: samples per query (M), each counted; score mode
    answers their mean, label mode their majority. ``votes``: uncounted passes that confirm a wrong
    label on a randomized model (0 = the query itself decides); ``lucky``: the single query decides
    even with votes (RFD Table 15).

    ``vote_rule="fixed"``: the papers' rule (RFD App. D.4), a majority of ``votes`` passes. An attack
    starts a vote at every query that sees a wrong label, so a borderline candidate eventually wins one
    by chance. ``"sequential"`` (default) bounds that: the k-th vote of an image tests "misclassification
    rate <= ``rate``" at level alpha_k = ``alpha`` * 6 / (pi^2 k^2) (the levels sum to ``alpha`` over the
    whole attack) with an exact binomial test on up to ``max_passes`` fresh passes, drawn in blocks of
    ``votes`` and stopped as soon as the outcome is certain. ``vote_cap``: verification passes per image;
    an image that reaches it starts no more votes (``Oracle.capped``).
    """

    budget: int
    eot: int = 1
    votes: int = 9
    lucky: bool = False
    vote_rule: str = "sequential"
    alpha: float = 0.01
    rate: float = 0.5
    max_passes: int = 45
    vote_cap: int = 20000

    def __post_init__(self) -> None:
        check_count("budget", self.budget, 1, "counted queries per image")
        check_count("eot", self.eot, 1, "samples per query, M")
        check_count("votes", self.votes, 0, "uncounted passes confirming a success")
        if self.eot > self.budget:
            raise ValueError(f"eot {self.eot} is more than the budget of {self.budget} queries")
        object.__setattr__(self, "lucky", bool(self.lucky))
        if self.vote_rule not in VOTE_RULES:
            raise ValueError(f"vote_rule must be one of {', '.join(VOTE_RULES)}, got {self.vote_rule!r}")
        for name, value in (("alpha", self.alpha), ("rate", self.rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        check_count("max_passes", self.max_passes, 1, "fresh passes one sequential vote may draw")
        check_count("vote_cap", self.vote_cap, 1, "verification passes per image")
        if self.vote_rule == "sequential" and self.votes and self.max_passes < self.votes:
            raise ValueError(f"max_passes {self.max_passes} is smaller than one block of {self.votes} votes")


class Oracle:
    """Query access to ``model`` for the clean images ``x`` (N, C, H, W) with true labels ``y``.

    ``threat``: the threat model; only candidates with ``||x' - x|| <= eps`` (slack 1e-6, relative and
    absolute) can be successes. ``rules``: the budget, EOT samples and success votes
    (:class:`QueryRules`). ``batch_size``: forward chunk size. ``checkpoints``: budgets at which to
    record the smallest norm labelled adversarial, read from ``checkpoint_norms`` (images x
    checkpoints, inf = none yet).
    ``track_mismatch``: count in ``mismatches`` the counted queries whose label differs from the
    noise-free label (the model's ``clean()`` context; a model without one counts as deterministic).
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        threat: ThreatModel,
        rules: QueryRules,
        output: str = "scores",
        batch_size: int = 128,
        checkpoints: Sequence[int] = (),
        track_mismatch: bool = False,
        bpda: bool = False,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        check_count("batch_size", batch_size, 1, "images per forward")
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel, got {threat!r}")
        if not isinstance(rules, QueryRules):
            raise TypeError(f"rules must be QueryRules, got {rules!r}")
        self.model = model
        self.device = next(model.parameters()).device
        self.labels = y.to(self.device).long()
        n = len(self.labels)
        num_classes = getattr(model, "num_classes", None)
        if not num_classes:
            raise ValueError("the model needs a num_classes attribute: wrap it in sinai's ImageClassifier")
        if n and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes - 1}] for this model")
        if x.dim() != 4 or len(x) != n:
            raise ValueError(f"x must be (N, C, H, W) with N = {n} images, got {tuple(x.shape)}")
        # NaN / inf / float64 images are refused here, where they enter, not after a forward of garbage
        check_images(x, getattr(model, "input_shape", None), parameter_dtype(model))
        if threat.norm == "l2" and threat.eps > math.sqrt(x[0].numel()):
            raise ValueError(f"l2 eps {threat.eps} is larger than the diameter of the image cube")
        checkpoints = tuple(sorted({int(c) for c in checkpoints}))
        if checkpoints and checkpoints[0] < 1:
            raise ValueError(f"checkpoints must be positive numbers of queries, got {checkpoints}")
        self.x, self.threat = x.to(self.device).float(), threat
        self._order = torch.arange(n, device=self.device)  # idx of a query of every image
        self.num_classes = int(num_classes)
        self.rules, self.output, self.batch_size = rules, output, batch_size
        self.budget, self.eot, self.votes, self.lucky = rules.budget, rules.eot, rules.votes, rules.lucky
        self.queries = torch.zeros(n, dtype=torch.long, device=self.device)
        self.vote_passes = torch.zeros(n, dtype=torch.long, device=self.device)
        self.votes_started = torch.zeros(n, dtype=torch.long, device=self.device)
        self.capped = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.success_at = torch.zeros(n, dtype=torch.long, device=self.device)  # 0 = none yet
        self.success = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.x_adv: torch.Tensor | None = None  # the verified adversarial example of each image
        self.on_query: Callable[[int], None] | None = None  # told how many queries each call counted
        self.checkpoints = torch.tensor(checkpoints, dtype=torch.long, device=self.device)
        self.checkpoint_norms = torch.full((n, len(checkpoints)), float("inf"), device=self.device)
        self.track_mismatch = bool(track_mismatch)
        self.mismatches = torch.zeros(n, dtype=torch.long, device=self.device)
        if bpda and not callable(getattr(model, "straight_through", None)):
            raise ValueError("bpda needs a defended model (sinai.protect) with a non-smooth step to bypass")
        self.bpda = bool(bpda)
        self.gradient_passes = 0  # forward passes with autograd handed to white-box attacks (uncounted)

    # ----------------------------------------------------------------------------------------- state
    @property
    def done(self) -> torch.Tensor:
        """Images that need no more queries: verified success, or not even one more query left."""
        return self.success | (self.queries + self.eot > self.budget)

    def live(self, among: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the images still being attacked (the ones the oracle still answers), ascending.

        ``among``: a mask over the images; only those where it is True are listed.
        """
        live = ~self.done
        if among is not None:
            live &= among.to(self.device)
        return torch.nonzero(live).flatten()

    def mark_broken(self, mask: torch.Tensor) -> None:
        """Record images as not robust before any query (misclassified clean by the vote)."""
        self.success |= mask.to(self.device)

    # ------------------------------------------------------------------------------------ white-box
    def differentiable(self) -> nn.Module:
        """The deployed model as a differentiable module for white-box attacks (Athalye et al. 2018).

        Its forward keeps the defense's noise (one fresh sample per forward; with ``eot`` = M > 1 the
        mean logits of M samples: EOT) and, with ``bpda``, passes gradients straight through the
        defense's non-smooth steps. Forwards are tallied in ``gradient_passes``, not in the budget.
        """
        return _Differentiable(self)

    def leaked(self) -> nn.Module:
        """The undefended model (the defended model without its defense): a transfer attack's source
        when the attacker holds the weights. Its forward is exactly the base model's."""
        return getattr(self.model, "model", self.model)

    @torch.no_grad()
    def judge(self, x_adv: torch.Tensor) -> torch.Tensor:
        """Submit one final image per live image (rows of ``x_adv`` are the oracle's images); return
        the success mask over all images.

        Each live image costs one counted query (``eot`` samples: mean logits). It is broken when it lies
        inside the eps-ball and the deployed model gets it wrong: with the sequential vote, when its
        fresh passes pass the image's next vote (whatever the counted query said: the example is
        submitted once); with the fixed rule, when the majority of that query and ``votes`` uncounted
        passes label it wrongly; ``lucky`` or no votes: the query alone decides.
        """
        if x_adv.shape != self.x.shape:
            raise ValueError(
                f"judge needs one image per oracle image {tuple(self.x.shape)}, got {tuple(x_adv.shape)}"
            )
        idx = self.live()
        if not len(idx):
            return self.success.clone()
        xa = x_adv.to(self.device)[idx].float()
        out = self._forward(xa.repeat(self.eot, 1, 1, 1)).view(self.eot, len(xa), -1)
        pred = out.mean(0).argmax(1)
        spent = self.queries[idx] + self.eot
        self.queries[idx] = spent
        if self.on_query is not None:
            self.on_query(len(idx) * self.eot)
        within = self._observe(xa, idx, pred, out.argmax(2), spent)
        wrong = (pred != self.labels[idx]).long()
        if self.votes and not self.lucky and self.rules.vote_rule == "sequential":
            broken = torch.zeros(len(idx), dtype=torch.bool, device=self.device)
            broken[within] = self._sequential_vote(xa[within], idx[within])
        elif self.votes and not self.lucky:
            votes = self._forward(xa.repeat(self.votes, 1, 1, 1)).argmax(1).view(self.votes, len(xa))
            self.vote_passes[idx] += self.votes
            wrong = wrong + (votes != self.labels[idx]).sum(0)
            broken = wrong * 2 > self.votes + 1
        else:
            broken = wrong.bool()
        broken &= within
        self._record(xa[broken], idx[broken], spent[broken])
        return self.success.clone()

    # ------------------------------------------------------------------------------------- querying
    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) <= self.batch_size:
            return self.model(x).float()
        out = [self.model(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).float()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, passes: int = 1) -> torch.Tensor:
        """Uncounted majority label over ``passes`` forwards (for the clean check before an attack)."""
        x = x.to(self.device)
        labels = torch.stack([self._forward(x).argmax(1) for _ in range(passes)])
        return torch.mode(labels, dim=0).values

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Answer the candidates ``x`` of images ``idx``: logits (B, K) or labels (B,).

        Rows of finished images (verified success, budget spent) are not forwarded nor counted: their
        logits are NaN and their labels -1. Several candidates of one image in a batch count in order.
        """
        if x.dim() != 4 or idx.dim() != 1 or len(x) != len(idx):
            raise ValueError(
                f"need images (B, C, H, W) and indices (B,), got {tuple(x.shape)} and {tuple(idx.shape)}"
            )
        x, idx = x.to(self.device), idx.to(self.device)
        # Fast path (one candidate per image, the common case): no ranking, no copies, no masking.
        unique = len(idx) <= 1 or int(torch.bincount(idx).max()) == 1
        rank = torch.zeros_like(idx) if unique else group_rank(idx)
        answered = ~self.success[idx] & (self.queries[idx] + (rank + 1) * self.eot <= self.budget)
        everything = bool(answered.all())
        xa, ia, ra = (x, idx, rank) if everything else (x[answered], idx[answered], rank[answered])
        if not len(xa):
            logits = torch.empty((0, self.num_classes), device=self.device)
            samples = torch.empty((1, 0), dtype=torch.long, device=self.device)
            pred = samples[0]
        elif self.eot > 1:
            out = self._forward(xa.repeat(self.eot, 1, 1, 1)).view(self.eot, len(xa), -1)
            logits, samples = out.mean(0), out.argmax(2)
            # Labels: the majority of the M samples (SND's T-query attack); scores: the mean (EOT).
            pred = torch.mode(samples, dim=0).values if self.output == "labels" else logits.argmax(1)
        else:
            logits = self._forward(xa)
            pred = logits.argmax(1)
            samples = pred[None]
        spent = self.queries[ia] + (ra + 1) * self.eot  # query count at each candidate
        self.queries.index_add_(0, ia, torch.full_like(ia, self.eot))
        if self.on_query is not None:
            self.on_query(len(ia) * self.eot)
        within = self._observe(xa, ia, pred, samples, spent) if len(xa) else None
        self._check_success(xa, ia, pred, spent, within)
        if self.output == "labels":
            if everything:
                return pred
            result = torch.full((len(x),), -1, dtype=torch.long, device=self.device)
            result[answered] = pred
            return result
        if everything:
            return logits
        result = torch.full((len(x), self.num_classes), float("nan"), device=self.device)
        result[answered] = logits
        return result

    def _observe(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        pred: torch.Tensor,
        samples: torch.Tensor,
        spent: torch.Tensor,
    ) -> torch.Tensor:
        """Record checkpoint norms and mismatches of answered candidates; return their in-ball mask."""
        if self.track_mismatch:
            clean = getattr(self.model, "clean", None)
            with clean() if clean is not None else contextlib.nullcontext():
                clean_pred = self._forward(x).argmax(1)
            self.mismatches.index_add_(0, idx, (samples != clean_pred[None]).sum(0))
        every = len(idx) == len(self.x) and bool((idx == self._order).all())
        norms = self.threat.distance(x, self.x if every else self.x[idx])
        if len(self.checkpoints):
            adversarial = pred != self.labels[idx]
            reached = spent[:, None] <= self.checkpoints[None, :]
            values = torch.where(adversarial[:, None] & reached, norms[:, None], float("inf"))
            self.checkpoint_norms.scatter_reduce_(
                0, idx[:, None].expand_as(values), values, "amin", include_self=True
            )
        return norms <= self.threat.radius

    def _check_success(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        pred: torch.Tensor,
        spent: torch.Tensor,
        within: torch.Tensor | None = None,
    ) -> None:
        wrong = (pred != self.labels[idx]) & ~self.success[idx]
        if within is not None:
            wrong &= within
        if not wrong.any():
            return
        xw, iw, sw = x[wrong], idx[wrong], spent[wrong]
        if self.votes and not self.lucky:
            if self.rules.vote_rule == "fixed":
                votes = self._forward(xw.repeat(self.votes, 1, 1, 1)).argmax(1).view(self.votes, len(xw))
                self.vote_passes.index_add_(0, iw, torch.full_like(iw, self.votes))
                confirmed = (votes != self.labels[iw]).sum(0) * 2 > self.votes
            else:
                confirmed = self._sequential_vote(xw, iw)
            xw, iw, sw = xw[confirmed], iw[confirmed], sw[confirmed]
        self._record(xw, iw, sw)

    def _sequential_vote(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Accept each candidate when its fresh passes reject "misclassification rate <= rate" at its
        image's spent level (see :class:`QueryRules`); passes come in blocks of ``votes``."""
        rules = self.rules
        k = self.votes_started[idx] + group_rank(idx) + 1  # several candidates of an image: votes k, k+1, ..
        self.votes_started.index_add_(0, idx, torch.ones_like(idx))
        levels = spent_alpha(rules.alpha, k).tolist()
        need = torch.tensor(
            [vote_threshold(rules.max_passes, a, rules.rate) for a in levels],
            dtype=torch.long,
            device=self.device,
        )
        wrong = torch.zeros(len(idx), dtype=torch.long, device=self.device)
        accepted = torch.zeros(len(idx), dtype=torch.bool, device=self.device)
        open_ = need <= rules.max_passes
        drawn = 0
        while bool(open_.any()):
            block = min(self.votes, rules.max_passes - drawn)
            rows = torch.nonzero(open_).flatten()
            over = self.vote_passes[idx[rows]] + block > rules.vote_cap
            if bool(over.any()):  # the image's verification budget is spent: no decision, no success
                self.capped[idx[rows[over]]] = True
                open_[rows[over]] = False
                rows = rows[~over]
                if not len(rows):
                    break
            labels = self._forward(x[rows].repeat(block, 1, 1, 1)).argmax(1).view(block, len(rows))
            wrong[rows] += (labels != self.labels[idx[rows]]).sum(0)
            self.vote_passes.index_add_(0, idx[rows], torch.full_like(rows, block))
            drawn += block
            accepted |= open_ & (wrong >= need)
            open_ &= ~accepted & (wrong + (rules.max_passes - drawn) >= need)
        return accepted

    def _record(self, xw: torch.Tensor, iw: torch.Tensor, sw: torch.Tensor) -> None:
        """Record the confirmed adversarial candidates ``xw`` of images ``iw`` found at query ``sw``."""
        if not len(iw):
            return
        # The earliest confirmed candidate of each image wins (counts within an image are distinct).
        first = torch.full_like(self.success_at, torch.iinfo(torch.long).max).scatter_reduce(
            0, iw, sw, "amin"
        )
        keep = sw == first[iw]
        xw, iw, sw = xw[keep], iw[keep], sw[keep]
        if self.x_adv is None:
            self.x_adv = torch.full((len(self.labels), *xw.shape[1:]), float("nan"), device=self.device)
        self.x_adv[iw] = xw
        self.success_at[iw] = sw
        self.success[iw] = True


class _Differentiable(nn.Module):
    """The oracle's model with autograd: M-sample EOT mean logits, straight-through under BPDA."""

    def __init__(self, oracle: Oracle) -> None:
        super().__init__()
        self.model = oracle.model
        self.num_classes = oracle.num_classes
        self._oracle = [oracle]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oracle = self._oracle[0]
        bypass = self.model.straight_through() if oracle.bpda else contextlib.nullcontext()
        with bypass:
            if oracle.eot == 1:
                out = self.model(x)
            else:
                out = self.model(x.repeat(oracle.eot, 1, 1, 1)).view(oracle.eot, len(x), -1).mean(0)
        oracle.gradient_passes += len(x) * oracle.eot
        return out.float()
