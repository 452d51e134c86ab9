"""Model-work timings for the pipeline-overhead benchmark (`make bench`, P5).

Stages wrap their model compute (training steps, validation and evaluation decoding, building the model) in
`model_work(label)`, and each stage command records its whole process time (interpreter start-up and imports
included) as "process <stage>". When the environment variable NOISYROLLOUT_TIMINGS names a file, each record
appends one JSON line {"label", "seconds"} to it; otherwise nothing is written. Everything a `dvc repro` spends outside these blocks
(process start-up, imports, DVC, data preparation, the GX gate, MLflow, the registry, Ray start-up, checkpoints)
is the pipeline's overhead; `overhead(label)` names the larger pieces of it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Iterator

ENV = "NOISYROLLOUT_TIMINGS"


def record(label: str, seconds: float) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"label": label, "seconds": seconds}) + "\n")


@contextmanager
def model_work(label: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        record(label, time.perf_counter() - start)


@contextmanager
def overhead(label: str) -> Iterator[None]:
    """A named piece of the overhead (starting learners, checkpoints, MLflow, ...), recorded as "overhead <label>"
    so that the benchmark can say where the time outside model work goes."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record(f"overhead {label}", time.perf_counter() - start)


def record_process(stage: str) -> None:
    """The seconds since this process started (as the OS saw it), as "process <stage>"."""
    if os.environ.get(ENV):
        import psutil

        record(f"process {stage}", time.time() - psutil.Process().create_time())
