"""One truth for parameters: params.yaml and noisyrollout/config.py agree key by key, every knob is documented, and a
bad file is reported whole (every invalid key, each on its own line)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from noisyrollout.config import ConfigError, Params, load_params, param_rows
from noisyrollout.errors import NoisyRolloutError
from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def _model_leaves(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every parameter's dotted key, from the models (a section recurses; a dict-valued field is one parameter)."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _model_leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _yaml_keys(tree: dict[str, Any], sections: set[str], prefix: str = "") -> Iterator[str]:
    """Every key of the raw YAML tree; a mapping is descended only where the models have a section."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in sections:
            yield from _yaml_keys(value, sections, f"{dotted}.")
        else:
            yield dotted


def _same(a: Any, b: Any) -> bool:
    """Equal as params.yaml means it: numbers by value (1 == 1.0), but a bool is no number; lists/dicts item-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _sections(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield f"{prefix}{name}"
            yield from _sections(field.annotation, f"{prefix}{name}.")


RAW = yaml.safe_load(PARAMS.read_text())
LEAVES = list(_model_leaves(Params))
SECTIONS = set(_sections(Params))


def test_every_field_default_equals_params_yaml_and_no_key_is_missing_or_extra():
    defaults = Params().model_dump(mode="json")
    yaml_keys = set(_yaml_keys(RAW, SECTIONS))
    missing = [k for k in LEAVES if k not in yaml_keys]
    extra = sorted(yaml_keys - set(LEAVES))
    differ = [f"{k}: params.yaml {_get(RAW, k)!r} != config.py {_get(defaults, k)!r}"
              for k in LEAVES if k in yaml_keys and not _same(_get(RAW, k), _get(defaults, k))]
    assert not missing, f"fields missing from params.yaml: {missing}"
    assert not extra, f"params.yaml keys no model has: {extra}"
    assert not differ, "defaults that disagree:\n" + "\n".join(differ)


def test_params_yaml_is_the_default_profile_after_validation_too():
    assert load_params(PARAMS) == Params()
    assert Params.model_validate(Params().model_dump(mode="json")) == Params()   # the defaults are valid values


def test_every_parameter_has_a_description_and_a_one_line_comment_in_params_yaml():
    assert [k for k, _, description in param_rows(Params()) if not description.strip()] == []
    assert [k for k, _, _ in param_rows(Params())] == LEAVES
    # a line-based reading of params.yaml: every key carries its own trailing comment, and below the header no
    # comment stands on a line of its own (what a knob does fits one line; results and diaries live in docs/)
    stack: list[tuple[int, str]] = []
    commented, orphans, body = set(), [], False
    for number, line in enumerate(PARAMS.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if body:
                orphans.append(number)
            continue
        match = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if match is None:      # a continuation line of a block scalar (model.system_prompt)
            continue
        body = True
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        stack.append((indent, key))
        if re.search(r"\s#\s*\S", rest):
            commented.add(dotted)
    assert orphans == [], f"comment-only lines in the body of params.yaml: {orphans}"
    uncommented = [k for k in [*LEAVES, *SECTIONS] if k not in commented]
    assert uncommented == [], f"params.yaml keys without a one-line comment: {uncommented}"


def test_the_gpu_recipe_validates_and_names_only_real_keys():
    recipe = ROOT / "recipes/gpu-7b.yaml"
    params = load_params(PARAMS, recipe=recipe)
    assert params.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and params.train.adam_betas == (0.9, 0.999)
    extra = set(_yaml_keys(yaml.safe_load(recipe.read_text()), SECTIONS)) - set(LEAVES)
    assert not extra


def test_a_null_anneal_coef_stays_null_and_the_schedule_resolves_it():
    noise = Params().noise
    assert noise.anneal_coef is None and noise.resolved_anneal_coef == 30.0   # sigmoid, the paper's
    assert load_params(PARAMS, ["noise.anneal=exp"]).noise.resolved_anneal_coef == 0.9
    assert load_params(PARAMS, ["noise.anneal=pow", "noise.anneal_coef=3"]).noise.resolved_anneal_coef == 3.0
    assert load_params(PARAMS, ["noise.anneal=linear"]).noise.resolved_anneal_coef is None
    assert Params().model_dump(mode="json")["noise"]["anneal_coef"] is None   # logged / fingerprinted as written


# ------------------------------------------------------------------------------------------------- bad files

BAD = ["train.lr=-1", "rollout.n_clean=x", "nosuch.key=1"]


def test_load_params_reports_every_invalid_key_one_line_each():
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, BAD)
    assert isinstance(err.value, NoisyRolloutError)
    head, *lines = str(err.value).splitlines()
    assert head == "params: 3 invalid parameters"
    assert sorted(line.split(":")[0].strip() for line in lines) == ["nosuch.key", "rollout.n_clean", "train.lr"]
    assert any("'x'" in line for line in lines if "rollout.n_clean" in line)
    # one invalid key: one line, as before
    with pytest.raises(ConfigError) as one:
        load_params(PARAMS, ["train.lr=-1"])
    assert "\n" not in str(one.value) and str(one.value).startswith("params: train.lr: ")


def test_a_misspelt_key_is_named_with_a_suggestion(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(PARAMS.read_text().replace("  lr: 1.0e-4 ", "  lrr: 1.0e-4 "))
    with pytest.raises(ConfigError, match=r"train\.lrr: not a parameter \(did you mean train\.lr\?\)"):
        load_params(bad)


def test_the_cli_prints_every_invalid_key_and_exits_2():
    result = CliRunner().invoke(app, ["params", "--params", str(PARAMS), *[x for o in BAD for x in ("-S", o)]])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    assert lines[0] == "error: params: 3 invalid parameters"
    for key in ("train.lr", "rollout.n_clean", "nosuch.key"):
        assert sum(line.strip().startswith(f"{key}: ") for line in lines) == 1, result.output


def test_a_stage_reports_the_same_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prepare", "--params", str(PARAMS), *[x for o in BAD for x in ("-S", o)]])
    assert result.exit_code == 2 and "error: params: 3 invalid parameters" in result.output, result.output
    assert all(f"  {key}: " in result.output for key in ("train.lr", "rollout.n_clean", "nosuch.key"))


# ---------------------------------------------------------------------------------------- checkpoint.resume

def test_checkpoint_resume_names_a_typo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, ["checkpoint.resume=atuo"])
    assert str(err.value) == ("params: checkpoint.resume: 'atuo' is not auto, never or an existing checkpoint folder"
                              " (did you mean auto?)")
    for ok in ("auto", "never"):
        assert load_params(PARAMS, [f"checkpoint.resume={ok}"]).checkpoint.resume == ok
    (tmp_path / "runs/rl/checkpoints/abc/step_000002").mkdir(parents=True)
    folder = "runs/rl/checkpoints/abc/step_000002"
    assert load_params(PARAMS, [f"checkpoint.resume={folder}"]).checkpoint.resume == folder
    result = CliRunner().invoke(app, ["params", "--params", str(PARAMS), "-S", "checkpoint.resume=runs/nope"])
    assert result.exit_code == 2 and "checkpoint.resume: 'runs/nope' is not auto, never" in result.output
    # a dump re-validated elsewhere (a Ray learner, another working directory) is not checked against the disk
    dumped = load_params(PARAMS, [f"checkpoint.resume={folder}"]).model_dump(mode="json")
    monkeypatch.chdir(ROOT)
    assert Params.model_validate(dumped).checkpoint.resume == folder


# ----------------------------------------------------------------------------------------- noisyrollout params

def _shown(*args: str, params: Path = PARAMS) -> dict[str, str]:
    result = CliRunner().invoke(app, ["params", "--params", str(params), *args])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(line.startswith("    ") for line in lines[1::2])   # `key = value`, then its indented description
    return dict(line.split(" = ", 1) for line in lines[0::2])


def test_noisyrollout_params_shows_the_values_in_use(tmp_path):
    shown = _shown()
    assert list(shown) == LEAVES
    assert shown["noise.distortion"] == '"crop_fill"' and shown["train.steps"] == "120"
    assert shown["sft.adam_betas"] == "[0.9, 0.99]" and shown["model.name_or_path"] == "null"
    recipe = _shown("--recipe", str(ROOT / "recipes/gpu-7b.yaml"), "-S", "train.steps=7")
    assert recipe["model.name_or_path"] == '"Qwen/Qwen2.5-VL-7B-Instruct"' and recipe["train.steps"] == "7"
    assert recipe["train.adam_betas"] == "[0.9, 0.999]"
    other = tmp_path / "p.yaml"
    other.write_text(PARAMS.read_text().replace("  n_clean: 4 ", "  n_clean: 5 "))
    assert _shown(params=other)["rollout.n_clean"] == "5"
