"""Input bounds of the parameters (issue #25, item 8): whatever is wrong in params.yaml or a `-S` override, the user
gets one line per bad key, naming its dotted key, and never a traceback.

Every leaf of the real params.yaml is mutated: once with each wrong type its annotation refuses (the exhaustive pass),
and in random combinations of wrong types, out-of-range values and unknown keys (hypothesis, derandomized, a bounded
number of examples). Both ways in are checked, the file and `-S key=value`, and the CLI in a real subprocess (exit
code 2, stderr: one line per bad key, plus the count header `params: N invalid parameters` when N > 1). A file that
is not a YAML mapping at all (a tab, an unclosed bracket, a list or a scalar at the top, an empty file, binary
garbage, a key given twice) is one line naming the file and the line.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from noisyrollout.algo.augment import DISTORTIONS
from noisyrollout.config import ALPHA0_MAX, ANNEAL_COEFS, ConfigError, Params, format_value, load_params

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
CLI = Path(sys.executable).parent / "noisyrollout"
TREE: dict[str, Any] = yaml.safe_load(PARAMS.read_text())
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
FUZZ = settings(derandomize=True, max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ the leaves and their types
@dataclass(frozen=True)
class Leaf:
    key: str                        # dotted key, e.g. model.tiny.hidden_size
    annotation: Any                 # the field's type, Optional stripped
    nullable: bool
    bounds: tuple[Any, ...]         # annotated_types Ge / Gt / Le / Lt of the field

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _model_leaves(model: type[BaseModel], tree: dict[str, Any], prefix: str = "") -> Iterator[Leaf]:
    """The leaves of params.yaml (`tree`), each with its field: a section recurses, anything else is a leaf."""
    for name, value in tree.items():
        field = model.model_fields[name]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _model_leaves(field.annotation, value, f"{prefix}{name}.")
            continue
        annotation, nullable = _strip_optional(field.annotation)
        bounds = tuple(m for m in field.metadata if isinstance(m, (annotated_types.Ge, annotated_types.Gt,
                                                                    annotated_types.Le, annotated_types.Lt)))
        yield Leaf(f"{prefix}{name}", annotation, nullable, bounds)


LEAVES: list[Leaf] = list(_model_leaves(Params, TREE))
SECTIONS = sorted({leaf.section for leaf in LEAVES if leaf.section})


def _wrong_types(leaf: Leaf) -> list[Any]:
    """Values of a YAML type the leaf's annotation does not take (each one alone must be refused)."""
    ann, origin = leaf.annotation, typing.get_origin(leaf.annotation)
    if ann is bool:
        out: list[Any] = ["maybe", [True], {"k": True}, 2]
    elif ann is int:
        out = ["ten", [1], {"k": 1}, 2.5]
    elif ann is float:
        out = ["fast", [1.0], {"k": 1.0}]
    elif ann in (str, Path):
        out = [5, [1], {"k": 1}, 2.5, True]
    elif origin is Literal:
        out = [5, [typing.get_args(ann)[0]], {"k": 1}]
    elif origin is list:
        out = ["text", 5, {"k": 1}]
    elif origin is dict:
        out = ["text", 5, [1, 2]]
    elif origin is tuple:
        out = ["text", 5, {"k": 1}, [0.5]]   # [0.5]: a tuple of the wrong length
    else:
        raise AssertionError(f"{leaf.key}: no wrong types for {ann!r}; extend _wrong_types")
    return out if leaf.nullable else [*out, None]


def _numeric(leaf: Leaf) -> type | None:
    return leaf.annotation if leaf.annotation in (int, float) else None


# Bounds that are not the field's own but a section check (pydantic runs a section's checks only once its fields are
# valid, so such a value is reported alone in its section): key -> (section check, strategy of bad values).
CROSS: dict[str, st.SearchStrategy[Any]] = {
    "noise.distortion": st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda s: s not in DISTORTIONS),
}
if TREE["noise"]["distortion"] in ALPHA0_MAX:   # at most ALPHA0_MAX[distortion]
    CROSS["noise.alpha0"] = st.floats(min_value=ALPHA0_MAX[TREE["noise"]["distortion"]], exclude_min=True,
                                      max_value=1e6)
if TREE["noise"]["anneal"] in ANNEAL_COEFS:     # pow, sigmoid: > 0; exp: in (0, 1)
    CROSS["noise.anneal_coef"] = st.floats(max_value=0.0, min_value=-1e6) if TREE["noise"]["anneal"] != "exp" else \
        st.one_of(st.floats(max_value=0.0, min_value=-1e6), st.floats(min_value=1.0, max_value=1e6))


def _out_of_range(leaf: Leaf) -> st.SearchStrategy[Any] | None:
    """Bad values of the leaf's own type: past a declared bound, not among its choices, nan / inf; None if it has
    no bound to pass (CROSS has those checked by their section)."""
    kind = _numeric(leaf)
    options: list[st.SearchStrategy[Any]] = []
    for bound in leaf.bounds:
        if kind is int:
            if isinstance(bound, annotated_types.Ge):
                options.append(st.integers(max_value=bound.ge - 1, min_value=bound.ge - 10**6))
            elif isinstance(bound, annotated_types.Gt):
                options.append(st.integers(max_value=int(bound.gt), min_value=int(bound.gt) - 10**6))
            elif isinstance(bound, annotated_types.Le):
                options.append(st.integers(min_value=bound.le + 1, max_value=bound.le + 10**6))
            else:
                options.append(st.integers(min_value=int(bound.lt), max_value=int(bound.lt) + 10**6))
        elif kind is float:
            if isinstance(bound, (annotated_types.Ge, annotated_types.Gt)):
                edge = bound.ge if isinstance(bound, annotated_types.Ge) else bound.gt
                options.append(st.floats(max_value=edge, exclude_max=isinstance(bound, annotated_types.Ge),
                                         min_value=edge - 1e6))
            else:
                edge = bound.le if isinstance(bound, annotated_types.Le) else bound.lt
                options.append(st.floats(min_value=edge, exclude_min=isinstance(bound, annotated_types.Le),
                                         max_value=edge + 1e6))
    if kind is float:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if typing.get_origin(leaf.annotation) is Literal:
        choices = typing.get_args(leaf.annotation)
        options.append(st.from_regex(r"[a-z_-]{1,12}", fullmatch=True).filter(lambda s: s not in choices))
    if typing.get_origin(leaf.annotation) is list and typing.get_origin(typing.get_args(leaf.annotation)[0]) is Literal:
        choices = typing.get_args(typing.get_args(leaf.annotation)[0])
        options.append(st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda s: s not in choices),
                                min_size=1, max_size=3))
    if leaf.key == "checkpoint.resume":   # not auto, never or an existing folder
        options.append(st.from_regex(r"zz[a-z]{0,8}", fullmatch=True))
    return st.one_of(options) if options else None


def test_every_leaf_of_params_yaml_is_covered():
    """The fuzz knows every leaf: a new knob with a type it cannot mutate fails here, not silently."""
    assert len(LEAVES) >= 100 and len({leaf.key for leaf in LEAVES}) == len(LEAVES)
    for leaf in LEAVES:
        assert _wrong_types(leaf), leaf.key
    assert {"noise.alpha0", "model.tiny.hidden_size", "data.sizes", "train.adam_betas"} <= {leaf.key for leaf in LEAVES}
    print(f"\nparams fuzz: {len(LEAVES)} leaves, {sum(len(_wrong_types(leaf)) for leaf in LEAVES)} wrong-type values "
          f"(each through the file, the first also through -S); {FUZZ.max_examples} random bad files and "
          f"{FUZZ.max_examples} override sets; 200 random byte strings; {len(MALFORMED)} malformed files")


# ----------------------------------------------------------------------------------------------------- the promise
def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _write(tree: Any, name: str = "params.yaml") -> Path:
    path = Path(tempfile.mkdtemp(prefix="nr-fuzz-")) / name
    path.write_text(yaml.dump(tree, Dumper=DUMPER, sort_keys=False, allow_unicode=True))
    return path


def _assert_one_line_per_key(message: str, bad: list[str]) -> None:
    """`message` (a ConfigError, without the CLI's `error: `) has one line per bad key naming it at its start (or an
    item inside it: `sft.adam_betas.1: ...`), and a count header when there are several."""
    lines = message.splitlines()
    if len(bad) == 1:
        assert len(lines) == 1, message
        body = [lines[0].removeprefix("params: ")]
    else:
        assert lines[0] == f"params: {len(bad)} invalid parameters", message
        body = [line.removeprefix("  ") for line in lines[1:]]
    assert len(body) == len(bad), message
    for key in bad:
        assert sum(line.startswith((f"{key}:", f"{key}=", f"{key}.")) for line in body) == 1, (key, message)


def _refused(tree: Any = None, overrides: list[str] | None = None) -> str:
    """The ConfigError of loading `tree` as a file, or params.yaml with `overrides`."""
    path = _write(tree) if tree is not None else PARAMS
    try:
        load_params(path, overrides)
    except ConfigError as exc:
        return str(exc)
    raise AssertionError(f"accepted: {overrides or tree}")


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.key)
def test_each_wrong_type_of_each_leaf_is_one_line_naming_it(leaf):
    """Exhaustive: every leaf, every wrong type, through the file; the first one also through `-S`."""
    for i, value in enumerate(_wrong_types(leaf)):
        tree = copy.deepcopy(TREE)
        _set(tree, leaf.key, value)
        _assert_one_line_per_key(_refused(tree), [leaf.key])
        if i == 0:
            _assert_one_line_per_key(_refused(overrides=[f"{leaf.key}={format_value(value)}"]), [leaf.key])


@st.composite
def bad_params(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[str, Any]], list[str]]:
    """(params.yaml with some leaves broken and unknown keys added, the (key, value) changes, the bad keys)."""
    leaves = draw(st.lists(st.sampled_from(LEAVES), min_size=0, max_size=6, unique_by=lambda leaf: leaf.key))
    sections = [leaf.section for leaf in leaves]
    changes: list[tuple[str, Any]] = []
    for leaf in leaves:
        alone = sections.count(leaf.section) == 1
        kinds = ["type"] + (["range"] if _out_of_range(leaf) is not None else []) + \
            (["cross"] if leaf.key in CROSS and alone else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "type":
            value = draw(st.sampled_from(_wrong_types(leaf)))
        elif kind == "range":
            value = draw(_out_of_range(leaf))
        else:
            value = draw(CROSS[leaf.key])
        changes.append((leaf.key, value))
    n_unknown = draw(st.integers(0 if leaves else 1, 3))
    checked = {leaf.section for leaf in leaves if leaf.key in CROSS}   # a section check runs only in a clean section
    for _ in range(n_unknown):
        where = draw(st.sampled_from(["", *(s for s in SECTIONS if s not in checked)]))
        name = draw(st.from_regex(r"zz[a-z0-9_]{0,8}", fullmatch=True))
        key = f"{where}.{name}" if where else name
        if key not in (k for k, _ in changes):
            changes.append((key, draw(st.one_of(st.integers(), st.booleans(), st.none(),
                                                st.text(alphabet="abc xyz:-", max_size=10)))))
    tree = copy.deepcopy(TREE)
    for key, value in changes:
        _set(tree, key, value)
    return tree, changes, [key for key, _ in changes]


@FUZZ
@given(bad_params())
def test_random_bad_files_name_every_bad_key_once(case):
    tree, _, bad = case
    _assert_one_line_per_key(_refused(tree), bad)


@FUZZ
@given(bad_params())
def test_random_bad_overrides_name_every_bad_key_once(case):
    _, changes, bad = case
    overrides = [f"{key}={format_value(value)}" for key, value in changes]
    _assert_one_line_per_key(_refused(overrides=overrides), bad)


@settings(derandomize=True, max_examples=200, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_are_a_config_error_or_valid(data):
    """Never a traceback: any file content is loaded, or refused with a ConfigError whose first line names the file
    (not YAML) or the parameters (a valid YAML mapping with bad keys)."""
    path = Path(tempfile.mkdtemp(prefix="nr-fuzz-")) / "params.yaml"
    path.write_bytes(data)
    try:
        load_params(path)
    except ConfigError as exc:
        first = str(exc).splitlines()[0]
        assert first.startswith((f"{path}:", "params: ")), first


# ----------------------------------------------------------------------------------------------- malformed YAML
TEXT = PARAMS.read_text()
MALFORMED: dict[str, tuple[bytes, int, str]] = {   # name -> (content, line named, words of the message)
    "tab": (TEXT.replace("\n  steps: 120 ", "\n\tsteps: 120 ").encode(), TEXT[:TEXT.index("\n  steps: 120 ")].count("\n") + 2,
            "not valid YAML: found character"),
    "unclosed-bracket": (TEXT.replace("[count, bar, length]", "[count, bar").encode(),
                         TEXT[:TEXT.index("  sizes: {")].count("\n") + 1, "expected ',' or ']'"),
    "list-at-top": (b"# a list\n- seed: 0\n- threads: 1\n", 2, "the top level must be a mapping of sections"),
    "scalar-at-top": (b"just some words\n", 1, "the top level must be a mapping of sections"),
    "empty": (b"", 1, "empty parameters file"),
    "only-comments": (b"# nothing here\n\n", 1, "empty parameters file"),
    "binary": (b"seed: 0\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", 2, "not a UTF-8 text file"),
    "control-char": (b"seed: 0\nthreads: \x07\n", 2, "is not allowed in YAML"),
    "duplicate-key": (TEXT.replace("\n  lr: 1.0e-4 ", "\n  lr: 1.0e-4\n  lr: 5.0e-4 ").encode(),
                      TEXT[:TEXT.index("\n  lr: 1.0e-4 ")].count("\n") + 3, "key 'lr' given twice"),
    "python-tag": (b"seed: !!python/object/apply:os.system [echo hi]\n", 1, "not valid YAML"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_yaml_is_one_line_naming_file_and_line(name, tmp_path):
    content, line, words = MALFORMED[name]
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:{line}:"), message
    assert words in message, message
    with pytest.raises(ConfigError) as err:   # the same as a recipe
        load_params(PARAMS, recipe=path)
    assert str(err.value) == message


@pytest.mark.parametrize("override,words", [
    ("train.lr=[1", "the value is not valid YAML"),
    ("train.lr={a: 1, a: 2}", "key 'a' given twice"),
    ("train.lr", "is not of the form section.key=value"),
    ("=1", "is not a dotted key"),
    ("train..lr=1", "is not a dotted key"),
    ("train.lr.x=1", "'lr' is not a section"),
    ("train.lr=\x07", "is not allowed in YAML"),
])
def test_a_malformed_override_is_one_line_naming_it(override, words):
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, [override])
    message = str(err.value)
    assert "\n" not in message and message.startswith("override ") and repr(override)[:-1] in message or \
        repr(override.partition("=")[0]) in message, message
    assert words in message, message


# ------------------------------------------------------------------------------------------------- the CLI, for real
def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.Popen([str(CLI), "params", *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_the_cli_prints_one_line_per_bad_key_and_exits_2(tmp_path):
    """`noisyrollout params` in a subprocess: a file with one wrong type per section and unknown keys, the same as
    `-S` overrides, and every malformed file: exit 2, no traceback, stderr = the lines, stdout empty."""
    tree = copy.deepcopy(TREE)
    bad: list[str] = []
    for section in SECTIONS:   # the first leaf of each section, wrong-typed
        leaf = next(leaf for leaf in LEAVES if leaf.section == section)
        _set(tree, leaf.key, _wrong_types(leaf)[0])
        bad.append(leaf.key)
    for key in ("zz_top", "train.zz_inner", "model.tiny.zz_deep"):
        _set(tree, key, 1)
        bad.append(key)
    _set(tree, "seed", "zero")
    bad.append("seed")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    overrides = [x for key in bad for x in ("-S", f"{key}={format_value(_get(tree, key))}")]
    runs = {"file": (_cli("--params", str(bad_file)), bad), "overrides": (_cli(*overrides), bad)}
    for name, (content, line, _) in MALFORMED.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        runs[name] = (_cli("--params", str(path)), [f"{path}:{line}:"])
    for name, (proc, expected) in runs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err and out == "", (name, err)
        lines = err.splitlines()
        assert all(line.startswith("error: ") for line in lines[:1]), (name, err)
        if name in ("file", "overrides"):
            assert len(lines) == len(bad) + 1, (name, err)   # the count header, then one line per bad key
            _assert_one_line_per_key(err.removeprefix("error: "), bad)
        else:
            assert len(lines) == 1 and lines[0].startswith(f"error: {expected[0]}"), (name, err)


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree
