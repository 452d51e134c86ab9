"""What every stage shares: loading the parameters, the one-line errors, and where its reports go.

A stage writes its small metrics (`<name>.json`) and plot data to `reports/` (what `dvc metrics show` and `dvc
plots` read) only when it runs with the DAG's own parameters, `params.yaml` as it is. A run with `-S` overrides, a
recipe or another parameters file is an ad-hoc run: its reports go beside its own outputs (`<output dir>/reports/`),
so it never overwrites what the DAG recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from noisyrollout.config import Params, load_params
from noisyrollout.files import write_json
from noisyrollout.errors import NoisyRolloutError

Log = Callable[[str], None]
DAG_PARAMS = Path("params.yaml")


def set_threads(params: Params) -> None:
    import torch   # here, not at the top: the stages without a model (prepare, validate, register, promote) skip it

    torch.set_num_threads(params.threads)


def write_report(reports: Path, name: str, payload: dict[str, Any]) -> Path:
    """`<reports>/<name>.json`: a stage's small metrics file (`dvc metrics show` reads the DAG's)."""
    return write_json(Path(reports) / f"{name}.json", payload, sort_keys=True)


VALIDATED = "validated.json"   # in gate.docs_dir: the SHA-256 of each table the gate passed


def table_hashes(params: Params, splits: list[str]) -> dict[str, str]:
    """{split: SHA-256 of `<data.prepared_dir>/<split>.parquet`} for the splits that exist."""
    import hashlib

    out = {}
    for split in splits:
        table = Path(params.data.prepared_dir) / f"{split}.parquet"
        if table.is_file():
            h = hashlib.sha256()
            with table.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            out[split] = h.hexdigest()
    return out


def require_valid_data(params: Params, adhoc: bool = False) -> None:
    """Training never starts on data the gate failed: refuse when the last `validate` recorded a failure (an ad-hoc
    run's own gate record first, then the DAG's), or when the tables changed since it passed them (`prepare` ran
    again without `validate`)."""
    records = [reports_for(params, Path(params.gate.docs_dir), True)] if adhoc else []
    record = next((r / "gate.json" for r in [*records, Path(params.reports_dir)] if (r / "gate.json").is_file()), None)
    if record is None:
        return
    again = "fix the data, then run `noisyrollout prepare` and `noisyrollout validate` (or `dvc repro`)"
    if not json.loads(record.read_text()).get("success", False):
        raise NoisyRolloutError(f"the prepared data failed validation ({record}); {again}")
    stamp = Path(params.gate.docs_dir) / VALIDATED
    passed = json.loads(stamp.read_text()) if stamp.is_file() else {}
    changed = [s for s, digest in table_hashes(params, sorted(passed or ["train"])).items() if passed.get(s) != digest]
    if changed:
        raise NoisyRolloutError(f"the prepared {', '.join(changed)} table(s) in {params.data.prepared_dir} changed "
                                f"since the gate passed them ({stamp if stamp.is_file() else 'no record of it'}); "
                                f"run `noisyrollout validate` (or `dvc repro`)")


def reports_for(params: Params, own_dir: Path, adhoc: bool) -> Path:
    """Where a stage writes its reports: the DAG's `reports_dir`, or `<own_dir>/reports` for an ad-hoc run."""
    return Path(own_dir) / "reports" if adhoc else Path(params.reports_dir)


def is_adhoc(params_path: Path, overrides: list[str] | None, recipe: Path | None) -> bool:
    """A run with other parameters than the DAG's own (`params.yaml` as it is, no overrides, no recipe)."""
    return bool(overrides) or recipe is not None or Path(params_path).resolve() != DAG_PARAMS.resolve()


def run_stage(stage: Callable[..., Any], params_path: Path = DAG_PARAMS, overrides: list[str] | None = None,
              recipe: Path | None = None, **kwargs: Any) -> Any:
    """Load the parameters and call `stage(params, adhoc=..., **kwargs)`. An error a user can act on
    (`NoisyRolloutError`) is one `error: ...` line on stderr and exit code 2 (the Prefect flow does not retry it)."""
    from noisyrollout.timing import record_process

    try:
        params = load_params(params_path, overrides, recipe)
        return stage(params, adhoc=is_adhoc(params_path, overrides, recipe), **kwargs)
    except NoisyRolloutError as exc:
        red, plain = ("\033[31m", "\033[0m") if sys.stderr.isatty() else ("", "")
        print(f"{red}error: {exc}{plain}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        record_process(getattr(stage, "__name__", "stage"))
