"""The DAG's stages, one module each (as DVC's example-get-started has one script per stage).

dvc.yaml runs each as `python -m pipelines.stages.<stage>`; the `noisyrollout <stage>` command calls the same
function. A stage module imports only what its stage runs, so that its `deps` in dvc.yaml are its import closure
(tests/test_stage_deps.py checks them).
"""
