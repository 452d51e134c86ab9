"""Stage `validate`: the Great Expectations gate (pipelines/gate.py); nothing downstream runs on data that failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noisyrollout.config import Params
from noisyrollout.errors import DataError
from noisyrollout.timing import overhead
from noisyrollout.files import write_json
from pipelines.stages.common import VALIDATED, Log, reports_for, run_stage, table_hashes, write_report


def validate(params: Params, log: Log = print, adhoc: bool = False) -> dict[str, Any]:
    """The gate over the prepared tables: required columns, non-empty answers, decodable images within the pixel
    bounds, unique ids, one `<image>` placeholder per image, problems of at most `gate.max_problem_chars`. Writes Data
    Docs to `gate.docs_dir` and `gate.json`; on failure prints which expectation failed on which rows (every one in
    `gate.docs_dir/bad_rows.csv`) and stops, so nothing downstream runs on that data."""
    from pipelines.gate import run_gate

    cfg = params.gate
    splits = [s for s in cfg.splits if s in params.data.sources()]
    with overhead("validate: GX gate + Data Docs"):
        result = run_gate(Path(params.data.prepared_dir), splits, docs_dir=Path(cfg.docs_dir),
                          min_image_pixels=cfg.min_image_pixels, max_image_pixels=cfg.max_image_pixels,
                          max_problem_chars=cfg.max_problem_chars)
    stamp = Path(cfg.docs_dir) / VALIDATED   # what passed: training refuses tables changed since (require_valid_data)
    stamp.unlink(missing_ok=True)
    write_report(reports_for(params, Path(cfg.docs_dir), adhoc), "gate", result.to_dict())
    log(result.summary())
    if result.docs_index is not None:
        log(f"validate: Data Docs at {result.docs_index}")
    if not result.success:
        failed = [s for s, r in result.splits.items() if not r["success"]]
        raise DataError(f"data validation failed on {', '.join(failed)} (details above; Data Docs in {cfg.docs_dir}); "
                        f"nothing downstream runs on this data")
    write_json(stamp, table_hashes(params, splits), sort_keys=True)
    return result.to_dict()


if __name__ == "__main__":
    run_stage(validate)
