"""The papers' evaluation protocol: one validated configuration per run, resumable result stores."""

from .clean import clean_accuracy
from .config import EvalConfig
from .protocol import EvalResult, evaluate
from .store import ImageResult, ResultStore

__all__ = ["EvalConfig", "EvalResult", "ImageResult", "ResultStore", "clean_accuracy", "evaluate"]
