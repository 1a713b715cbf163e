"""Transfer attack: adversarial images crafted on a source model, judged on the deployed target.

A noise defense derails a query attack's search; it does not remove the adversarial examples. The
attacker here crafts them where the noise cannot interfere: on the undefended model itself
(``source="base"``: leaked weights, the strongest case), on a surrogate the project trained on other
data (a model name such as ``mnist-cnn-surrogate``), or on a checkpoint of the target's architecture;
with any registered query or white-box attack (``attack``, ``attack_args``; query attacks get
``queries`` queries on the source, decided by the single query). The crafted images are then judged
on the defended target by the Oracle: one counted query per image, broken when the majority of the
deployed model's noisy passes is wrong. Those judging queries are the only queries to the target.

Crafting depends only on the source, the images, the threat and the seed, not on the defense, so a
crafted set is reused for every defense evaluated on the same images (as the demo does).
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checks import check_count
from .base import Attack, is_attack, make_attack, register_attack
from .oracle import Oracle, QueryRules

_CRAFTED: OrderedDict[tuple, tuple[object, torch.Tensor]] = OrderedDict()
_KEEP = 16  # crafted sets kept for reuse


@register_attack("transfer")
class Transfer(Attack):
    """Craft with ``attack`` (``attack_args``) on ``source``, judge on the target."""

    kind = "transfer"

    def __init__(
        self,
        *,
        source: str = "base",
        attack: str = "square",
        queries: int = 1000,
        attack_args: Mapping[str, object] | None = None,
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"source must be 'base', a model name or a checkpoint path, got {source!r}")
        self.source = source.strip()
        if self.source != "base":
            _check_source(self.source)
        if not is_attack(attack) or str(attack).lower() == "transfer":
            from .base import list_attacks

            known = ", ".join(a for a in list_attacks() if a != "transfer")
            raise ValueError(f"transfer needs an attack to craft with; choose one of {known}, got {attack!r}")
        self.attack = str(attack).lower()
        self.queries = check_count("queries", queries, 1, "queries per image to the source")
        self.attack_args = dict(attack_args or {})
        self.crafter = make_attack(self.attack, **self.attack_args)

    def check_norm(self, norm: str) -> None:  # type: ignore[override]
        """The crafting attack must be defined for ``norm``."""
        self.crafter.check_norm(norm)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        source = self._source_model(oracle)
        crafted = self._craft(source, oracle, x, y, seed)
        oracle.judge(crafted)
        return crafted

    def _source_model(self, oracle: Oracle) -> nn.Module:
        target = oracle.leaked()
        if self.source == "base":
            return target
        path = Path(self.source).expanduser()
        if path.is_file():
            return _from_checkpoint(path, target)
        from ..models.zoo import load_model

        model = load_model(self.source, device=oracle.device, progress=False)
        _check_fits(model, target, f"source model {self.source}")
        return model

    def _craft(
        self, source: nn.Module, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, seed: int
    ) -> torch.Tensor:
        digest = hashlib.sha1(x.detach().cpu().numpy().tobytes()).hexdigest()
        key = (id(source), self.source, self.attack, repr(sorted(self.attack_args.items())), self.queries,
               oracle.threat, seed, digest, tuple(y.tolist()))  # fmt: skip
        held = _CRAFTED.get(key)
        if held is not None and held[0]() is source:
            _CRAFTED.move_to_end(key)
            return held[1].clone()
        crafter = self.crafter
        rules = QueryRules(budget=self.queries, votes=0)
        source_oracle = Oracle(
            source, x, y, threat=oracle.threat, rules=rules,
            output="scores" if crafter.kind == "white-box" else crafter.output, batch_size=oracle.batch_size,
        )  # fmt: skip
        with torch.enable_grad() if crafter.gradients else torch.no_grad():
            crafted = crafter(source_oracle, seed=seed).detach()
        crafted = oracle.threat.project(crafted, x)
        _CRAFTED[key] = (weakref.ref(source), crafted)
        while len(_CRAFTED) > _KEEP:
            _CRAFTED.popitem(last=False)
        return crafted.clone()


def _check_source(source: str) -> None:
    from ..models.zoo import list_models

    names = list_models()
    family = source.partition(":")[0] + ":<name>"
    if source in names or family in names or Path(source).expanduser().is_file():
        return
    raise ValueError(
        f"transfer source {source!r} is neither 'base', a model ({', '.join(names)}) nor a checkpoint file"
    )


def _check_fits(source: nn.Module, target: nn.Module, what: str) -> None:
    for attr, label in (("num_classes", "classes"), ("input_shape", "input shape")):
        mine, theirs = getattr(source, attr, None), getattr(target, attr, None)
        if mine != theirs:
            raise ValueError(
                f"{what} has {label} {mine}, the target has {theirs}: a transfer source must match"
            )


def _from_checkpoint(path: Path, target: nn.Module) -> nn.Module:
    """The target's architecture with the weights of the state_dict in ``path``."""
    from ..models.zoo import load_checkpoint

    state = load_checkpoint(path)
    # A copy without the defense's hooks: the memo hands deepcopy empty hook tables to use instead.
    memo: dict[int, object] = {}
    for module in target.modules():
        memo[id(module._forward_pre_hooks)] = OrderedDict()
        memo[id(module._forward_hooks)] = OrderedDict()
    model = copy.deepcopy(target, memo)
    net = getattr(model, "net", model)  # a checkpoint holds the network inside sinai's ImageClassifier
    own = net.state_dict()
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state] + [k for k in state if k not in own]
    if wrong or missing:
        if wrong:
            key = wrong[0]
            detail = f"tensor {key} has shape {tuple(state[key].shape)}, the target's {tuple(own[key].shape)}"
        else:
            detail = f"key {missing[0]} is in one of them only"
        raise ValueError(
            f"source checkpoint {path} does not fit the target's architecture (its classes or input shape "
            f"differ: {detail}); use a checkpoint of the target model"
        )
    net.load_state_dict(state)
    return model.eval()
