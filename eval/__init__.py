"""The evaluation suite: the paper's six benchmarks and the embedded splits, graded by rule.

Import its modules by their full name (`from eval.runner import run_eval`), never `import eval`:
the bare name is also a Python builtin.

    benchmarks  loaders for geo3k, wemath, mathvista, mathverse, mathvision, hallubench and the
                embedded corpus' test / ood splits -> EvalSample lists
    grading     last \\boxed{} + grade_answer, choice letters and choice texts, yes/no
    judge       optional OpenAI-compatible answer extractor (retries, thread pool, disk cache)
    report      OUT/<benchmark>.json, summary.json, summary.md, summary.png
    runner      run_eval (generate + grade + report) and regrade (saved predictions, no model)
    fixtures    a miniature data dir in the six layouts, for tests and smoke runs
"""
