"""Blacklight stateful detection on MNIST: tune its parameters, then measure it on a real server.

    OMP_NUM_THREADS=1 python benchmarks/blacklight.py --tune     # offline grid (docs/serving.md)
    OMP_NUM_THREADS=1 python benchmarks/blacklight.py            # a loopback server, the final figures

``--tune`` records each attack's query stream against the local model (one Oracle per image, so a
stream is one image's queries in order), fingerprints the benign streams and the attack streams with
every parameter setting of the grid, and prints, per setting and threshold, the false-positive rate on
the benign streams and the queries until the first flag of each attack.

Without ``--tune``: ``sinai serve`` (in a thread, on a free loopback port, ``--detect blacklight
--detect-policy flag``, one API key per stream) answers the benign streams and the attacks, sent through
``RemoteModel`` and the Oracle; the figures come from the server's own ``GET /v1/usage`` (images
inspected, flagged, the query number of the first flag). Then the same with a noisy defense.

Benign streams (the embedded MNIST test split, 1000 images): ``distinct``, every image once;
``varied``, every image once after a random natural variation (a shift of up to 2 pixels, brightness
x0.7-1.3 clipped, or both); ``pairs``: every image followed by a variation of itself (near duplicates:
Blacklight is meant to flag these, it is reported, not counted as a false positive).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sinai.attacks import QueryRules, ThreatModel, make_attack
from sinai.attacks.oracle import Oracle
from sinai.evaluation.defaults import default_attack_args, default_eps
from sinai.models.data import mnist, select_images
from sinai.models.zoo import load_model
from sinai.serving import ServeConfig, ServerThread, add_key, create_app
from sinai.serving.client import NPY_HEADERS, npy_bytes, sync_client
from sinai.serving.detect import Blacklight, ClientHistory
from sinai.serving.remote import RemoteModel

ATTACKS = ("square", "signhunter", "nes", "bandits", "simba", "rays", "signflip", "hsja")


# ------------------------------------------------------------------------------------- benign streams
def variation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A natural variation of one (1, 28, 28) image: a shift of 1-2 pixels, a brightness change, or both."""
    kind = rng.integers(3)
    out = image
    if kind in (0, 2):
        dy, dx = rng.integers(-2, 3, size=2)
        if dy == 0 and dx == 0:
            dx = 1
        out = np.roll(out, (int(dy), int(dx)), axis=(1, 2))
    if kind in (1, 2):
        out = np.clip(out * rng.uniform(0.7, 1.3), 0.0, 1.0)
    return out.astype(np.float32)


def benign_streams(seed: int = 0) -> dict[str, np.ndarray]:
    data = mnist("test")
    x = data.load(list(range(len(data.labels)))).numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x = x[order]
    varied = np.stack([variation(im, rng) for im in x])
    pairs = np.stack([v for im in x[:500] for v in (im, variation(im, rng))])
    return {"distinct": x, "varied": varied, "pairs": pairs}


# ------------------------------------------------------------------------------------- attack streams
class Recorder(nn.Module):
    """Wraps a model and keeps every image it is asked about, in order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes = model, model.num_classes
        self.input_shape = model.input_shape
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().cpu().numpy().astype(np.float32))
        return self.model(x)


def attack_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = mnist("test")
    chosen = select_images(data.labels, 10, seed, data.num_classes)[:n]  # the first n of 10 classes
    return data.load(chosen), data.labels[chosen]


def run_attack(model: nn.Module, name: str, x, y, *, budget: int, votes: int, seed: int) -> Oracle:
    attack = make_attack(name, **default_attack_args(name, "mnist", "linf"))
    oracle = Oracle(
        model, x, y, threat=ThreatModel("linf", default_eps("mnist-cnn", "mnist", "linf")),
        rules=QueryRules(budget=budget, votes=votes), batch_size=256,
        output="labels" if attack.kind == "decision" else "scores",
    )  # fmt: skip
    attack(oracle, seed=seed)
    return oracle


def record_streams(model: nn.Module, *, images: int, budget: int) -> dict[str, list[np.ndarray]]:
    x, y = attack_images(images)
    streams: dict[str, list[np.ndarray]] = {}
    for name in ATTACKS:
        streams[name] = []
        for i in range(len(x)):
            rec = Recorder(model)
            run_attack(rec, name, x[i : i + 1], y[i : i + 1], budget=budget, votes=0, seed=i)
            streams[name].append(np.concatenate(rec.seen))
        lengths = [len(s) for s in streams[name]]
        print(f"recorded {name}: {lengths} queries", file=sys.stderr, flush=True)
    return streams


# ------------------------------------------------------------------------------------------- tuning
def best_matches(params: Blacklight, stream: np.ndarray) -> np.ndarray:
    """The best match of every query of ``stream`` against the earlier ones (one client)."""
    history, out = ClientHistory(), []
    for i, image in enumerate(stream):
        fp = params.fingerprint(image)
        out.append(history.best_match(fp))
        history.remember(i, fp, params.history)
    return np.array(out)


def first_at(matches: np.ndarray, match: int) -> int | None:
    hits = np.nonzero(matches >= match)[0]
    return int(hits[0]) + 1 if len(hits) else None


GRID = [(quant, window, hashes) for quant in (50, 25) for window in (20, 28, 42, 56) for hashes in (20, 50)]
LONG = 20
"""Streams of at least this many queries count for detection (shorter ones: the attack had already
succeeded, before any detector could have seen two similar queries)."""


def tune(args: argparse.Namespace) -> None:
    model = load_model("mnist-cnn").eval()
    benign = benign_streams()
    t = time.perf_counter()
    streams = record_streams(model, images=args.images, budget=args.budget)
    print(f"recording took {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for quant, window, hashes in GRID:
        params = Blacklight(quant=quant, window=window, hashes=hashes, match=1)
        b = {k: best_matches(params, v) for k, v in benign.items()}
        a = {k: [best_matches(params, s) for s in v if len(s) >= LONG] for k, v in streams.items()}
        for match in range(max(2, hashes // 10), hashes + 1, max(1, hashes // 10)):
            fp = {k: float((m >= match).mean()) for k, m in b.items() if k != "pairs"}
            dup = float((b["pairs"][1::2] >= match).mean())
            firsts = {k: [first_at(m, match) for m in v] for k, v in a.items()}
            found = [f for v in firsts.values() for f in v if f is not None]
            total = sum(len(v) for v in firsts.values())
            per = {k: "/".join(str(f) if f else "-" for f in v) for k, v in firsts.items()}
            rows.append(dict(quant=quant, window=window, hashes=hashes, match=match, fp=fp, dup=dup,
                             detected=len(found), streams=total, firsts=firsts))  # fmt: skip
            print(
                f"q={quant} w={window} n={hashes} match={match}: fp distinct {fp['distinct']:.4f} varied "
                f"{fp['varied']:.4f} dup {dup:.2f} | long streams detected {len(found)}/{total}, median "
                f"{np.median(found) if found else '-'} max {max(found, default='-')} | "
                + " ".join(f"{k}={v}" for k, v in per.items()),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


# ------------------------------------------------------------------------------------- live server
def usage(url: str, key: str) -> dict:
    with sync_client(url, api_key=key) as c:
        return c.get("/v1/usage").json()["detection"]


def send_stream(url: str, key: str, stream: np.ndarray, batch: int = 50) -> None:
    with sync_client(url, api_key=key) as c:
        for i in range(0, len(stream), batch):
            r = c.post("/v1/predict", content=npy_bytes(stream[i : i + batch]), headers=NPY_HEADERS)
            r.raise_for_status()


def live(args: argparse.Namespace, defense: str, votes: int) -> dict:
    model = load_model("mnist-cnn").eval()
    benign = benign_streams()
    x, y = attack_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.json"
        names = [*benign, *(f"{a}-{i}" for a in ATTACKS for i in range(len(x)))]
        keys = {n: add_key(path, n) for n in names}
        config = ServeConfig(
            defense=defense, api_keys=str(path), detect="blacklight", detect_policy="flag", max_batch=256
        )
        server = ServerThread(create_app(config, model=copy.deepcopy(model))).start()
        try:
            detector = server.app.state.sinai.detector
            print(f"{defense}: {detector.params.describe()}", file=sys.stderr)
            result: dict = {
                "defense": defense,
                "detector": detector.params.describe(),
                "benign": {},
                "attacks": {},
            }
            for name, stream in benign.items():
                t = time.perf_counter()
                send_stream(server.url, keys[name], stream)
                u = usage(server.url, keys[name])
                result["benign"][name] = u
                print(f"  benign {name}: {u['flagged']}/{u['inspected']} flagged "
                      f"({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
            for attack in ATTACKS:
                runs = []
                for i in range(len(x)):
                    key = keys[f"{attack}-{i}"]
                    remote = RemoteModel(server.url, api_key=key)
                    oracle = run_attack(remote, attack, x[i : i + 1], y[i : i + 1], budget=args.budget,
                                        votes=votes, seed=i)  # fmt: skip
                    u = usage(server.url, key)
                    runs.append({**u, "success": bool(oracle.success.item()),
                                 "success_at": int(oracle.success_at.item())})  # fmt: skip
                    remote.close()
                result["attacks"][attack] = runs
                firsts = [r["first_flagged_query"] for r in runs]
                print(f"  {attack}: first flagged at {firsts}, flagged "
                      f"{sum(r['flagged'] for r in runs)}/{sum(r['inspected'] for r in runs)}, "
                      f"successes {[r['success_at'] if r['success'] else None for r in runs]}",
                      file=sys.stderr, flush=True)  # fmt: skip
            metrics = sync_client(server.url).get("/metrics").text
            result["metrics"] = [v for v in metrics.splitlines() if v.startswith("sinai_detect")]
        finally:
            server.stop()
    return result


def table(result: dict) -> str:
    lines = [f"`{result['defense']}`, {result['detector']}", "", "| stream | flagged / sent | rate |",
             "|---|---:|---:|"]  # fmt: skip
    for name, u in result["benign"].items():
        sent = u["inspected"] // 2 if name == "pairs" else u["inspected"]  # pairs: only variants can match
        label = "near duplicates (an image, then a variation of it): variants" if name == "pairs" else name
        lines.append(f"| benign {label} | {u['flagged']} / {sent} | {u['flagged'] / sent:.2%} |")
    lines += ["", "| attack | first flagged query per image | median | flagged / sent | successes (query) |",
              "|---|---|---:|---:|---|"]  # fmt: skip
    for attack, runs in result["attacks"].items():
        firsts = [r["first_flagged_query"] for r in runs]
        known = [f for f in firsts if f is not None]
        med = f"{np.median(known):g}" if len(known) == len(firsts) else "-"
        succ = ", ".join(str(r["success_at"]) if r["success"] else "-" for r in runs)
        lines.append(
            f"| {attack} | {', '.join(str(f) if f else 'never' for f in firsts)} | {med} | "
            f"{sum(r['flagged'] for r in runs)} / {sum(r['inspected'] for r in runs)} | {succ} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tune", action="store_true", help="the offline parameter grid")
    parser.add_argument("--images", type=int, default=5, help="attacked images per attack")
    parser.add_argument("--budget", type=int, default=500, help="counted queries per image")
    parser.add_argument("--noise", default="RND:std=0.05", help="the noisy defense of the second run")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--render", default=None, help="print the tables of an earlier run's --json file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tune:
        tune(args)
        return
    if args.render:  # print the tables of an earlier run's --json
        for r in json.loads(Path(args.render).read_text()):
            print(table(r), end="\n\n")
        return
    results = [live(args, "none", votes=0), live(args, args.noise, votes=9)]
    for r in results:
        print(table(r), end="\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
