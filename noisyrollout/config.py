"""Typed configuration: pydantic models that mirror `params.yaml` section by section.

`params.yaml` is the only place a knob lives; `load_params` reads it, applies `section.key=value` overrides
(the same syntax as `dvc exp run -S`) and validates everything, naming every offending key on error. The field
defaults here equal params.yaml's values, and every field is a key of params.yaml (tests/test_params_truth.py), so
`Params()` is the embedded profile too; `param_rows` lists the values in use with their descriptions
(`noisyrollout params`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from noisyrollout.errors import ConfigError

SYSTEM_PROMPT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)


# Validation context key: check that the folders parameters name exist (`load_params` sets it; a plain
# `Params.model_validate` of a dump, as in a Ray learner whose working directory may differ, does not).
Beta = Annotated[float, Field(ge=0, lt=1)]   # an Adam beta: 0 <= beta < 1
PositiveFloat = Annotated[float, Field(gt=0)]
CHECK_PATHS = "check_paths"


class Section(BaseModel):
    # allow_inf_nan=False: a bound such as `gt=0` lets inf (and an unbounded float lets nan) through otherwise
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class DataConfig(Section):
    corpus_dir: Path = Field(Path("data/corpus"), description="Where `render-data` writes the synthetic corpus (parquet per "
                             "split); versioned by data.dvc, which tracks the whole data/ folder.")
    prepared_dir: Path = Field(Path("runs/prepared"), description="Where `prepare` writes the tables every later stage reads "
                               "(<split>.parquet for train/val/test/ood, one schema).")
    train: str = Field("data/corpus", description="Training set: hub id `owner/name@split`, a parquet/jsonl file, or a folder.")
    train_split: str = Field("train", description="Split of `train` used for RL (and SFT on the embedded profile).")
    val: str = Field("data/corpus", description="Validation set (same forms as `train`).")
    val_split: str = Field("val", description="Split of `val` used for the before/after accuracy table.")
    test: str | None = Field("data/corpus", description="In-domain test set for `evaluate` (same forms; null = none).")
    test_split: str = Field("test", description="Split of `test`.")
    ood: str | None = Field("data/corpus", description="Out-of-domain test set for `evaluate` (same forms; null = none).")
    ood_split: str = Field("ood", description="Split of `ood`.")
    image_size: int = Field(56, ge=28, description="Side in pixels of rendered corpus images (multiple of 28 recommended).")
    tasks: list[Literal["count", "bar", "length"]] = Field(["count", "bar", "length"], description="Synthetic tasks to render.")
    sizes: dict[str, int] = Field({"train": 3000, "val": 600, "test": 600, "ood": 6300}, description="Examples per split (ood: spread evenly over its 21 shift x level cells).")
    min_pixels: int = Field(3136, ge=784, description="Images are resized to at least this many pixels (aspect kept).")
    max_pixels: int = Field(3136, ge=784, description="Images are resized to at most this many pixels (aspect kept).")
    seed: int = Field(0, ge=0, description="Seed of the corpus renderer.")

    @model_validator(mode="after")
    def _pixel_range(self) -> "DataConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels={self.min_pixels} must not exceed data.max_pixels={self.max_pixels}")
        return self

    def sources(self) -> dict[str, tuple[str, str]]:
        """The splits `prepare` writes: {split name: (source, source split)}; test/ood only when set."""
        out = {"train": (self.train, self.train_split), "val": (self.val, self.val_split)}
        if self.test is not None:
            out["test"] = (self.test, self.test_split)
        if self.ood is not None:
            out["ood"] = (self.ood, self.ood_split)
        return out


class TinyModelConfig(Section):
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size of the locally trained tokenizer.")
    hidden_size: int = Field(128, ge=1, description="Text decoder hidden size.")
    intermediate_size: int = Field(512, ge=1, description="Text decoder MLP size.")
    num_hidden_layers: int = Field(2, ge=1, description="Text decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Text decoder attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="Text decoder key/value heads (GQA).")
    max_position_embeddings: int = Field(2048, ge=1, description="Longest sequence the decoder supports.")
    vision_depth: int = Field(2, ge=1, description="Vision transformer blocks.")
    vision_hidden_size: int = Field(64, ge=1, description="Vision transformer hidden size.")
    vision_intermediate_size: int = Field(256, ge=1, description="Vision transformer MLP size.")
    vision_num_heads: int = Field(4, ge=1, description="Vision transformer heads.")
    patch_size: int = Field(14, ge=1, description="Vision patch side in pixels.")
    spatial_merge_size: int = Field(2, ge=1, description="Patches merged per side into one image token.")
    image_mean: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="Normalisation mean: white maps to 0.")
    image_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field((0.5, 0.5, 0.5), description="Normalisation std.")
    min_pixels: int = Field(3136, ge=1, description="Processor lower bound on pixels per image.")
    max_pixels: int = Field(200704, ge=1, description="Processor upper bound on pixels per image.")


class ModelConfig(Section):
    embedded: bool = Field(True, description="Build the tiny model and tokenizer locally (into `build_dir`) instead of "
                           "loading `name_or_path`.")
    build_dir: Path = Field(Path("runs/embedded/base"), description="Where `build-model` saves the embedded model (the base "
                            "policy when `embedded` is true).")
    name_or_path: str | None = Field(None, description="Base policy when `embedded` is false: a local folder or hub id "
                                     "(e.g. Qwen/Qwen2.5-VL-7B-Instruct).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Architecture of the embedded model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype for training.")
    freeze_vision: bool = Field(True, description="Freeze the vision tower during RL (the paper's setting).")
    system_prompt: str = Field(SYSTEM_PROMPT, description="System prompt of every rollout (the authors').")

    @model_validator(mode="after")
    def _base_given(self) -> "ModelConfig":
        if not self.embedded and not self.name_or_path:
            raise ValueError("model.name_or_path is required when model.embedded is false")
        return self

    @property
    def base(self) -> str:
        """The base policy: `build_dir` for the embedded model, else `name_or_path`."""
        return str(self.build_dir) if self.embedded else str(self.name_or_path)


class SFTConfig(Section):
    enabled: bool = Field(True, description="Run the SFT warm start (the role of the Instruct checkpoint).")
    steps: int = Field(320, ge=0, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    fraction: float | None = Field(0.6667, gt=0, lt=1, description="SFT trains on this leading fraction of the train "
                                   "split and RL draws its prompts from the rest, so RL learns on prompts the warm start "
                                   "never saw (as the paper's Instruct model never saw Geometry3K); null = both use "
                                   "the whole split.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (linear warm-up, cosine decay).")
    warmup_steps: int = Field(10, ge=0, description="Warm-up steps.")
    min_lr_rate: float = Field(0.1, ge=0, le=1, description="The cosine decay ends at this fraction of `lr`.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.99), description="AdamW (beta1, beta2).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    noise_prob: float = Field(0.0, ge=0, le=1, description="Fraction of SFT images given gaussian noise (robustness, "
                              "as a pretrained model has; 0 = clean SFT).")
    noise_max_step: int = Field(0, ge=0, le=999, description="Noisy SFT images use a noise step drawn from [0, this].")
    output_dir: Path = Field(Path("runs/embedded/sft"), description="Where the warm-started policy is saved.")


# anneal_coef per schedule: (default, check, what a valid value is). `exp` is 1 - coef ** (T - s): a coef above 1
# makes it negative (and overflow on a long run), so it must lie in (0, 1).
ANNEAL_COEFS: dict[str, tuple[float, Any, str]] = {
    "pow": (2.0, lambda c: c > 0, "> 0"),
    "exp": (0.9, lambda c: 0 < c < 1, "in (0, 1)"),
    "sigmoid": (30.0, lambda c: c > 0, "> 0"),
}
# Largest alpha0 each distortion can use: a noise step < 1000; crop_fill a fraction of the side (> 1 blacks out all).
ALPHA0_MAX = {"gaussian": 999.0, "rotate": 360.0, "crop_fill": 1.0}


class NoiseConfig(Section):
    distortion: str = Field("crop_fill", description="Distortion for the noisy rollouts: gaussian | rotate | crop_fill | "
                            "tv:<torchvision v2 transform> (GaussianBlur, ColorJitter, RandomErasing, JPEG, "
                            "ElasticTransform) | tv:<transform>:<argument that takes the strength>.")
    alpha0: float = Field(0.2, ge=0, description="Initial strength: noise step (gaussian, 0-999), degrees (rotate, "
                          "0-360) or side fraction (crop_fill, 0-1).")
    anneal: Literal["none", "linear", "pow", "exp", "sigmoid"] = Field("sigmoid", description="Annealing of the strength over RL steps.")
    anneal_coef: float | None = Field(None, description="Coefficient of the pow/exp/sigmoid schedules; null = the "
                                      "schedule's default (pow 2, exp 0.9, sigmoid 30). Valid: pow > 0, exp in (0, 1), "
                                      "sigmoid > 0.")
    anneal_mid_step: float = Field(40, description="Sigmoid midpoint, in steps.")

    @model_validator(mode="after")
    def _valid_strength_and_schedule(self) -> "NoiseConfig":
        top = ALPHA0_MAX.get(self.distortion)
        if top is None:   # a tv: transform; imported only then (torchvision is heavy, most stages need none of it)
            from noisyrollout.algo.augment import check_distortion

            try:
                top = check_distortion(self.distortion)
            except ValueError as exc:   # name the key: the message alone names only the distortion
                raise ValueError(f"noise.distortion: {exc}") from None
        if top is not None and self.alpha0 > top:
            raise ValueError(f"noise.alpha0={self.alpha0:g} is out of range for {self.distortion} (at most {top:g})")
        if self.anneal in ANNEAL_COEFS:
            default, ok, valid = ANNEAL_COEFS[self.anneal]
            if self.anneal_coef is not None and not ok(self.anneal_coef):
                raise ValueError(f"noise.anneal_coef={self.anneal_coef:g} is invalid for noise.anneal={self.anneal} "
                                 f"(must be {valid}; null picks {default:g})")
        return self

    @property
    def resolved_anneal_coef(self) -> float | None:
        """The coefficient the schedule runs with: `anneal_coef`, or when null the schedule's default (None for
        `none` / `linear`, which take none). The stored value stays null, as params.yaml has it."""
        if self.anneal_coef is not None or self.anneal not in ANNEAL_COEFS:
            return self.anneal_coef
        return ANNEAL_COEFS[self.anneal][0]


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = Field("hf", description="Rollout engine: `hf` (transformers generate, CPU) or "
                                          "`vllm` (GPU; pip install '.[gpu]'; weights synced after every update).")
    n_clean: int = Field(4, ge=0, description="Rollouts per prompt on the clean image.")
    n_noisy: int = Field(4, ge=0, description="Rollouts per prompt on the distorted image (0 = vanilla GRPO).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the training rollouts (> 0: at 0 "
                               "every response of a group is the same, so every advantage is 0 and nothing is learned).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(24, ge=1, description="Longest response, in tokens.")

    @model_validator(mode="after")
    def _some_rollouts(self) -> "RolloutConfig":
        if self.n_clean + self.n_noisy < 1:
            raise ValueError("rollout.n_clean + rollout.n_noisy must be at least 1")
        return self


class TrainConfig(Section):
    steps: int = Field(120, ge=1, description="RL steps (one rollout batch each).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per rollout batch; each gets n_clean + n_noisy responses.")
    mini_batches: int = Field(1, ge=1, description="Policy updates per rollout batch (the rollout batch is split in this "
                              "many; each needs at least one prompt per learner).")
    micro_batch_size: int | None = Field(None, ge=1, description="Responses per forward/backward pass (gradients "
                                         "accumulate up to one optimizer step per mini-batch); null = a learner's whole "
                                         "mini-batch at once. Bounds activation memory; the update is the same.")
    lr: float = Field(1e-4, gt=0, description="Learning rate (constant after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.99), description="AdamW (beta1, beta2), also of the DeepSpeed "
                                            "learners.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    estimator: Literal["grpo", "rloo", "reinforce_pp", "dr_grpo"] = Field("grpo", description="Advantage estimator.")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range epsilon.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (authors: 1e-3).")
    kl_coef: float = Field(0.0, ge=0, description="low_var_kl coefficient to the initial policy (paper: 0, no KL).")
    loss_agg: Literal["token-mean", "seq-mean-token-sum-norm"] = Field("token-mean", description="Loss aggregation.")
    format_weight: float = Field(0.1, ge=0, le=1, description="Reward = (1 - w) * accuracy + w * format.")
    accuracy_only: bool = Field(False, description="Reward = accuracy alone.")
    reward_timeout_s: float = Field(3.0, gt=0, description="Wall-clock seconds one response's math-verify may take "
                                    "(in a worker process, killed after it); the response then scores accuracy 0.")
    reward_budget_s: float = Field(60.0, gt=0, description="Wall-clock seconds a learner's step may spend grading "
                                   "its responses; those not graded by then score accuracy 0 (metric reward/timeouts).")
    reward_workers: int = Field(2, ge=1, description="Worker processes per learner for math-verify (forked on first "
                                "use; letters, words, integers and exact matches are graded without them).")
    output_dir: Path = Field(Path("runs/embedded/rl"), description="Where the trained policy and metrics go.")
    log_every: int = Field(1, ge=1, description="Print one line every this many steps.")
    seed: int | None = Field(None, ge=0, description="Seed of the RL stage alone (prompt order, rollout sampling, noise draws); "
                             "null = the global `seed`. Changing it reruns only `train` and what follows, from the same "
                             "SFT checkpoint: how the ablation's seeds differ.")


class ClusterConfig(Section):
    trainer: Literal["ray", "local"] = Field("ray", description="`ray`: DeepSpeed learners as Ray actors; `local`: one process, no Ray/DeepSpeed.")
    address: str | None = Field(None, description="Ray cluster: null starts a local one; `auto` joins a running cluster; or ray://host:port.")
    num_learners: int = Field(2, ge=1, description="Learner actors; each takes whole prompts (prompts_per_step / num_learners).")
    cpus_per_learner: int = Field(1, ge=1, description="CPUs reserved per learner (also its torch thread count).")
    gpus_per_learner: float = Field(0, ge=0, description="GPUs per learner (0 on CPU).")
    zero_stage: int = Field(2, ge=0, le=2, description="DeepSpeed ZeRO stage of the learners (0-2; stage 3 partitions "
                            "the weights, which HF generate and save_pretrained need whole).")
    dashboard: bool = Field(False, description="Start the Ray dashboard (bound to 127.0.0.1) with a local cluster.")
    placement: Literal["pack", "spread"] = Field("pack", description="Where the learners go: `pack` fills nodes in "
                                                 "turn (Ray's PACK placement group); `spread` puts each learner on "
                                                 "its own node (STRICT_SPREAD; needs as many nodes as learners).")
    placement_timeout_s: float = Field(60.0, gt=0, description="How long the learners may wait for their placement "
                                       "before the run stops, naming what the cluster lacks.")
    storage: Path | None = Field(None, description="Folder for checkpoints that every node must reach (a shared "
                                 "filesystem on a multi-node cluster); null = <train.output_dir>/checkpoints. Each "
                                 "learner checks at start that it can write there.")
    max_restarts: int = Field(2, ge=0, description="Self-healing: when a learner dies (or its node is lost) the "
                              "driver restarts the learner group and resumes from the newest complete checkpoint, up "
                              "to this many times per run; then it stops, naming the root cause (0 = stop at once).")


class CheckpointConfig(Section):
    every: int = Field(20, ge=0, description="Save a checkpoint every this many RL steps and after the last one (0 = none).")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    resume: str = Field("auto", description="`auto`: continue from the newest complete checkpoint written with the same "
                        "parameters; `never`: start over, replacing old checkpoints; or an existing checkpoint folder.")

    @field_validator("resume")
    @classmethod
    def _resume_target(cls, value: str, info: ValidationInfo) -> str:
        # the folder is checked only where the parameters are loaded (load_params, in the repo root): a Ray learner
        # re-validates a dump of them in a process whose working directory may differ
        if value in ("auto", "never") or not (info.context or {}).get(CHECK_PATHS):
            return value
        if not Path(value).is_dir():
            hint = difflib.get_close_matches(value, ["auto", "never"], n=1)
            raise ValueError(f"checkpoint.resume: {value!r} is not auto, never or an existing checkpoint folder"
                             + (f" (did you mean {hint[0]}?)" if hint else ""))
        return value


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log params, per-step metrics, plots and the final model to MLflow.")
    experiment: str = Field("noisyrollout-embedded", description="MLflow experiment name.")
    artifact_root: Path = Field(Path("mlartifacts"), description="Local folder for MLflow artifacts (made absolute).")


class ValConfig(Section):
    batch_size: int = Field(128, ge=1, description="Prompts per generation batch of the validation after `sft` and `train`.")
    max_new_tokens: int = Field(24, ge=1, description="Longest validation response, in tokens.")
    limit: int | None = Field(None, ge=1, description="Use at most this many validation examples (null = all).")


class EvalConfig(Section):
    batch_size: int = Field(128, ge=1, description="Prompts per generation batch of `evaluate` / `eval`.")
    max_new_tokens: int = Field(24, ge=1, description="Longest response, in tokens (authors' eval: 2048).")
    model: Path | None = Field(None, description="Checkpoint for `eval` (None = the RL policy, <train.output_dir>/model).")
    engine: Literal["hf", "vllm"] = Field("hf", description="Generation engine for `eval`: `hf` (CPU) or `vllm` (GPU).")
    data_dir: Path | None = Field(None, description="The authors' eval_data.zip unpacked (geometry3k/, wemath/, ...).")
    datasets: str = Field("all", description="Comma list of benchmarks, or `all`: the prepared test/ood splits "
                          "(embedded_test, embedded_ood) plus every paper benchmark found under `data_dir`.")
    output_dir: Path = Field(Path("runs/embedded/eval"), description="Where `eval` writes <benchmark>.json and the summary.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding (the authors' setting).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold when temperature > 0.")
    min_pixels: int | None = Field(None, ge=1, description="With max_pixels, resize eval images to at least this many "
                                     "pixels (null = no resize; authors: 262144).")
    max_pixels: int | None = Field(None, ge=1, description="With min_pixels, resize eval images to at most this many "
                                     "pixels (null = no resize; authors: 1000000).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N samples of each benchmark (null = all).")
    judge_max_retries: int = Field(3, ge=0, description="LLM judge (NOISYROLLOUT_JUDGE_* environment): retries of a "
                                   "failed request after the first attempt.")
    judge_max_workers: int = Field(8, ge=1, description="LLM judge: concurrent requests.")
    judge_timeout_s: float = Field(60.0, gt=0, description="LLM judge: seconds per request before it is retried.")
    judge_max_response_chars: int = Field(12000, ge=1, description="LLM judge: only the last this many characters of "
                                          "a response are sent to it.")


class GateConfig(Section):
    splits: list[str] = Field(["train", "val", "test", "ood"], description="Prepared tables the Great Expectations gate "
                              "(stage `validate`) checks, among those `prepare` wrote.")
    min_image_pixels: int = Field(784, ge=1, description="Smallest image (w*h) accepted: 784 = one 28x28 image token.")
    max_image_pixels: int = Field(16_777_216, ge=1, description="Largest image (w*h) accepted (4096 x 4096).")
    max_problem_chars: int = Field(16_384, ge=1, description="Longest problem accepted, in characters (a 1 MB problem "
                                   "is no prompt a context holds).")
    docs_dir: Path = Field(Path("runs/data_docs"), description="Where the gate writes its Great Expectations Data Docs (HTML).")


class RegistryConfig(Section):
    enabled: bool = Field(True, description="Register the trained policy in the MLflow model registry and promote by the rule.")
    model_name: str = Field("noisyrollout-embedded", description="Registered model name.")
    metric: str = Field("mean_accuracy", description="Promotion metric: an `evaluate` metric, e.g. mean_accuracy (over the "
                        "evaluated splits) or embedded_ood.accuracy.")
    margin: float = Field(0.005, ge=0, description="`champion` moves only when the challenger beats it by at least this much.")


class OrchestrationConfig(Section):
    deployment: str = Field("noisyrollout-retrain", description="Name of the Prefect deployment `noisyrollout deploy` serves.")
    cron: str | None = Field("0 3 * * *", description="Schedule of the deployment (cron, server time zone); null to use "
                             "`interval_seconds`.")
    interval_seconds: int | None = Field(None, ge=1, description="Schedule as an interval in seconds (used when cron is null).")

    @model_validator(mode="after")
    def _one_schedule(self) -> "OrchestrationConfig":
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("orchestration.cron, orchestration.interval_seconds: set exactly one of them (the other "
                             "null)")
        return self


class Params(Section):
    seed: int = Field(0, ge=0, description="Global seed (model init, sampling, noise).")
    threads: int = Field(1, ge=1, description="torch threads per process (1 avoids oversubscription on small CPUs).")
    reports_dir: Path = Field(Path("reports"), description="Small JSON metrics and CSV plot data of every stage (what "
                              "`dvc metrics show` and `dvc plots` read; kept in git, not in the DVC cache).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    val: ValConfig = Field(default_factory=ValConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @property
    def rl_seed(self) -> int:
        """The RL stage's seed: `train.seed`, or the global `seed` when that is null."""
        return self.seed if self.train.seed is None else self.train.seed

    def sft_examples(self, n_train: int) -> int:
        """How many of the `n_train` train examples (the first ones) are the SFT warm start's: `sft.fraction` of
        them, all without a fraction. RL prompts start after them when SFT runs (`rl_first_example`)."""
        return round(n_train * self.sft.fraction) if self.sft.fraction else n_train

    def rl_first_example(self, n_train: int) -> int:
        """Index of the first of the `n_train` train examples RL may prompt with."""
        return self.sft_examples(n_train) if self.sft.enabled and self.sft.fraction else 0

    @property
    def world_size(self) -> int:
        """Learners that share a step: `cluster.num_learners` with the Ray trainer, 1 with the local one."""
        return self.cluster.num_learners if self.cluster.trainer == "ray" else 1

    @model_validator(mode="after")
    def _batch_fits_learners(self) -> "Params":
        # every learner must take part in every collective step: one prompt per learner per mini-batch at least
        need = self.world_size * self.train.mini_batches
        if self.train.prompts_per_step < need:
            raise ValueError(f"train.prompts_per_step={self.train.prompts_per_step} is too small: each of the "
                             f"{self.train.mini_batches} mini-batch(es) needs a prompt for each of the {self.world_size} "
                             f"learner(s) (cluster.num_learners), so at least {need}")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base` (used for recipe files)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None,
                recipe: str | Path | None = None) -> Params:
    """Read `path` (if given), deep-merge `recipe` over it, apply `key=value` overrides, validate. An invalid tree is
    one ConfigError listing every invalid key, one line each (one line in all when only one is); a file that is not
    a YAML mapping (or an override that is not YAML) is one line naming the file and line (or the override)."""
    tree: dict[str, Any] = {}
    for file in (path, recipe):
        if file is not None:
            tree = merge(tree, read_yaml_mapping(Path(file)))
    for item in overrides or []:
        key, raw = _split_override(item)
        _set_dotted(tree, key, _override_value(item, raw))
    try:
        return Params.model_validate(tree, context={CHECK_PATHS: True})
    except ValidationError as exc:
        lines = list(dict.fromkeys(_error_lines(exc)))
    if len(lines) == 1:
        raise ConfigError(f"params: {lines[0]}")
    raise ConfigError(f"params: {len(lines)} invalid parameters\n" + "\n".join(f"  {line}" for line in lines))


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):   # libyaml's parser when there: 20x faster
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (first on line "
                                                            f"{seen[key] + 1})", key_node.start_mark)
            except TypeError:   # an unhashable key: the base class names it
                break
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError, text: str, lines: bool = True) -> tuple[int, int, str]:
    """(line, column, what is wrong), 1-based, of a PyYAML error, on one line (`lines`: the context's line too)."""
    if isinstance(exc, yaml.reader.ReaderError):   # a character YAML does not allow (a control character)
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return line, column, f"character {chr(exc.character)!r} is not allowed in YAML"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and lines and context_mark is not None and context_mark is not mark:
        problem += f" ({context} from line {context_mark.line + 1})"
    elif context:
        problem += f" ({context})"
    return (mark.line + 1, mark.column + 1, problem) if mark is not None else (1, 1, problem)


# Every character `str.splitlines` breaks at, escaped as repr writes it: a message stays one line whatever the keys hold.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)


def read_yaml_mapping(file: Path) -> dict[str, Any]:
    """The mapping a parameters (or recipe) file holds. Anything else (missing, unreadable, not UTF-8, not YAML, a
    key given twice, empty, a list or a scalar at the top) is a one-line ConfigError `<file>:<line>:<column>: ...`."""
    if not file.is_file():
        raise ConfigError(f"{file}: no such parameters file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the parameters file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{file}:{line}: not a UTF-8 text file (byte {data[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    try:
        loader = _StrictLoader(text)   # the reader checks every character here already
        try:
            node = loader.get_single_node()
            tree = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        line, column, problem = _yaml_problem(exc, text)
        raise ConfigError(_one_line(f"{file}:{line}:{column}: not valid YAML: {problem}")) from None
    if node is None:
        raise ConfigError(f"{file}:1: empty parameters file (expected a mapping of sections, as params.yaml has)")
    if not isinstance(tree, dict):
        kind = "a list" if isinstance(tree, list) else f"the {type(tree).__name__} {tree!r}"[:80]
        raise ConfigError(_one_line(f"{file}:{node.start_mark.line + 1}: the top level must be a mapping of "
                                    f"sections (section: {{key: value}}), not {kind}"))
    return tree


def _split_override(item: str) -> tuple[str, str]:
    """(dotted key, raw value) of a `section.key=value` override; a missing `=` or an empty key part is refused."""
    if "=" not in item:
        raise ConfigError(_one_line(f"override {item!r} is not of the form section.key=value"))
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(_one_line(f"override {item!r}: {key!r} is not a dotted key (section.key=value)"))
    return key, raw


def _override_value(item: str, raw: str) -> Any:
    """The value of an override, read as YAML (`-S train.lr=1e-4`, `-S data.tasks=[count]`)."""
    try:
        loader = _StrictLoader(raw)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(_one_line(f"override {item!r}: the value is not valid YAML: "
                                    f"{_yaml_problem(exc, raw, lines=False)[2]}")) from None


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _field_key(loc: list[str]) -> tuple[str, str]:
    """(dotted key of the parameter an error location lies in, the rest of the location): `data.tasks.1` is item
    `1` of the parameter `data.tasks`; a section or an unknown key is its own parameter."""
    model: Any = Params
    for i, part in enumerate(loc):
        field = model.model_fields.get(part) if model is not None else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ".".join(loc[:i + 1]), ".".join(loc[i + 1:])
        model = annotation
    return ".".join(loc), ""


def _error_lines(exc: ValidationError) -> Iterator[str]:
    """One line per invalid key of a failed validation, each naming its dotted key: several errors inside one
    parameter (items of a list, a tuple or a mapping) share its line."""
    grouped: dict[str, list[tuple[str | None, str]]] = {}   # key -> [(location inside it, message)]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        where = ".".join(loc)
        if err["type"] == "value_error":   # our own checks: their messages name the keys (None: a whole line)
            msg = str(err["msg"]).removeprefix("Value error, ")
            grouped.setdefault(where, []).append((None, msg if not where or msg.startswith(where) else f"{where}: {msg}"))
        elif err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(loc[-1], list(_fields_at(loc[:-1])), n=1)
            also = f" (did you mean {'.'.join([*loc[:-1], hint[0]])}?)" if hint else ""
            for key, value in _leaves(where, err.get("input")):
                grouped.setdefault(key, []).append((None, f"{key}: not a parameter{also} (got {_short(value)})"))
        else:
            key, rest = _field_key(loc) if loc else ("the parameters file", "")
            grouped.setdefault(key, []).append((rest, f"{err['msg']} (got {_short(err.get('input'))})"))
    for key, items in grouped.items():
        if len(items) == 1:
            rest, msg = items[0]
            line = msg if rest is None else f"{'.'.join(filter(None, [key, rest]))}: {msg}"
        else:
            line = f"{key}: {len(items)} invalid items: " + "; ".join(msg if rest is None else f"{rest}: {msg}"
                                                                       for rest, msg in items)
        yield _one_line(line)


def _fields_at(loc: list[str]) -> dict[str, Any]:
    """The fields of the section at `loc` (a list of section names from the top), or none."""
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return {}
    return model.model_fields


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _leaves(f"{prefix}.{key}", sub)
    else:
        yield prefix, value


def param_rows(params: Params) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value as params.yaml writes it, description) for every parameter of `params`, section by
    section. A null `noise.anneal_coef` shows the coefficient the schedule resolves it to in its description."""
    def walk(section: BaseModel, prefix: str) -> Iterator[tuple[str, Any, str]]:
        dumped = section.model_dump(mode="json")
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                yield from walk(value, f"{prefix}{name}.")
                continue
            description = field.description or ""
            if isinstance(section, NoiseConfig) and name == "anneal_coef" and value is None \
                    and section.resolved_anneal_coef is not None:
                description += f" (null: {section.resolved_anneal_coef:g} for noise.anneal={section.anneal})"
            yield f"{prefix}{name}", dumped[name], description
    yield from walk(params, "")


def format_value(value: Any) -> str:
    """A parameter value as `-S key=VALUE` takes it (JSON, which is YAML)."""
    return json.dumps(value, ensure_ascii=False)


def apply_recipe(params_path: str | Path, recipe: str | Path) -> list[str]:
    """Deep-merge `recipe` into the parameters file in place, keeping its comments (ruamel.yaml round trip), after
    checking that the result validates. Returns the dotted keys whose value changed. This is the params-file switch
    that lets `dvc repro` / `dvc exp run` run a recipe (e.g. recipes/gpu-7b.yaml) through the same DAG."""
    from ruamel.yaml import YAML

    params_path, recipe = Path(params_path), Path(recipe)
    for file in (params_path, recipe):
        if not file.is_file():
            raise ConfigError(f"{file}: no such parameters file")
    load_params(params_path, recipe=recipe)   # the merged result must validate before anything is written
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_path.read_text())
    update = yaml.safe_load(recipe.read_text()) or {}
    changed: list[str] = []

    def apply(node: Any, patch: dict[str, Any], prefix: str) -> None:
        for key, value in patch.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                apply(node[key], value, f"{dotted}.")
            elif node.get(key) != value:
                node[key] = value
                changed.append(dotted)

    apply(doc, update, "")
    with params_path.open("w") as fh:
        rt.dump(doc, fh)
    return changed
