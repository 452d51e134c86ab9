"""Stage `prepare`: raw sources (data/, or a hub id) -> one schema, one parquet per split."""

from __future__ import annotations

from pathlib import Path

from noisyrollout.config import Params
from noisyrollout.errors import DataError
from pipelines.stages.common import Log, run_stage


def prepare(params: Params, log: Log = print, adhoc: bool = False) -> dict[str, Path]:
    """Read each source split (`data.train` / `val` / `test` / `ood`: hub id, parquet, jsonl or folder) into one schema
    (`id`, `images`, `problem`, `answer`, ...) and write `data.prepared_dir/<split>.parquet`. Rows are not judged
    here: the `validate` stage (Great Expectations) is the gate, so a bad row reaches it and is named there."""
    from noisyrollout.data.loaders import load_examples

    out = Path(params.data.prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split, (source, source_split) in params.data.sources().items():
        if Path(source).parts[:1] == ("data",) and not Path(source).exists():
            raise DataError(f"{source}: missing (data/ is versioned by data.dvc); restore it with "
                            f"`dvc pull` or `noisyrollout restore-data` (renders the embedded corpus)")
        ds = load_examples(source, split=source_split, validate=False)
        if "id" not in ds.column_names:
            ds = ds.add_column("id", [f"{split}-{i:06d}" for i in range(len(ds))])
        path = out / f"{split}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        ds.to_parquet(str(tmp))
        tmp.replace(path)
        written[split] = path
        log(f"prepare: {split} <- {source} ({source_split}): {len(ds)} rows -> {path}")
    for stale in out.glob("*.parquet"):   # a split dropped from params must not linger for later stages
        if stale.stem not in written:
            stale.unlink()
    return written


if __name__ == "__main__":
    run_stage(prepare)
