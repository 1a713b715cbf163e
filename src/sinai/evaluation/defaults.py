"""Default threat models per dataset and model, from the papers (SINAI App. B, RFD App. D.3)."""

from __future__ import annotations

MNIST_EPS = {"linf": 0.3, "l2": 3.0}
"""Embedded MNIST default: the usual MNIST linf budget (0.3); l2 3.0. Chosen so that the undefended
embedded models keep < 10% robust accuracy at 10k Square queries (see README, "Threat models")."""


def default_eps(model_name: str, dataset: str, norm: str) -> float:
    """eps in [0, 1] pixel units: linf 0.05 (CIFAR-10, ImageNet CNNs), 0.2 (ImageNet ViT/DeiT); l2 5."""
    if dataset == "mnist":
        return MNIST_EPS[norm]
    if norm == "l2":
        return 5.0
    transformer = any(t in model_name.lower() for t in ("vit", "deit"))
    return 0.2 if dataset == "imagenet" and transformer else 0.05
