"""The same FastAPI app under Ray Serve: ``sinai serve --replicas N`` or ``serve run``.

Ray Serve runs a deployment as ``num_replicas`` actors (processes) behind its HTTP proxy; an ingress
deployment hands every HTTP request to an ASGI app (``@serve.ingress``). Each replica builds its own
:func:`~sinai.serving.app.create_app` when it starts (the app holds the model, its batcher's thread
and asyncio state, so it is built in the replica rather than pickled), so one machine's server becomes a
cluster's without new code: the replicas may sit on any node of the Ray cluster.

What is per replica (in memory, not shared): key usage (budgets and rate buckets), stateful detection
histories and bans, ``/metrics`` counters. With N replicas and Ray's default routing a key can use up to
about N times its budget and rate, and an attack whose queries are spread over replicas is matched
against each replica's share of its history only. Dynamic batching groups the requests of one replica.

    serve run sinai.serving.replicas:build_app model=mnist-cnn defense=RND:std=0.05 replicas=2
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import ServeConfig


def deployment(
    config: ServeConfig, *, replicas: int = 1, num_cpus: float = 1.0, model: nn.Module | None = None
) -> Any:
    """The Ray Serve application (``serve.Application``) of ``config`` with ``replicas`` replicas of
    ``num_cpus`` CPUs each; ``model``: an already loaded classifier (pickled to every replica) instead of
    loading ``config.model`` in each."""
    from ray import serve

    if not isinstance(config, ServeConfig):
        raise TypeError(f"config must be a ServeConfig, got {config!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a number of replicas >= 1, got {replicas!r}")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"num_cpus must be CPUs per replica > 0, got {num_cpus!r}")

    def build() -> Any:  # runs in each replica when it starts
        from sinai.serving.app import create_app

        return create_app(config, model=model)

    ingress = serve.ingress(build)()
    return serve.deployment(
        ingress, name="sinai", num_replicas=replicas, ray_actor_options={"num_cpus": float(num_cpus)}
    ).bind()


def build_app(args: dict[str, str]) -> Any:
    """Application builder for ``serve run sinai.serving.replicas:build_app key=value ...``: the keys are
    :class:`ServeConfig` fields (``model``, ``defense``, ``output``, ``api_keys``, ``detect``, ...) plus
    ``replicas`` and ``num_cpus``; ``host``/``port`` are Ray Serve's (``serve run --host/--port``)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_cpus = float(args.pop("num_cpus", 1.0))
    fields = ServeConfig.__dataclass_fields__
    unknown = sorted(set(args) - {k for k, f in fields.items() if f.init})
    if unknown:
        raise ValueError(f"unknown sinai serve options {unknown}; valid: {sorted(k for k in fields)}")
    typed: dict[str, Any] = {}
    for key, value in args.items():
        kind = fields[key].type
        if key in ("batching", "insecure"):
            typed[key] = str(value).lower() in ("1", "true", "yes", "on")
        elif "int" in str(kind) and "str" not in str(kind):
            typed[key] = int(value)
        elif "float" in str(kind):
            typed[key] = float(value)
        else:
            typed[key] = value
    return deployment(ServeConfig(**typed), replicas=replicas, num_cpus=num_cpus)


def run(config: ServeConfig, *, replicas: int, num_cpus: float = 1.0, address: str | None = None) -> None:
    """Start (or join, with ``address``) a Ray cluster and serve ``config`` with ``replicas`` replicas on
    ``config.host:config.port`` until interrupted."""
    import signal

    import ray
    from ray import serve

    app = deployment(config, replicas=replicas, num_cpus=num_cpus)
    if address is None:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1" if _loopback(config) else None)
    else:
        ray.init(address=address)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # SIGTERM, like Ctrl-C: take the application down cleanly
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name="sinai", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:
            serve.shutdown()  # our own local instance: stop Serve and Ray
        else:
            serve.delete("sinai")  # a shared cluster: remove only this application
        ray.shutdown()


def _loopback(config: ServeConfig) -> bool:
    from .config import is_loopback

    return is_loopback(config.host)
