"""Where trained embedded models live: a user cache directory, overridable by flag or environment."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "SINAI_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Return (and create) the cache dir: ``override``, else ``$SINAI_CACHE_DIR``, else the user cache."""
    path = Path(override or os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("sinai"))
    path.mkdir(parents=True, exist_ok=True)
    return path
