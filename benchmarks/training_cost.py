"""docs/trained-defenses.md: the training cost of each defense next to plain training and PGD-AT.

Trains the registered recipes once each, one after the other in this process on one torch thread
(nothing cached, the caller's cache untouched, except that SINAI-selective loads its cached PGD-AT base),
and prints CPU and wall seconds and the ratio of CPU seconds to plain training of mnist-cnn (CPU time
moves less than wall time when other jobs share the cores). Seed 004
Table 8 puts adversarial training at 6.5-7.5x the cost of MFDV-SNN's; SINAI-selective starts from the
PGD-AT model, so its own cost is added to PGD-AT's.
"""

import time

import torch

from sinai.models.embedded import train_embedded

torch.set_num_threads(1)
seconds = {}
for name in ("mnist-cnn", "mnist-cnn-mfdv", "mnist-cnn-selective", "mnist-cnn-at"):
    start, cpu = time.perf_counter(), time.process_time()
    _, metrics = train_embedded(name, progress=False)
    seconds[name] = time.process_time() - cpu
    wall = time.perf_counter() - start
    accuracy = metrics["test_accuracy"]
    print(
        f"{name:22s} {seconds[name]:7.1f} CPU s {wall:7.1f} wall s  test accuracy {accuracy:.1%}", flush=True
    )
plain = seconds["mnist-cnn"]
for name, s in seconds.items():
    print(f"{name:22s} {s / plain:5.2f}x plain training (CPU time)")
total = seconds["mnist-cnn-at"] + seconds["mnist-cnn-selective"]
print(f"SINAI-selective including its PGD-AT base: {total:.1f} CPU s, {total / plain:.2f}x plain")
print(f"PGD-AT / MFDV-SNN: {seconds['mnist-cnn-at'] / seconds['mnist-cnn-mfdv']:.2f}x")
