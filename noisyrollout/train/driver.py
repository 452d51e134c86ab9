"""The RL driver, the one loop of training: steps, metrics, MLflow, checkpoints and resume, over a learner group.

    group     = LocalGroup (one learner in this process)  |  RayGroup (W DeepSpeed learners, launcher.py)
    each step = group.step(s, T, prompts of step s)  ->  merged StepMetrics
    driver    = metrics.jsonl + MLflow per step, an atomic checkpoint every `checkpoint.every` steps, the final
                policy in `<train.output_dir>/model`

Self-healing: a learner that dies (or whose node is lost) raises LearnerLost; the driver closes the group, starts a
new one and resumes from the newest whole checkpoint, at most `cluster.max_restarts` times, each logged (console line,
MLflow tag `restarts` and metric `cluster/restarts`); then it stops with the root cause.

Resume (`checkpoint.resume=auto`) continues from the newest checkpoint written with the same parameters,
`train.steps` included (the schedules depend on it), the same starting weights (a re-trained SFT policy is a
new run) and the same training code (an edited trainer is a new run too). Steps the MLflow run already holds are not logged again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from noisyrollout.progress import progress_bar

from noisyrollout.config import Params
from noisyrollout.errors import LearnerLost, NoisyRolloutError
from noisyrollout.report import plot_training
from noisyrollout.timing import overhead
from noisyrollout.train import checkpoint
from noisyrollout.train.batching import batch_indices
from noisyrollout.train.metrics import MetricsLog, StepMetrics


@dataclass
class RLResult:
    model_dir: Path
    metrics: list[StepMetrics]
    run_id: str | None = None   # the MLflow run that tracked the training, if any


class LearnerGroup(Protocol):
    """The learners of a run, called together (every call is collective)."""

    num_records: int

    def step(self, step: int, total_steps: int, indices: list[int]) -> StepMetrics: ...
    def save(self, checkpoint_dir: Path) -> None: ...
    def load(self, checkpoint_dir: Path) -> None: ...
    def save_hf(self, out_dir: Path) -> None: ...
    def close(self) -> None: ...


class LocalGroup:
    """One learner in this process: plain torch, no Ray, no DeepSpeed (`cluster.trainer=local`)."""

    def __init__(self, params: Params, init_dir: Path) -> None:
        from noisyrollout.train.learner import Learner

        with overhead("train: start learners: setup (policy, data)"):
            self.learner = Learner(0, 1, params.model_dump(mode="json"), str(init_dir), distributed=False)
            self.num_records = self.learner.setup()

    def step(self, step: int, total_steps: int, indices: list[int]) -> StepMetrics:
        metrics, scores = self.learner.step(step, total_steps, indices)
        return StepMetrics.merge([metrics], [scores])

    def save(self, checkpoint_dir: Path) -> None:
        self.learner.save(str(checkpoint_dir))

    def load(self, checkpoint_dir: Path) -> None:
        self.learner.load(str(checkpoint_dir))

    def save_hf(self, out_dir: Path) -> None:
        self.learner.save_hf(str(out_dir))

    def close(self) -> None:
        pass


def make_group(params: Params, init_dir: Path) -> LearnerGroup:
    if params.cluster.trainer == "ray":
        from noisyrollout.train.launcher import RayGroup

        return RayGroup(params, init_dir)
    return LocalGroup(params, init_dir)


def _resume_point(params: Params, root: Path, fingerprint: str, core: str,
                  log: Callable[[str], None]) -> Path | None:
    """The checkpoint to continue from, if any; one written with other parameters is refused, never mixed in."""
    mode = params.checkpoint.resume
    if mode == "never":
        shutil.rmtree(root, ignore_errors=True)   # start over: this run's checkpoints replace the old ones
        return None
    path = checkpoint.newest_whole(root, log) if mode == "auto" else Path(mode)
    if path is None:
        _note_other_lengths(params, core, root.parent, log)
        return None
    if not (path / checkpoint.STATE_FILE).is_file():
        raise NoisyRolloutError(f"{path}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    if (why := checkpoint.damage(path)) is not None:
        raise NoisyRolloutError(f"{path}: damaged checkpoint ({why})")
    state = checkpoint.read_state(path)
    if state.get("fingerprint") != fingerprint:
        steps = state.get("train_steps")
        why = (f"train.steps={steps}, not {params.train.steps} (the noise and LR schedules depend on it)"
               if steps is not None and steps != params.train.steps else "other parameters")
        raise NoisyRolloutError(f"{path} was written with {why}; choose another train.output_dir, or "
                                f"-S checkpoint.resume=never to start over (its checkpoints are then replaced)")
    return path


def _note_other_lengths(params: Params, core: str, folders: Path, log: Callable[[str], None]) -> None:
    """Say so when the only checkpoints of these parameters (`core`: their fingerprint without train.steps) were
    written for another `train.steps`."""
    for folder in sorted(folders.glob("*")) if folders.is_dir() else []:
        last = checkpoint.latest(folder)
        state = checkpoint.read_state(last) if last is not None else {}
        if state.get("fingerprint_core") == core and state.get("train_steps") != params.train.steps:
            log(f"not resuming {last}: it was written for train.steps={state['train_steps']}, and the noise and "
                f"LR schedules (u = step / train.steps) depend on it; starting at step 0")
            return


def _tracker(params: Params, run_id: str | None) -> Any:
    if not params.tracking.enabled:
        return None
    from noisyrollout.tracking import Tracker, run_name

    tracker = Tracker(params.tracking.experiment, run_name=run_name(params), run_id=run_id,
                      artifact_root=params.tracking.artifact_root)
    if run_id is None:
        tracker.log_params(params.model_dump(mode="json"))
        tracker.log_system_info()
    return tracker


def train_rl(params: Params, init_dir: Path, *, progress: bool = True, log: Callable[[str], None] = print,
             on_step: Callable[[StepMetrics], None] | None = None,
             group_factory: Callable[[Params, Path], LearnerGroup] = make_group) -> RLResult:
    """NoisyRollout RL from the policy in `init_dir` with the learners of `cluster.*`; resumable from checkpoints,
    and self-healing: a dead learner restarts the group from the newest checkpoint (`cluster.max_restarts` times)."""
    out_dir = Path(params.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the run's identity: its parameters, the weights it starts from and the training code
    dumped = {**params.model_dump(mode="json"), "init": checkpoint.init_identity(init_dir),
              "code": checkpoint.code_identity()}
    fingerprint = checkpoint.params_fingerprint(dumped)
    core = checkpoint.params_fingerprint(dumped, ignore=("train.steps",))
    # one folder per parameter set: a sweep or a changed knob (dvc repro) starts fresh beside the old checkpoints
    # instead of mixing them in, and switching back resumes the old set
    ckpt_root = checkpoint.checkpoints_root(params) / fingerprint[:12]
    resume_from = _resume_point(params, ckpt_root, fingerprint, core, log)   # checked before any learner starts
    run = _Run(params, out_dir, ckpt_root, {"fingerprint": fingerprint, "fingerprint_core": core}, log, progress,
               on_step)
    group: LearnerGroup | None = None
    restarts, limit = 0, params.cluster.max_restarts
    try:
        while True:
            try:
                group = group_factory(params, init_dir)   # timed inside ("train: start learners: ...")
                for line in getattr(group, "placement", []):   # where each Ray learner runs
                    log(line)
                run.steps(group, resume_from)
                break
            except LearnerLost as lost:
                if group is not None:
                    with overhead("train: stop learners"):
                        group.close()
                    group = None
                if restarts >= limit:
                    raise LearnerLost(f"{lost}; the run stopped " + (f"after {restarts} restart(s) " if restarts else "")
                                      + f"(cluster.max_restarts={limit}); `noisyrollout train` again resumes from the "
                                      f"newest checkpoint (checkpoint.resume=auto)") from None
                restarts += 1
                resume_from = checkpoint.newest_whole(ckpt_root, log)
                log(f"{lost} at step {run.step}: restarting the learners ({restarts} of cluster.max_restarts="
                    f"{limit}) from {resume_from or 'the start'}")
                run.restarted(restarts, str(lost))
        return run.finish(group)
    except BaseException:
        if run.tracker is not None:
            run.tracker.finish("FAILED")
        raise
    finally:
        if group is not None:
            with overhead("train: stop learners"):
                group.close()


class _Run:
    """The state of one training run across learner-group restarts: metrics so far, the MLflow run, the step."""

    def __init__(self, params: Params, out_dir: Path, ckpt_root: Path, identity: dict[str, str],
                 log: Callable[[str], None], progress: bool, on_step: Callable[[StepMetrics], None] | None) -> None:
        self.params, self.out_dir, self.ckpt_root, self.identity = params, out_dir, ckpt_root, identity
        self.log, self.progress, self.on_step = log, progress, on_step
        self.metrics_log = MetricsLog(out_dir / "metrics.jsonl")
        self.history: list[dict[str, Any]] = []
        self.tracker: Any = None
        self.logged_upto = -1   # steps up to here are in MLflow already: recomputed after a resume, not logged twice
        self.step = 0

    def steps(self, group: LearnerGroup, resume_from: Path | None) -> None:
        """Load `resume_from` (if any) into the group, then run the remaining steps, checkpointing as configured."""
        cfg, run_id = self.params.train, None
        self.step, self.history = 0, []
        if resume_from is not None:
            group.load(resume_from)
            state = checkpoint.read_state(resume_from)
            self.step, self.history, run_id = state["step"], state["metrics"], state.get("mlflow_run_id")
            self.log(f"resumed from {resume_from} at step {self.step}")
        self.metrics_log.rewrite(self.history)
        if self.tracker is None:
            with overhead("train: mlflow"):
                self.tracker = _tracker(self.params, run_id)
            if self.tracker is not None and run_id:
                self.logged_upto = self.tracker.last_logged_step("noise/alpha")
        bar = progress_bar(range(self.step, cfg.steps), desc="rl", disable=not self.progress, initial=self.step,
                           total=cfg.steps)
        for step in bar:
            self.step = step
            metrics = group.step(step, cfg.steps, batch_indices(step, cfg.prompts_per_step, group.num_records,
                                                                self.params.rl_seed))
            self.metrics_log.append(metrics)
            self.history.append(asdict(metrics))
            if self.tracker is not None and step > self.logged_upto:
                with overhead("train: mlflow"):
                    self.tracker.log_metrics(metrics.to_dict(), step=step)
                self.logged_upto = step
            if self.on_step is not None:
                self.on_step(metrics)
            bar.set_postfix(clean=f"{metrics.reward_clean:.2f}", noisy=f"{metrics.reward_noisy:.2f}")
            if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
                (bar.write if self.progress else self.log)(metrics.line())
            every = self.params.checkpoint.every
            if every and ((step + 1) % every == 0 or step + 1 == cfg.steps):   # the last step too: rerun = no-op
                with overhead("train: checkpoints"):
                    state = {"step": step + 1, "metrics": self.history, "time": time.time(), **self.identity,
                             "train_steps": cfg.steps,
                             "mlflow_run_id": self.tracker.run_id if self.tracker is not None else None}
                    checkpoint.save(self.ckpt_root, step + 1, group.save, state, self.params.checkpoint.keep_last)
        self.step = cfg.steps

    def restarted(self, restarts: int, cause: str) -> None:
        """Record a restart of the learner group in MLflow: the `restarts` tag, its cause, and the `cluster/restarts`
        metric at the step where the group died."""
        if self.tracker is not None:
            self.tracker.set_tags({"restarts": restarts, "last_restart_cause": cause})
            self.tracker.log_metrics({"cluster/restarts": restarts}, step=self.step)

    def finish(self, group: LearnerGroup) -> RLResult:
        """The final policy in `<train.output_dir>/model`, the training plot, the MLflow run closed."""
        model_dir = self.out_dir / "model"
        with overhead("train: checkpoints"):
            group.save_hf(model_dir)
        png = plot_training(self.history, self.out_dir / "training.png")   # drawn once, here; the report stage reads it
        run_id = None
        if self.tracker is not None:
            with overhead("train: mlflow"):
                self.tracker.log_figure_png(png)
                self.tracker.log_artifact_dir(model_dir, "model")
                self.tracker.finish()
            run_id = self.tracker.run_id
        return RLResult(model_dir=model_dir, metrics=[StepMetrics(**m) for m in self.history], run_id=run_id)
