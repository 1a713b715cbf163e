"""The Oracle: the only door to a model during an attack.

Attacks hand it a batch of candidate images and, for each, the index of the image it belongs to. It
returns logits (score mode) or labels (decision mode), counts queries per image exactly, masks the
candidates of images that are finished (verified success or budget spent), and decides success the way
the papers do on a randomized model: when a counted query sees a wrong label, 9 more noisy passes
of that candidate, not counted in the budget, must mostly agree (RFD Appendix D.4). ``lucky=True``
decides by the single query instead (RFD Table 15).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

OUTPUTS = ("scores", "labels")


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


class Oracle:
    """Query access to ``model`` for the images whose true labels are ``labels`` (one per image).

    ``budget``: counted queries allowed per image. ``eot``: samples per candidate (each counts as a
    query; the mean logits are returned). ``votes``: uncounted extra passes that confirm a wrong label
    (0 = a deterministic model, the query itself decides). ``batch_size``: forward chunk size.
    """

    def __init__(
        self,
        model: nn.Module,
        labels: torch.Tensor,
        *,
        budget: int,
        output: str = "scores",
        eot: int = 1,
        votes: int = 9,
        lucky: bool = False,
        batch_size: int = 128,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive number of queries, got {budget!r}")
        if eot < 1:
            raise ValueError(f"eot (samples per query, M) must be >= 1, got {eot}")
        if votes < 0 or batch_size < 1:
            raise ValueError("votes must be >= 0 and batch_size >= 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.labels = labels.to(self.device).long()
        n = len(self.labels)
        num_classes = getattr(model, "num_classes", None)
        if not num_classes:
            raise ValueError("the model needs a num_classes attribute: wrap it in sinai's ImageClassifier")
        if n and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes - 1}] for this model")
        self.num_classes = int(num_classes)
        self.budget, self.output, self.eot = budget, output, eot
        self.votes, self.lucky, self.batch_size = votes, lucky, batch_size
        self.queries = torch.zeros(n, dtype=torch.long, device=self.device)
        self.vote_passes = torch.zeros(n, dtype=torch.long, device=self.device)
        self.success_at = torch.zeros(n, dtype=torch.long, device=self.device)  # 0 = none yet
        self.success = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.x_adv: torch.Tensor | None = None  # the verified adversarial example of each image
        self.on_query: Callable[[int], None] | None = None  # told how many queries each call counted

    # ----------------------------------------------------------------------------------------- state
    @property
    def done(self) -> torch.Tensor:
        """Images that need no more queries: verified success, or not even one more query left."""
        return self.success | (self.queries + self.eot > self.budget)

    def live(self, idx: torch.Tensor) -> torch.Tensor:
        """Mask of the entries of ``idx`` whose image is still being attacked."""
        return ~self.done[idx.to(self.device)]

    def mark_broken(self, mask: torch.Tensor) -> None:
        """Record images as not robust before any query (misclassified clean by the vote)."""
        self.success |= mask.to(self.device)

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
        elif self.eot > 1:
            logits = self._forward(xa.repeat(self.eot, 1, 1, 1)).view(self.eot, len(xa), -1).mean(0)
        else:
            logits = self._forward(xa)
        spent = self.queries[ia] + (ra + 1) * self.eot  # query count at each candidate
        self.queries.index_add_(0, ia, torch.full_like(ia, self.eot))
        if self.on_query is not None:
            self.on_query(len(ia) * self.eot)
        pred = logits.argmax(1)
        self._check_success(xa, ia, pred, spent)
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

    def _check_success(
        self, x: torch.Tensor, idx: torch.Tensor, pred: torch.Tensor, spent: torch.Tensor
    ) -> None:
        wrong = (pred != self.labels[idx]) & ~self.success[idx]
        if not wrong.any():
            return
        xw, iw, sw = x[wrong], idx[wrong], spent[wrong]
        if self.votes and not self.lucky:
            votes = self._forward(xw.repeat(self.votes, 1, 1, 1)).argmax(1).view(self.votes, len(xw))
            self.vote_passes.index_add_(0, iw, torch.full_like(iw, self.votes))
            confirmed = (votes != self.labels[iw]).sum(0) * 2 > self.votes
            xw, iw, sw = xw[confirmed], iw[confirmed], sw[confirmed]
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
