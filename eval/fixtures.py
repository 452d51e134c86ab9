"""A miniature data dir in the six benchmark layouts, for tests and smoke runs.

`write_fixture_data(data_dir)` writes a few questions per benchmark (tiny images + the json/tsv
files, exactly as `eval_data.zip` lays them out) and returns what a loader must produce, with a
correct response for each readable question. Some images are deliberately missing or corrupt so
unreadable-image counting can be checked:

    geo3k      3 questions, folder 10 has no image
    wemath     3 questions, one image file is not an image
    mathvista  3 questions (testmini.parquet by default, or testmini.json keyed by pid)
    mathverse  3 questions
    mathvision 3 questions, one image missing
    hallubench 4 visual questions + 1 text-only question (skipped by the loader)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from eval.benchmarks import HALLUBENCH_SUFFIX


@dataclass
class FixtureQuestion:
    """What a loader must produce for one fixture question, and a correct model response."""

    id: str
    question: str
    answer: str
    response: str
    readable: bool = True
    extra: dict = field(default_factory=dict)


def _image(path: Path, color: tuple[int, int, int], *, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path, format=fmt)


def _boxed(answer: str) -> str:
    return f"<think> reasoning </think> The answer is \\boxed{{{answer}}}."


def write_fixture_data(data_dir: Path, *, mathvista_format: str = "parquet") -> dict[str, list[FixtureQuestion]]:
    """Write the fixture benchmarks under `data_dir`; return the expected samples per benchmark."""
    root = Path(data_dir)
    expected: dict[str, list[FixtureQuestion]] = {}

    # geo3k: geometry3k/test/<id>/{img_diagram.png,data.json}; answer = the lettered choice's text
    geo = []
    for gid, text, choices, letter, has_image in [
        (1, "Find x.", ["3", "4\\sqrt{3}", "12", "24"], "B", True),
        (2, "Find the area of the triangle.", ["10", "20", "30", "40"], "D", True),
        (10, "Find m \\angle 2.", ["30", "45", "60", "90"], "A", False),
    ]:
        folder = root / "geometry3k" / "test" / str(gid)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.json").write_text(json.dumps(
            {"id": gid, "annotat_text": text, "choices": choices, "answer": letter, "problem_text": text}))
        if has_image:
            _image(folder / "img_diagram.png", (255, 255, 255))
        answer = choices["ABCD".index(letter)]
        geo.append(FixtureQuestion(str(gid), text, answer, _boxed(answer), readable=has_image))
    expected["geo3k"] = geo

    # wemath: wemath/testmini.json + wemath/images/<image_path>; id ID@key
    rows = [
        {"ID": "1", "key": "2steps_1", "question": "What is the length of AB?", "option": "A. 3; B. 4; C. 5; D. 6",
         "answer": "C", "image_path": "1.png", "knowledge concept": "Lengths"},
        {"ID": "1", "key": "2steps_2", "question": "What is the area?", "option": "A. 12; B. 6; C. 24; D. 8",
         "answer": "B", "image_path": "1b.png", "knowledge concept": "Area"},
        {"ID": "7", "key": "1step", "question": "Which shape is red?", "option": "A. circle; B. square",
         "answer": "A", "image_path": "7.png", "knowledge concept": "Shapes"},
    ]
    (root / "wemath" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wemath" / "testmini.json").write_text(json.dumps(rows))
    _image(root / "wemath" / "images" / "1.png", (200, 10, 10))
    _image(root / "wemath" / "images" / "1b.png", (10, 200, 10))
    (root / "wemath" / "images" / "7.png").write_bytes(b"this is not an image")
    expected["wemath"] = [
        # the first answers with the choice's text, not its letter: choice-text grading
        FixtureQuestion("1@2steps_1", "What is the length of AB?\n\nOptions: A. 3; B. 4; C. 5; D. 6", "C", _boxed("5")),
        FixtureQuestion("1@2steps_2", "What is the area?\n\nOptions: A. 12; B. 6; C. 24; D. 8", "B", _boxed("B")),
        FixtureQuestion("7@1step", "Which shape is red?\n\nOptions: A. circle; B. square", "A", _boxed("A"),
                        readable=False),
    ]

    # mathvista: HF AI4Math/MathVista testmini fields, images under mathvista/
    vista = [
        {"pid": "1", "image": "images/1.jpg", "question": "Which bar is tallest?",
         "query": "Hint: answer with the option letter.\nQuestion: Which bar is tallest?\nChoices:\n(A) red\n(B) blue\n(C) green",
         "question_type": "multi_choice", "answer_type": "text", "choices": ["red", "blue", "green"], "answer": "blue",
         "metadata": {"task": "figure question answering"}},
        {"pid": "2", "image": "images/2.jpg", "question": "What is x?", "query": "Question: What is x?",
         "question_type": "free_form", "answer_type": "integer", "choices": None, "answer": "14",
         "metadata": {"task": "geometry problem solving"}},
        {"pid": "10", "image": "images/10.jpg", "question": "What is y?", "query": "Question: What is y? (one decimal)",
         "question_type": "free_form", "answer_type": "float", "choices": None, "answer": "2.5",
         "metadata": {"task": "geometry problem solving"}},
    ]
    for row, color in zip(vista, [(1, 2, 3), (40, 50, 60), (90, 90, 90)]):
        _image(root / "mathvista" / row["image"], color, fmt="JPEG")
    if mathvista_format == "json":
        (root / "mathvista" / "testmini.json").write_text(json.dumps({r["pid"]: r for r in vista}))
    else:
        import pandas as pd

        pd.DataFrame(vista).to_parquet(root / "mathvista" / "testmini.parquet")
    expected["mathvista"] = [
        FixtureQuestion("1", vista[0]["query"], "B", _boxed("blue"), extra={"task": "figure question answering"}),
        FixtureQuestion("2", vista[1]["query"], "14", _boxed("14"), extra={"task": "geometry problem solving"}),
        FixtureQuestion("10", vista[2]["query"], "2.5", _boxed("\\frac{5}{2}"), extra={"task": "geometry problem solving"}),
    ]

    # mathverse: mathverse/testmini.json + mathverse/images/<image>
    verse = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant", "image": "image_1.png",
         "query_cot": "As shown in the figure, find angle B.\nChoices:\nA:30°\nB:60°\nC:90°",
         "question_for_eval": "find angle B.\nChoices:\nA:30°\nB:60°\nC:90°", "answer": "B"},
        {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "image": "image_2.png",
         "query_cot": "According to the question shown in the image, please directly answer the question.",
         "question_for_eval": "find the length", "answer": "5"},
        {"sample_index": "3", "problem_index": "2", "problem_version": "Vision Only", "image": "image_3.png",
         "query_cot": "Answer the question in the image: the perimeter?",
         "question_for_eval": "the perimeter", "answer": "12"},
    ]
    (root / "mathverse").mkdir(parents=True, exist_ok=True)
    (root / "mathverse" / "testmini.json").write_text(json.dumps(verse))
    for row in verse:
        _image(root / "mathverse" / "images" / row["image"], (0, 0, 255))
    expected["mathverse"] = [
        FixtureQuestion("1", verse[0]["query_cot"], "B", _boxed("60^\\circ"), extra={"problem_version": "Text Dominant"}),
        FixtureQuestion("2", verse[1]["query_cot"], "5", _boxed("5"), extra={"problem_version": "Vision Only"}),
        FixtureQuestion("3", verse[2]["query_cot"], "12", _boxed("12"), extra={"problem_version": "Vision Only"}),
    ]

    # mathvision: mathvision/MathVision.tsv + mathvision/images/<index>.jpg
    vision = [
        ("1", "How many dots are there?", "7", "counting"),
        ("2", "What fraction is shaded? Choices: (A) 1/2 (B) 1/3 (C) 1/4", "B", "metric geometry - area"),
        ("3", "What is the ratio?", "0.50", "algebra"),
    ]
    (root / "mathvision" / "images").mkdir(parents=True, exist_ok=True)
    lines = ["index\tquestion\tanswer\tcategory"] + ["\t".join(r) for r in vision]
    (root / "mathvision" / "MathVision.tsv").write_text("\n".join(lines) + "\n")
    _image(root / "mathvision" / "images" / "1.jpg", (5, 5, 5), fmt="JPEG")
    _image(root / "mathvision" / "images" / "2.jpg", (6, 6, 6), fmt="JPEG")  # 3.jpg is missing
    expected["mathvision"] = [
        FixtureQuestion("1", vision[0][1], "7", _boxed("7"), extra={"category": "counting"}),
        FixtureQuestion("2", vision[1][1], "B", _boxed("1/3"), extra={"category": "metric geometry - area"}),
        FixtureQuestion("3", vision[2][1], "0.50", _boxed("0.5"), readable=False, extra={"category": "algebra"}),
    ]

    # hallubench: hallubench/HallusionBench.json + hallubench/images/<filename>; empty filename skipped
    hallu = [
        {"set_id": "0", "figure_id": "0", "question_id": "0", "category": "VD", "subcategory": "illusion",
         "question": "Is the left line longer than the right line? Please answer yes or no.", "gt_answer": "1",
         "filename": "./hallusion_bench/VD/illusion/0_0.png"},
        {"set_id": "0", "figure_id": "1", "question_id": "0", "category": "VD", "subcategory": "illusion",
         "question": "Is the right line longer than the left line?", "gt_answer": "0",
         "filename": "./hallusion_bench/VD/illusion/0_1.png"},
        {"set_id": "3", "figure_id": "0", "question_id": "1", "category": "VS", "subcategory": "chart",
         "question": "According to the chart, is A larger than B", "gt_answer": 1,
         "filename": "hallusion_bench/VS/chart/3_0.png"},
        {"set_id": "3", "figure_id": "0", "question_id": "2", "category": "VS", "subcategory": "chart",
         "question": "Is B larger than A? Is it?", "gt_answer": "0",
         "filename": "./hallusion_bench/VS/chart/3_0.png"},
        {"set_id": "4", "figure_id": "0", "question_id": "0", "category": "VS", "subcategory": "chart",
         "question": "Is Paris the capital of France?", "gt_answer": "1", "filename": ""},
    ]
    (root / "hallubench").mkdir(parents=True, exist_ok=True)
    (root / "hallubench" / "HallusionBench.json").write_text(json.dumps(hallu))
    for name in ("VD/illusion/0_0.png", "VD/illusion/0_1.png", "VS/chart/3_0.png"):
        _image(root / "hallubench" / "images" / "hallusion_bench" / name, (255, 0, 255))
    expected["hallubench"] = [
        FixtureQuestion("0_0_0", "Is the left line longer than the right line" + HALLUBENCH_SUFFIX, "yes",
                        _boxed("Yes"), extra={"subcategory": "illusion"}),
        FixtureQuestion("0_1_0", "Is the right line longer than the left line" + HALLUBENCH_SUFFIX, "no",
                        _boxed("no"), extra={"subcategory": "illusion"}),
        FixtureQuestion("3_0_1", "According to the chart, is A larger than B" + HALLUBENCH_SUFFIX, "yes",
                        _boxed("yes"), extra={"subcategory": "chart"}),
        FixtureQuestion("3_0_2", "Is B larger than A" + HALLUBENCH_SUFFIX, "no", _boxed("no"),
                        extra={"subcategory": "chart"}),
    ]
    return expected
