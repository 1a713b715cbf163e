"""sinai: inference-time noise defenses against query-based black-box attacks.

``protect(model, defense)`` adds noise at the model's sites; ``load_model`` / ``load_dataset`` give
models on [0, 1] images and labelled image sets; ``clean_accuracy`` measures the cost of the noise;
``attack(name, model, x, y, eps=..., budget=...)`` runs one attack through the Oracle; ``evaluate`` the
papers' protocol.
"""

__version__ = "0.1.0"

import os  # noqa: E402

# OpenMP threads (torch's intra-op pool) spin for ~5 ms after every parallel region by default, and on a
# small CPU they then steal the cores the compiled noise kernels run on (sinai.defenses.fastnoise):
# 10000 spins keep the hand-off between torch ops fast and end the spinning well before. Read once, when
# torch is first imported; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .attacks.api import AttackResult, attack  # noqa: E402
from .attacks.threat import ThreatModel  # noqa: E402
from .defenses import DefendedModel, Defense, NoiseSpec, find_sites, parse_defense, preset, protect  # noqa: E402
from .evaluation.clean import clean_accuracy  # noqa: E402
from .evaluation.config import EvalConfig  # noqa: E402
from .evaluation.protocol import evaluate  # noqa: E402

__all__ = [
    "AttackResult",
    "DefendedModel",
    "Defense",
    "EvalConfig",
    "NoiseSpec",
    "ThreatModel",
    "__version__",
    "attack",
    "clean_accuracy",
    "evaluate",
    "find_sites",
    "parse_defense",
    "preset",
    "protect",
]
