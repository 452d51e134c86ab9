"""Result files as a reader expects them: strict JSON (nan and inf are written as null, which every JSON parser
reads), written atomically (a temporary file renamed into place, so a reader never sees half a file)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable


def strict(value: Any) -> Any:
    """`value` with every non-finite float (nan, inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(payload: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """Strict JSON text of `payload` (`default` converts what json cannot, as in `json.dumps`)."""
    if default is not None:   # convert first, so that what `default` returns is made strict too
        payload = json.loads(json.dumps(payload, default=default))
    return json.dumps(strict(payload), allow_nan=False, **kwargs)


def write_json(path: Path, payload: Any, *, default: Callable[[Any], Any] | None = None, indent: int | None = 2,
               sort_keys: bool = False) -> Path:
    """Write `payload` to `path` as strict JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(payload, default=default, ensure_ascii=False, indent=indent, sort_keys=sort_keys) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    return path


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure to `path` (its folder made), laid out tight; the figure is closed afterwards."""
    try:
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
