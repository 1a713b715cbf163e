"""``ServeConfig``: every setting of ``sinai serve``, checked once, where it enters.

The setting is the papers' MLaaS threat model (RFD section 3, SINAI section 3): the defender runs the
noise on every query, the attacker only sends queries and sees what the output policy allows.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import check_count, check_positive
from ..defenses import Defense, parse_defense
from .detect import POLICIES, Blacklight

OUTPUTS = ("probs", "logits", "labels", "topk")
"""What ``POST /v1/predict`` answers: probabilities, raw logits, the top-1 label, or the top-k
(class, probability) pairs."""

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The settings of one server.

    ``model``: a model name of :func:`~sinai.models.zoo.load_model` (with ``checkpoint``, ``weights``,
    ``num_classes``, ``cache_dir``, ``device``). ``defense``: a :class:`Defense` or its text form; its
    noise is drawn from OS entropy on every forward. ``output``: the output policy (:data:`OUTPUTS`),
    ``topk`` its k. ``max_batch``: images per request; ``max_bytes``: request body size.
    ``batching``: group concurrent requests into one forward of at most ``max_batch_forward`` images,
    waiting at most ``batch_wait_ms`` for more once a request is queued. ``api_keys``: the key file
    (see :mod:`sinai.serving.keys`); without one, only a loopback ``host`` is allowed unless
    ``insecure``.
    """

    model: str = "mnist-cnn"
    defense: Defense | str = "none"
    host: str = "127.0.0.1"
    port: int = 8000
    output: str = "probs"
    topk: int = 5
    max_batch: int = 256
    max_bytes: int = 32 * 2**20
    batching: bool = True
    batch_wait_ms: float = 2.0
    max_batch_forward: int = 256
    api_keys: str | None = None
    insecure: bool = False
    device: str = "cpu"
    cache_dir: str | None = None
    checkpoint: str | None = None
    weights: str = "pretrained"
    num_classes: int | None = None
    log_level: str = "warning"
    detect: Blacklight | str | None = None
    detect_policy: str = "flag"
    defense_text: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a model name such as mnist-cnn, got {self.model!r}")
        defense = parse_defense(self.defense) if isinstance(self.defense, str) else self.defense
        if not isinstance(defense, Defense):
            raise TypeError(f"defense must be a Defense or its text form, got {self.defense!r}")
        object.__setattr__(self, "defense", defense)
        object.__setattr__(self, "defense_text", defense.describe())
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be an address such as 127.0.0.1, got {self.host!r}")
        check_count("port", self.port, 0, "TCP port; 0 = any free port")
        if self.port > 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        check_count("topk", self.topk, 1, "classes answered under output=topk")
        check_count("max_batch", self.max_batch, 1, "images per request")
        check_count("max_bytes", self.max_bytes, 1024, "bytes per request body")
        check_count("max_batch_forward", self.max_batch_forward, 1, "images per forward")
        object.__setattr__(self, "batching", bool(self.batching))
        if isinstance(self.batch_wait_ms, bool) or not isinstance(self.batch_wait_ms, (int, float)):
            raise ValueError(
                f"batch_wait_ms must be a number of milliseconds >= 0, got {self.batch_wait_ms!r}"
            )
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms must be in [0, 10000] ms, got {self.batch_wait_ms!r}")
        if self.api_keys is not None:
            path = Path(self.api_keys).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"API key file {path} does not exist; create it with `sinai serve keys add --file {path} "
                    "--name NAME`"
                )
            object.__setattr__(self, "api_keys", str(path))
        object.__setattr__(self, "insecure", bool(self.insecure))
        if self.api_keys is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on non-loopback address {self.host} without API keys: pass --api-keys "
                "FILE (see `sinai serve keys add`), or --insecure to serve anyone who can reach it"
            )
        if isinstance(self.detect, str):
            text = self.detect.strip()
            object.__setattr__(
                self, "detect", None if text.lower() in ("", "none") else Blacklight.parse(text)
            )
        if self.detect is not None and not isinstance(self.detect, Blacklight):
            raise ValueError(f"detect must be 'blacklight[:options]' or None, got {self.detect!r}")
        if self.detect_policy not in POLICIES:
            raise ValueError(
                f"detect_policy must be one of {', '.join(POLICIES)}, got {self.detect_policy!r}"
            )
        if self.num_classes is not None:
            check_positive("num_classes", self.num_classes, integer=True)

    @property
    def auth(self) -> bool:
        """Whether requests need an API key."""
        return self.api_keys is not None
