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
        # The live set is cached between calls (see ``_live_set``); ``_gen`` changes when it may be stale.
        self._gen, self._versions = 0, (-1, -1)
        self._live: _LiveSet | None = None
        self._among: _LiveSet | None = None
        self._max_queries = 0
        self._wrong_seen = False  # whether the last call saw a wrong label (see _within_early)
        self._marks: torch.Tensor | None = None  # scratch of _most
        self._one: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------- state
    @property
    def done(self) -> torch.Tensor:
        """Images that need no more queries: verified success, or not even one more query left."""
        return self._live_set().done

    def live(self, among: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the images still being attacked (the ones the oracle still answers), ascending.

        ``among``: a mask over the images; only those where it is True are listed. While no image
        finishes, the same tensor is handed out again, and a query with it takes the oracle's fast path.
        """
        cache = self._live_set()
        if among is None:
            return cache.idx
        known = self._among
        if (
            known is not None
            and known.among is among
            and known.among_version == among._version
            and known.gen == cache.gen
            and known.idx._version == known.version
        ):
            return known.idx  # the same mask and no image finished: the same set as last time
        idx = torch.nonzero(~cache.done & among.to(self.device)).flatten()
        self._among = _LiveSet(idx, cache.gen, len(self.x))
        self._among.among, self._among.among_version = among, among._version
        return idx

    def _live_set(self) -> _LiveSet:
        """The cached live set, recomputed when some image may have finished since it was made (or a
        caller changed a tensor it was handed in place)."""
        cache, gen = self._live, self._generation()
        if (
            cache is None
            or cache.gen != gen
            or cache.idx._version != cache.version
            or cache.done._version != cache.done_version
        ):
            done = self.success | (self.queries + self.eot > self.budget)
            idx = torch.nonzero(~done).flatten()
            cache = self._live = _LiveSet(idx, gen, len(self.x), done)
            # exact again: the largest count of a live image, which bounds when the next one can run out
            self._max_queries = int(self.queries[idx].max()) if len(idx) else 0
        return cache

    def _generation(self) -> int:
        """A number that changes whenever the set of finished images may have changed: the oracle bumps it
        itself, and a change to ``queries`` or ``success`` made outside the oracle bumps it here."""
        versions = (self.queries._version, self.success._version)
        if versions != self._versions:
            self._gen += 1
            self._versions = versions
        return self._gen

    def _settle(self, cache_valid: bool, most: int, recorded: bool) -> None:
        """After the oracle's own changes to ``queries`` / ``success``: keep the live set when no image
        can have finished (no success recorded, and the bound on live counts, raised by ``most`` queries
        per image, still leaves every live image one more query)."""
        if cache_valid and not recorded:
            self._max_queries += most
            if self._max_queries + self.eot > self.budget:
                self._gen += 1
        else:
            self._gen += 1
        self._versions = (self.queries._version, self.success._version)

    def mark_broken(self, mask: torch.Tensor) -> None:
        """Record images as not robust before any query (misclassified clean by the vote)."""
        self.success |= mask.to(self.device)
        self._gen += 1

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
        within = self._observe(xa, idx, pred, out.argmax(2), lambda: spent)
        if within is None:  # no checkpoints: the norms were not measured yet
            within = self.threat.distance(xa, self._clean(idx, None)) <= self.threat.radius
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
        # chunks of nearly equal sizes (at most batch_size): no small remainder forward
        out = [self.model(part) for part in x.tensor_split(math.ceil(len(x) / self.batch_size))]
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
        known = self._handed_out(idx)
        if known is not None:
            return self._answer_live(x, known)
        most = 1 if len(idx) <= 1 else self._most(idx)
        cache_valid = self._live is not None and self._live.gen == self._generation()
        rank = None  # of each candidate among its image's, computed only where the counts are needed
        if (
            cache_valid
            and self._live.done._version == self._live.done_version
            and self._max_queries + most * self.eot <= self.budget
        ):  # every live image can take all its candidates: answered = live
            finished = self._live.done[idx]
            everything = not bool(finished.any())  # the common case: no copies, no masking
            answered = None if everything else ~finished
        else:
            if most == 1:
                answered = ~self.success[idx] & (self.queries[idx] + self.eot <= self.budget)
            else:
                rank = group_rank(idx)
                answered = ~self.success[idx] & (self.queries[idx] + (rank + 1) * self.eot <= self.budget)
            everything = bool(answered.all())
        xa, ia = (x, idx) if everything else (x[answered], idx[answered])
        early = self._within_early(xa, ia, None) if len(xa) else None
        if not len(xa):
            logits = torch.empty((0, self.num_classes), device=self.device)
            samples = torch.empty((1, 0), dtype=torch.long, device=self.device)
            pred = samples[0]
        else:
            logits, samples, pred = self._query(xa)
        before = self.queries[ia]
        if most == 1:
            self.queries[ia] = before + self.eot
        else:
            self.queries.index_add_(0, ia, torch.full_like(ia, self.eot))
        if self.on_query is not None:
            self.on_query(len(ia) * self.eot)

        def spent() -> torch.Tensor:
            """The query count at each answered candidate."""
            if most == 1:
                return before + self.eot
            ra = group_rank(ia) if rank is None else rank if everything else rank[answered]
            return before + (ra + 1) * self.eot

        within = self._observe(xa, ia, pred, samples, spent) if len(xa) else None
        within = early if within is None else within
        recorded = self._check_success(xa, ia, pred, spent, within) if len(xa) else False
        self._settle(cache_valid, most * self.eot, recorded)
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

    def _most(self, idx: torch.Tensor) -> int:
        """The most candidates of one image in ``idx``: counted in a float scratch vector (kept at zero
        between calls) with the kernels the oracle uses anyway, instead of ``bincount``'s own."""
        if self._marks is None:
            self._marks = torch.zeros(len(self.x), device=self.device)
            self._one = torch.ones(2, device=self.device)
            self._one[1] = -1.0
        self._marks.index_add_(0, idx, self._one[0].expand(len(idx)))
        most = int(self._marks.amax())
        self._marks.index_add_(0, idx, self._one[1].expand(len(idx)))  # back to zero (small integers: exact)
        return most

    def _handed_out(self, idx: torch.Tensor) -> _LiveSet | None:
        """The live set ``idx`` is, when it is one the oracle handed out (``live()``) and no image has
        finished since: then every row is answered, once, in ascending order."""
        for known in (self._live, self._among):
            if known is not None and idx is known.idx:
                if idx._version == known.version and known.gen == self._generation():
                    return known
                return None
        return None

    def _answer_live(self, x: torch.Tensor, known: _LiveSet) -> torch.Tensor:
        """``__call__`` for a handed-out live set: every row answered, one query each, none masked."""
        idx = known.idx
        within = self._within_early(x, idx, known)
        logits, samples, pred = self._query(x)
        if known.every:  # all images, in order: no gathers
            self.queries.add_(self.eot)
        else:
            self.queries.index_add_(0, idx, known.eots(self.eot))
        if self.on_query is not None:
            self.on_query(len(idx) * self.eot)

        def spent() -> torch.Tensor:
            """The query count at each candidate: read only when needed (a success or checkpoints), and
            before any other change to the counts in this call."""
            return self.queries if known.every else self.queries[idx]

        observed = self._observe(x, idx, pred, samples, spent, known)
        within = within if observed is None else observed
        recorded = self._check_success(x, idx, pred, spent, within, known)
        self._settle(True, self.eot, recorded)
        return pred if self.output == "labels" else logits

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward the answered candidates: (logits, each of the M samples' labels, the answer's label)."""
        if self.eot > 1:
            out = self._forward(x.repeat(self.eot, 1, 1, 1)).view(self.eot, len(x), -1)
            logits, samples = out.mean(0), out.argmax(2)
            # Labels: the majority of the M samples (SND's T-query attack); scores: the mean (EOT).
            pred = torch.mode(samples, dim=0).values if self.output == "labels" else logits.argmax(1)
            return logits, samples, pred
        logits = self._forward(x)
        pred = logits.argmax(1)
        return logits, pred[None], pred

    def _observe(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        pred: torch.Tensor,
        samples: torch.Tensor,
        spent: Callable[[], torch.Tensor],
        known: _LiveSet | None = None,
    ) -> torch.Tensor | None:
        """Record checkpoint norms and mismatches of answered candidates; return their in-ball mask when
        the norms were needed here (checkpoints), else None (``_check_success`` measures only if needed)."""
        if self.track_mismatch:
            clean = getattr(self.model, "clean", None)
            with clean() if clean is not None else contextlib.nullcontext():
                clean_pred = self._forward(x).argmax(1)
            self.mismatches.index_add_(0, idx, (samples != clean_pred[None]).sum(0))
        if not len(self.checkpoints):
            return None
        norms = self.threat.distance(x, self._clean(idx, known))
        adversarial = pred != self.labels[idx]
        reached = spent()[:, None] <= self.checkpoints[None, :]
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
        spent: Callable[[], torch.Tensor],
        within: torch.Tensor | None = None,
        known: _LiveSet | None = None,
    ) -> bool:
        """Verify the answered candidates labelled wrongly inside the ball; whether any was recorded.
        (Answered candidates are of images not broken before the call.) ``within``: their in-ball mask,
        measured here only when some label is wrong."""
        wrong = pred != (self.labels[idx] if known is None else known.labels(self.labels))
        self._wrong_seen = bool(wrong.any())
        if not self._wrong_seen:
            return False
        if within is None:
            within = self.threat.distance(x, self._clean(idx, known)) <= self.threat.radius
        wrong &= within
        if not bool(wrong.any()):
            return False
        return self._confirm(x, idx, spent(), wrong)

    def _within_early(
        self, x: torch.Tensor, idx: torch.Tensor, known: _LiveSet | None
    ) -> torch.Tensor | None:
        """The candidates' in-ball mask measured before the forward, while they are still in the CPU's
        cache, when the last call saw a wrong label (then ``_check_success`` likely needs it); None
        otherwise, and with checkpoints (``_observe`` measures the norms then)."""
        if not self._wrong_seen or len(self.checkpoints):
            return None
        return self.threat.distance(x, self._clean(idx, known)) <= self.threat.radius

    def _clean(self, idx: torch.Tensor, known: _LiveSet | None) -> torch.Tensor:
        """The clean images of ``idx`` (the live set's cached ones when it is one)."""
        return self.x.index_select(0, idx) if known is None else known.clean(self.x)

    def _confirm(self, x: torch.Tensor, idx: torch.Tensor, spent: torch.Tensor, wrong: torch.Tensor) -> bool:
        """Vote on the ``wrong`` candidates (unless the query alone decides) and record the confirmed ones."""
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
        return len(iw) > 0

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


class _LiveSet:
    """A live set the oracle handed out (ascending indices ``idx``), with what its fast path reuses: the
    clean images and labels of those images, gathered once. ``gen``: the oracle's generation it is valid
    for; ``version``: ``idx``'s version then (a caller that changes it in place invalidates it)."""

    def __init__(self, idx: torch.Tensor, gen: int, n: int, done: torch.Tensor | None = None) -> None:
        self.idx, self.version, self.gen = idx, idx._version, gen
        self.every = len(idx) == n  # then idx is 0..n-1: the oracle's own tensors need no gather
        self.done = done
        self.done_version = -1 if done is None else done._version
        self.among: torch.Tensor | None = None  # the mask a live(among=...) set was made for, and its version
        self.among_version = -1
        self._clean: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._eots: torch.Tensor | None = None

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        if self._clean is None:
            self._clean = x if self.every else x.index_select(0, self.idx)
        return self._clean

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            self._labels = y if self.every else y[self.idx]
        return self._labels

    def eots(self, eot: int) -> torch.Tensor:
        if self._eots is None:
            self._eots = torch.full_like(self.idx, eot)
        return self._eots


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
