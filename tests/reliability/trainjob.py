"""A training run as its own process, for the fault tests: `python -m tests.reliability.trainjob PARAMS.json INIT_DIR`.

Exit codes as the CLI's: 0 done, 2 a NoisyRolloutError (printed as one `error: ...` line on stderr).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def toy(corpus_dir: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Toy parameters (tiny model, 4 prompts x (2 clean + 2 noisy), 8 tokens, 6 steps, a checkpoint every 2), with
    `sections` merged in."""
    base: dict[str, Any] = {
        "data": {"prepared_dir": str(corpus_dir), "min_pixels": 3136, "max_pixels": 3136},
        "rollout": {"n_clean": 2, "n_noisy": 2, "max_new_tokens": 8},
        "noise": {"distortion": "crop_fill", "alpha0": 0.2},
        "train": {"prompts_per_step": 4, "steps": 6, "lr": 1e-3, "entropy_coef": 0.01, "output_dir": str(out_dir)},
        "cluster": {"trainer": "local"},
        "checkpoint": {"every": 2, "keep_last": 2, "resume": "auto"},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def metrics(run: Path) -> list[dict[str, Any]]:
    """The per-step metrics of a run without its timings (those differ between any two runs)."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def weights(run: Path) -> str:
    """SHA-256 of the final policy's weights file."""
    return hashlib.sha256((Path(run) / "model" / "model.safetensors").read_bytes()).hexdigest()


def command(params_file: Path, init_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tests.reliability.trainjob", str(params_file), str(init_dir)]


def main(params_file: str, init_dir: str) -> int:
    from noisyrollout.config import Params
    from noisyrollout.errors import NoisyRolloutError
    from noisyrollout.train.driver import train_rl

    params = Params.model_validate(json.loads(Path(params_file).read_text()))
    try:
        train_rl(params, Path(init_dir), progress=False)
    except NoisyRolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
