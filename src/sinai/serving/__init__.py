"""Serving a defended model behind an HTTP API (``sinai serve``) and attacking any such endpoint.

:func:`create_app` builds the FastAPI app from a :class:`ServeConfig`; :class:`ServerThread` runs it on
a free loopback port; :class:`~sinai.serving.remote.RemoteModel` is an ``nn.Module`` whose forward is
an HTTP call, so the Oracle and every query attack run against an endpoint unchanged.
"""

from .app import create_app
from .config import OUTPUTS, ServeConfig, is_loopback
from .detect import POLICIES, Blacklight, Detector
from .keys import add_key, hash_key, read_keys, remove_key
from .server import ServerThread, serve

__all__ = [
    "OUTPUTS",
    "POLICIES",
    "Blacklight",
    "Detector",
    "ServeConfig",
    "ServerThread",
    "add_key",
    "create_app",
    "hash_key",
    "is_loopback",
    "read_keys",
    "remove_key",
    "serve",
]
