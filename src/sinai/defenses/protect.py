"""``protect(model, defense)``: the one mechanism behind every inference-time noise defense.

Hooks are registered on the sites of ``model`` but act only while the ``DefendedModel`` runs its own
forward with noise on, so calling ``model`` directly, or ``.clean()``, gives the undefended outputs
exactly. The noise never looks at ``.training`` (attack libraries call ``model.eval()``), is drawn
from the defended model's own ``torch.Generator`` on the tensor's device, and is fresh and independent
for every image of a batch on every forward.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..checks import ArgumentTypeError
from ..models.classifier import check_images, parameter_dtype
from . import fastnoise
from .aaa import AAAHook
from .hooks import Generators, SiteHook
from .selective import SelectiveHook
from .sites import Site, settle
from .spec import AAASpec, Defense, NoiseSpec, SelectiveSpec, parse_defense


def selected_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` without float round-up (0.3 * 10 is 3.0000000000000004 in floats)."""
    return min(n, max(0, math.ceil(ratio * n - 1e-6)))


def smallest_mask(z: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """Per sample, a mask of exactly the ``ceil(ratio * n)`` smallest entries of ``z`` (``None`` = all):
    the entries :func:`smallest_indices` picks."""
    idx = smallest_indices(z, ratio)
    if idx is None:
        return None
    mask = torch.zeros((z.shape[0], z[0].numel()), dtype=torch.bool, device=z.device)
    return mask.scatter_(1, idx, True).view_as(z)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}  # fmt: skip


def order_keys(flat: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the floats ``flat`` (CPU): the IEEE bits, negatives' magnitude bits flipped.

    Ties stay ties (but -0.0 sorts before +0.0); ``topk`` on them is ~20% faster on CPU than on the floats.
    """
    bits = flat.contiguous().view(_SAME_WIDTH_INT[flat.dtype])
    width = bits.element_size() * 8
    return bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))


def smallest_indices(z: torch.Tensor, ratio: float, *, largest: bool = False) -> torch.Tensor | None:
    """Per sample, the flat indices (B, k) of exactly the ``k = ceil(ratio * n)`` smallest (``largest``:
    largest) entries of ``z``, in no particular order; ``None`` when ``k = n`` (all of them).

    ``topk(sorted=False)`` is exact under ties and faster than ``kthvalue`` + compare; on CPU it runs on
    :func:`order_keys` (integers in the same order).
    """
    flat = z.detach().reshape(z.shape[0], -1)
    k = selected_count(ratio, flat.shape[1])
    if k >= flat.shape[1]:
        return None
    if flat.device.type == "cpu" and flat.dtype in _SAME_WIDTH_INT:
        flat = order_keys(flat)
    return flat.topk(k, dim=1, largest=largest, sorted=False).indices


class _Injector(SiteHook):
    """The hook for one site: adds ``spec.std`` Gaussian noise to the tensor the site exposes (a vector
    std scales the noise per entry of the tensor's last dimension)."""

    def __init__(self, owner: DefendedModel, site: Site, spec: NoiseSpec) -> None:
        super().__init__(site)
        self.owner = owner
        self.spec = spec
        self.calls = 0  # calls within the current forward (torchvision reuses one ReLU 2-3 times)
        self._vector = None if isinstance(spec.std, float) else torch.tensor(spec.std, dtype=torch.float64)
        self._vectors: dict[tuple, torch.Tensor] = {}  # the vector std by (device, dtype)

    def _noise(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self._vector is None:  # the scalar path, unchanged
            return self.owner.noise(shape, like, self.spec.std)
        return self.owner.noise(shape, like, 1.0).mul_(self._std_vector(shape[-1], like))

    def _std_vector(self, features: int, like: torch.Tensor) -> torch.Tensor:
        """The vector std on ``like``'s device and dtype, checked against the site's ``features``."""
        if features != len(self._vector):
            raise ValueError(
                f"site {self.site.name or self.site.kind!r} has {features} features in its last dimension, "
                f"but the std vector has {len(self._vector)} entries"
            )
        key = (like.device, like.dtype)
        std = self._vectors.get(key)
        if std is None:
            std = self._vectors[key] = self._vector.to(device=like.device, dtype=like.dtype)
        return std

    def enabled(self) -> bool:
        return self.owner.active

    def tensor(self, z: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        if self.owner.recording is not None:  # calibrating thresholds on clean activations
            if self.spec.ratio < 1.0:
                self.owner.recording.setdefault((self.site.name, call), []).append(
                    smallest_threshold(z, self.spec.ratio)
                )
            return z
        if fastnoise.supports(z):
            return self._compiled(z, call)
        if self.spec.ratio < 1.0 and self.spec.selection == "exact":
            return self._selected(z)
        noise = self._noise(z.shape, z)
        if self.spec.ratio >= 1.0:
            return z + noise
        return torch.addcmul(z, noise, z <= self.owner.threshold(self.site.name, call))

    def _compiled(self, z: torch.Tensor, call: int) -> torch.Tensor:
        """The same noise from the compiled CPU path (:mod:`sinai.defenses.fastnoise`): selection, draws
        and addition in one pass per sample, drawn only for the selected entries."""
        std = self.spec.std if self._vector is None else self._std_vector(z.shape[-1], z)
        gen = self.owner.generator(z.device)
        if self.spec.ratio >= 1.0:
            return fastnoise.add_all(z, std, gen)
        if self.spec.selection == "threshold":
            return fastnoise.add_below(z, self.owner.threshold(self.site.name, call), std, gen)
        k = selected_count(self.spec.ratio, z[0].numel())
        if k == 0:
            return z
        if k == z[0].numel():
            return fastnoise.add_all(z, std, gen)
        return fastnoise.add_exact(z, k, std, gen)

    def _selected(self, z: torch.Tensor) -> torch.Tensor:
        """Exact selection, fused: noise is drawn for the ``k`` selected entries of each sample only and
        added where they are (one ``scatter_add``), never for the ``n - k`` others and with no mask."""
        idx = smallest_indices(z, self.spec.ratio)
        if idx is None:
            return z + self._noise(z.shape, z)
        flat = z.reshape(z.shape[0], -1)
        if idx.shape[1] == 0:
            return z
        if self._vector is None:
            noise = self.owner.noise(idx.shape, z, self.spec.std)
        else:  # the std of each selected entry's feature (its index in the last dimension)
            std = self._std_vector(z.shape[-1], z)
            noise = self.owner.noise(idx.shape, z, 1.0).mul_(std[idx % z.shape[-1]])
        return flat.scatter_add(1, idx, noise).view_as(z)

    def attn_logits(self, shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor | None:
        if self.owner.recording is not None:
            return None
        return self._noise(shape, like)


def smallest_threshold(z: torch.Tensor, ratio: float) -> float:
    """Mean over the batch of each sample's ``ceil(ratio * n)``-th smallest value of ``z``."""
    flat = z.detach().reshape(z.shape[0], -1).float()
    k = max(1, selected_count(ratio, flat.shape[1]))
    return flat.kthvalue(k, dim=1).values.mean().item()


class DefendedModel(nn.Module):
    """A model with a noise defense: an ``nn.Module`` whose forward injects noise at its sites.

    ``seed``: an int makes the noise reproducible (evaluation); ``None`` seeds from OS entropy
    (serving: an attacker must never be able to replay the noise). The sites are found once, here:
    ``defense`` is then the given defense restricted to the kinds the model has
    (:meth:`Defense.for_model`) and ``sites`` the sites that get noise.

    With ``defense.mc > 1`` the forward returns ``log(mean of softmax)`` over ``mc`` noisy passes drawn
    one after the other (the deployed prediction rule); ``.clean()`` stays one undefended pass.
    """

    def __init__(
        self, model: nn.Module, defense: Defense, *, seed: int | None = None, validate: bool = True
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        if not isinstance(defense, Defense):
            raise ArgumentTypeError(
                f"defense must be a Defense or its text form such as 'RND:std=0.05', got {defense!r:.60}"
            )
        seed = check_seed(seed)
        if not isinstance(validate, bool):
            raise ArgumentTypeError(f"validate must be True or False, got {validate!r:.60}")
        super().__init__()
        self.model = model
        self.defense = defense  # _attach replaces it by the defense restricted to the model's sites
        self.validate = validate
        self.input_shape = getattr(model, "input_shape", None)
        self.num_classes = getattr(model, "num_classes", None)
        self.active = False
        self.bpda = False  # non-smooth steps pass gradients straight through (see straight_through)
        self.recording: dict[tuple[str, int], list[float]] | None = None
        self._noise_on = True
        self._thresholds: dict[tuple[str, int], float] = {}
        self._generators = Generators(seed)
        self._buffers: dict[tuple, torch.Tensor] = {}  # CPU noise buffers by (shape, dtype)
        self.sites: list[Site] = []
        self._injectors: list[_Injector | AAAHook | SelectiveHook] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attach(defense)

    def _attach(self, defense: Defense) -> None:
        settled, found = settle(defense, self.model)
        self.defense = defense.check_settled(settled, self.model)
        for kind, sites in found.items():
            spec = self.defense.specs[kind]
            # AAA post-processes the logits; SINAI-selective mixes exact and approximate conv outputs
            hook = _Injector
            if isinstance(spec, AAASpec):
                hook = AAAHook
            elif isinstance(spec, SelectiveSpec):
                hook = SelectiveHook
            for site in sites:
                injector = hook(self, site, spec)
                self._handles.append(injector.attach())
                self.sites.append(site)
                self._injectors.append(injector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            check_images(x, self.input_shape, parameter_dtype(self.model))
        if not self._noise_on or not self._injectors:
            return self.model(x)
        if self._needs_thresholds and self.recording is None:
            raise ValueError(
                "this defense uses selection='threshold': call calibrate_thresholds(clean_images) once "
                "before the first forward"
            )
        mc = self.defense.mc
        if mc == 1 or self.recording is not None:
            return self._noisy_pass(x)
        # The deployed rule of Defense.mc: log of the mean softmax of mc noisy passes (one after the
        # other, each with fresh noise from this model's generator), differentiable.
        logp = [self._noisy_pass(x) for _ in range(mc)]
        dtype = logp[0].dtype
        stacked = torch.stack([p.float().log_softmax(-1) for p in logp])
        return (stacked.logsumexp(0) - math.log(mc)).to(dtype)

    def _noisy_pass(self, x: torch.Tensor) -> torch.Tensor:
        for injector in self._injectors:
            injector.calls = 0
        self.active = True
        try:
            return self.model(x)
        finally:
            self.active = False

    @property
    def _needs_thresholds(self) -> bool:
        return (
            any(
                isinstance(i.spec, NoiseSpec) and i.spec.selection == "threshold" and i.spec.ratio < 1
                for i in self._injectors
            )
            and not self._thresholds
        )

    @contextmanager
    def clean(self) -> Iterator[DefendedModel]:
        """Within this context the forward is the undefended model's, exactly."""
        previous, self._noise_on = self._noise_on, False
        try:
            yield self
        finally:
            self._noise_on = previous

    @contextmanager
    def straight_through(self) -> Iterator[DefendedModel]:
        """Within this context the defense's non-differentiable steps (``Defense.non_smooth``) keep their
        forward but pass the gradient straight through, as the identity: BPDA (Athalye et al. 2018)."""
        if not self.defense.non_smooth:
            raise ValueError(
                f"BPDA has nothing to bypass in {self.defense.describe()}: every step of its forward is "
                "differentiable (noise is attacked with EOT); it applies to defenses with non-smooth "
                "steps such as AAA"
            )
        previous, self.bpda = self.bpda, True
        try:
            yield self
        finally:
            self.bpda = previous

    def reseed(self, seed: int | None = None) -> None:
        """Restart the noise stream from ``seed`` (``None``: fresh OS entropy)."""
        self._generators.reseed(check_seed(seed))

    def generator(self, device: torch.device) -> torch.Generator:
        """This model's generator on ``device``, created on first use (noise is drawn where the tensor is)."""
        return self._generators(device)

    def noise(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor, std: float) -> torch.Tensor:
        """Fresh N(0, std^2) noise of ``shape`` on ``like``'s device, from this model's generator.

        On CPU without autograd it is drawn into a buffer shared by all sites of that shape: every
        site consumes its noise before the next site draws, and a fresh large CPU tensor costs about
        as much in page faults as drawing the noise. CUDA's caching allocator needs no such help, and
        with autograd on a new tensor keeps the saved tensors of earlier graphs intact.
        """
        gen = self.generator(like.device)
        if like.device.type != "cpu" or torch.is_grad_enabled():
            return torch.empty(shape, device=like.device, dtype=like.dtype).normal_(0.0, std, generator=gen)
        key = (tuple(shape), like.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype)
        if fastnoise.supports(buf):
            return fastnoise.fill(buf, std, gen)
        return buf.normal_(0.0, std, generator=gen)

    def threshold(self, site_name: str, call: int) -> float:
        try:
            return self._thresholds[(site_name, call)]
        except KeyError:
            raise ValueError(
                f"no calibrated threshold for site {site_name!r} call {call}; "
                "re-run calibrate_thresholds on images of the same shape"
            ) from None

    @torch.no_grad()
    def calibrate_thresholds(
        self, images: torch.Tensor, *, batch_size: int = 256
    ) -> dict[tuple[str, int], float]:
        """Fix, per selective site, the value below which logits get noise (``selection='threshold'``).

        The threshold is the mean over clean ``images`` of each sample's ``ceil(ratio * n)``-th smallest
        logit, so the noised share is ``ratio`` on average without a per-forward selection.
        """
        self.recording = {}
        try:
            for start in range(0, len(images), batch_size):
                self.forward(images[start : start + batch_size])
            recorded = self.recording
        finally:
            self.recording = None
        self._thresholds = {key: sum(v) / len(v) for key, v in recorded.items()}
        return dict(self._thresholds)

    def remove(self) -> None:
        """Detach the hooks from the wrapped model (the model is left exactly as before ``protect``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._injectors.clear()
        self.sites.clear()

    def __enter__(self) -> DefendedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"defense={self.defense.describe()}, sites={len(self.sites)}"


def check_seed(seed: object) -> int | None:
    """``seed`` if it is ``None`` (OS entropy) or an integer in [0, 2**64); else a one-line error."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentTypeError(
            f"seed must be an integer >= 0 (or None: fresh OS entropy), "
            f"got {seed!r:.60} ({type(seed).__name__})"
        )
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64) (or None: fresh OS entropy), got {seed}")
    return int(seed)


def protect(
    model: nn.Module,
    defense: Defense | str,
    *,
    seed: int | None = None,
    validate: bool = True,
    calibration_images: torch.Tensor | None = None,
) -> DefendedModel:
    """Wrap ``model`` with ``defense`` (a :class:`Defense` or its text form, e.g. ``"RND:std=0.02"``).

    ``calibration_images`` calibrates the thresholds of ``selection='threshold'`` specs right away.
    """
    if isinstance(defense, str):
        defense = parse_defense(defense)
    defended = DefendedModel(model, defense, seed=seed, validate=validate)
    if calibration_images is not None and not isinstance(calibration_images, torch.Tensor):
        raise ArgumentTypeError(
            f"calibration_images must be a tensor, got {type(calibration_images).__name__}"
        )
    if calibration_images is not None:
        defended.calibrate_thresholds(calibration_images)
    return defended


def site_counts(defended: DefendedModel) -> dict[str, int]:
    """How many sites of each kind carry noise."""
    counts: dict[str, int] = {}
    for site in defended.sites:
        counts[site.kind] = counts.get(site.kind, 0) + 1
    return counts


__all__: Sequence[str] = [
    "DefendedModel",
    "protect",
    "selected_count",
    "smallest_indices",
    "smallest_mask",
    "site_counts",
]
