"""The registered policy as an MLflow model a user can load and serve: a `mlflow.pyfunc` PythonModel.

Why pyfunc and not `mlflow.transformers`: the policy is a Qwen2.5-VL checkpoint answering a question about an image
with the authors' system prompt and chat template, greedy by default; what a caller wants back is the response and
the `\\boxed{}` answer in it. A PythonModel runs exactly what `noisyrollout eval` runs (`HFEngine`, the same
prompt, the same answer extraction), so the served answer equals the evaluated one, and it holds the HF folder as
its artifact (`artifacts/hf/`), loadable with `AutoModelForImageTextToText` / `AutoProcessor` as before.

    input   a table: `image` (a PNG or JPEG, base64-encoded) and `question` (text)
    params  `max_new_tokens` (default: the training's `rollout.max_new_tokens`), `temperature` (0 = greedy)
    output  a table: `response` (the policy's text) and `answer` (its last `\\boxed{}`, "" when there is none)

    mlflow.pyfunc.load_model("models:/noisyrollout-embedded@champion").predict(table, params={...})
    noisyrollout serve      # mlflow models serve -m models:/<name>@champion --env-manager local --host 127.0.0.1
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from pipelines.payload import decode_image, encode_image

POLICY_ARTIFACT = "policy"   # the MLflow model's name in its run (the run's HF folder stays beside it as "model")
HF = "hf"
# What the model needs to load and answer; pinned to the versions this environment runs.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "transformers", "tokenizers", "accelerate", "safetensors", "pillow",
                "numpy", "pandas", "pydantic", "pyyaml", "math-verify", "sympy")
PACKAGES = Path(__file__).resolve().parents[1]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:   # another filesystem, or links not allowed
        shutil.copy2(src, dst)


class NoisyRolloutPolicy(mlflow.pyfunc.PythonModel):
    """The policy behind `HFEngine`, as `noisyrollout eval` runs it."""

    def load_context(self, context: Any) -> None:
        from noisyrollout.rollout.hf_engine import HFEngine

        cfg = context.model_config or {}
        self.max_new_tokens = int(cfg.get("max_new_tokens", 24))
        self.engine = HFEngine.from_pretrained(context.artifacts[HF], system_prompt=cfg.get("system_prompt"),
                                               batch_size=int(cfg.get("batch_size", 16)),
                                               dtype=cfg.get("dtype", "float32"))

    def predict(self, context, model_input, params=None):   # no type hints: the signature below is the schema
        import pandas as pd

        from noisyrollout.algo.reward import extract_boxed
        from noisyrollout.rollout.engine import Prompt, SamplingParams

        params = params or {}
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        prompts = [Prompt(decode_image(row["image"]), str(row["question"])) for row in rows]
        sampling = SamplingParams(n=1, temperature=float(params.get("temperature") or 0.0), top_p=1.0,
                                  max_new_tokens=int(params.get("max_new_tokens") or self.max_new_tokens))
        texts = [g.texts[0] for g in self.engine.generate(prompts, sampling)] if prompts else []
        return pd.DataFrame({"response": texts, "answer": [extract_boxed(t) or "" for t in texts]})


def signature(max_new_tokens: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
                          outputs=Schema([ColSpec("string", "response"), ColSpec("string", "answer")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens),
                                              ParamSpec("temperature", "double", 0.0)]))


def log_policy(model_dir: Path, *, run_id: str, system_prompt: str, max_new_tokens: int, dtype: str,
               example: tuple[Any, str] | None = None) -> tuple[str, str]:
    """Log `model_dir` (an HF folder) into run `run_id` as the MLflow model `policy`: the PythonModel above, its
    signature, an input example (`example`: an image and a question), pinned requirements and the project code it
    runs (`noisyrollout/`, `pipelines/`). Returns its URI and id (MLflow 3 keeps it as a logged model of the run:
    `models:/<model id>`): the registered version's source."""
    import pandas as pd

    input_example = None
    if example is not None:
        input_example = (pd.DataFrame({"image": [encode_image(example[0])], "question": [example[1]]}),
                         {"max_new_tokens": max_new_tokens})
    # the folder goes in as artifacts/hf/ (MLflow names it after the source folder): hard links beside it, no copy
    with tempfile.TemporaryDirectory(dir=Path(model_dir).resolve().parent, prefix=".policy-") as tmp, \
            mlflow.start_run(run_id=run_id):
        shutil.copytree(model_dir, Path(tmp) / HF, copy_function=_link_or_copy)
        info = mlflow.pyfunc.log_model(
            name=POLICY_ARTIFACT, python_model=NoisyRolloutPolicy(), artifacts={HF: str(Path(tmp) / HF)},
            signature=signature(max_new_tokens), input_example=input_example,
            pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
            code_paths=[str(PACKAGES / "noisyrollout"), str(PACKAGES / "pipelines")],
            model_config={"system_prompt": system_prompt, "max_new_tokens": max_new_tokens, "dtype": dtype})
    return info.model_uri, info.model_id
