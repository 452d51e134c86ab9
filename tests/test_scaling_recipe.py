"""recipes/kuberay-rayjob.yaml is not run here (no Kubernetes): its shape is checked, and its entrypoint's parameters
validate and agree with the cluster it describes (one learner per GPU worker, checkpoints on the shared volume)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from noisyrollout.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_the_rayjob_recipe_describes_the_cluster_its_trainer_expects(monkeypatch):
    job = yaml.safe_load((ROOT / "recipes/kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    head_pod, worker_pod = cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]

    words = shlex.split(spec["entrypoint"])
    args = words[words.index("train") + 1:]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-S"]
    recipe = args[args.index("--recipe") + 1]
    monkeypatch.chdir(ROOT)
    params = load_params("params.yaml", overrides, recipe)

    assert params.cluster.address == "auto" and params.cluster.placement == "spread"
    assert params.rollout.engine == "vllm" and params.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == params.cluster.num_learners
    (container,) = worker_pod["containers"]
    assert float(container["resources"]["limits"]["nvidia.com/gpu"]) == params.cluster.gpus_per_learner
    assert float(container["resources"]["limits"]["cpu"]) >= params.cluster.cpus_per_learner
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"   # no learner on the head
    # checkpoints and artifacts on the volume every pod mounts
    for pod in (head_pod, worker_pod):
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert any(str(params.cluster.storage).startswith(m) for m in mounts)
        assert any(str(params.tracking.artifact_root).startswith(m) for m in mounts)
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == {"noisyrollout-shared"}
