"""A model for the sweep tests, registered as ``sweep-cnn``: the embedded CNN's architecture with the
weights of the ``checkpoint`` the plan names (the session's short-trained CNN, saved by the tests), so
that every worker process — spawned or Ray — loads exactly the same model in well under a second.
Plans import this module (``imports = ["test_sweep_models"]``); it holds no tests."""

from __future__ import annotations

import torch

from sinai.models.zoo import list_models, register_model

if "sweep-cnn" not in list_models():

    @register_model("sweep-cnn", dataset="mnist")
    def _sweep_cnn(arch, *, checkpoint, weights, num_classes, device, cache_dir, progress):  # noqa: ANN001, ANN202
        from sinai.models.embedded import EMBEDDED

        if checkpoint is None:
            raise ValueError("sweep-cnn needs a checkpoint (the tests save one)")
        model = EMBEDDED["mnist-cnn"].arch()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return model
