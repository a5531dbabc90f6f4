"""A few rows of each published benchmark, written at test time in the real layout.

Each fixture is what ``hf download <hub id> --repo-type dataset`` leaves: a
README.md whose YAML names the configs and their splits' parquet files, and the
parquet files with the real column names and types (datasets ``Image`` columns,
lists, a Python list kept as text, ``"1"``/``"0"`` answers, one option string ...),
taken from the datasets' cards and lmms-eval 0.7.3's task definitions. A wrong
column mapping in pipelines/eval/benchmarks.py fails a test on them. The values
follow the benchmarks' documented example rows.
"""

from __future__ import annotations

import io
from pathlib import Path

ROWS: dict[str, dict] = {}  # hub id -> {config: {split: (features, rows)}}


def image(color: str, size: int = 32) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _features():
    import datasets as d

    text, img = d.Value("string"), d.Image()
    mmmu = {"id": text, "question": text, "options": text, "explanation": text,
            **{f"image_{k}": img for k in range(1, 8)}, "img_type": text, "answer": text,
            "topic_difficulty": text}
    return {
        "chartqa": d.Features({"image": img, "query": text, "label": d.List(text),
                               "human_or_machine": d.ClassLabel(names=["human", "machine"])}),
        "mathvista": d.Features({
            "pid": text, "question": text, "image": text, "decoded_image": img,
            "choices": d.List(text), "unit": text, "precision": d.Value("float64"),
            "answer": text, "question_type": text, "answer_type": text,
            "metadata": {"category": text, "context": text, "grade": text,
                         "img_height": d.Value("int64"), "img_width": d.Value("int64"),
                         "language": text, "skills": d.List(text), "source": text,
                         "split": text, "task": text},
            "query": text}),
        "mathverse": d.Features({
            "sample_index": text, "problem_index": text, "problem_version": text,
            "question": text, "image": img, "answer": text, "question_type": text,
            "metadata": {"split": text, "source": text, "subject": text, "subfield": text},
            "query_wo": text, "query_cot": text, "question_for_eval": text}),
        "mathvision": d.Features({"id": text, "question": text, "options": d.List(text),
                                  "image": text, "decoded_image": img, "answer": text,
                                  "solution": text, "level": d.Value("int64"), "subject": text}),
        "mmmu": d.Features({**mmmu, "question_type": text, "subfield": text}),
        "mmmu_pro": d.Features({**mmmu, "subject": text}),
        "mmmu_pro_vision": d.Features({"id": text, "image": img, "options": text,
                                       "answer": text, "subject": text}),
        "mmvet": d.Features({"id": text, "image": img, "question": text, "answer": text,
                             "capability": d.List(text)}),
        "hallusion": d.Features({k: text for k in (
            "category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note",
            "question_id", "question", "gt_answer_details", "gt_answer", "filename")}
            | {"image": img}),
        "visnum": d.Features({"class": text, "id": text, "question": text, "option": text,
                              "answer": text, "task_class": text, "Attributes": text,
                              "image": img}),
        "mmsi": d.Features({"id": d.Value("int64"), "images": d.List(d.Value("binary")),
                            "question_type": text, "question": text, "answer": text,
                            "thought": text}),
    }


def _mmmu_row(id_, question, options, answer, images, kind="multiple-choice", **extra):
    row = {"id": id_, "question": question, "options": repr(options), "explanation": "?",
           **{f"image_{k}": None for k in range(1, 8)}, "img_type": "['Diagrams']",
           "answer": answer, "topic_difficulty": "Medium", **extra}
    for k, color in images.items():
        row[f"image_{k}"] = image(color)
    if "subject" not in extra:
        row.update(question_type=kind, subfield="Financial Accounting")
    return row


def _mathvista_meta():
    return {"category": "math-targeted-vqa", "context": "scientific figure", "grade": "college",
            "img_height": 720, "img_width": 1514, "language": "english",
            "skills": ["scientific reasoning"], "source": "SciBench", "split": "testmini",
            "task": "textbook question answering"}


def datasets_rows() -> dict[str, dict]:
    """hub id -> {config: {split: (features key, rows)}} (config None: "default")."""
    hint = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
    return {
        "HuggingFaceM4/ChartQA": {None: {"test": ("chartqa", [
            {"image": image("white"), "query": "How many food item is shown in the bar graph?",
             "label": ["14"], "human_or_machine": 0},
            {"image": image("white"), "query": "What is the difference in value between Lamb "
             "and Corn?", "label": ["0.57"], "human_or_machine": 0},
            {"image": image("gray"), "query": "What share of voters said yes?", "label": ["50%"],
             "human_or_machine": 1}])}},
        "AI4Math/MathVista": {None: {"testmini": ("mathvista", [
            {"pid": "1", "question": "When a spring does work on an object, we cannot find the "
             "work by simply multiplying the spring force by the object's displacement. By what "
             "distance $d$ is the spring compressed?", "image": "images/1.jpg",
             "decoded_image": image("white"), "choices": None, "unit": None, "precision": 1.0,
             "answer": "1.2", "question_type": "free_form", "answer_type": "float",
             "metadata": _mathvista_meta(), "query": "Hint: ...\nQuestion: When a spring ..."},
            {"pid": "2", "question": "what is the total volume of the measuring cup?",
             "image": "images/2.jpg", "decoded_image": image("white"), "choices": None,
             "unit": "g", "precision": None, "answer": "1000", "question_type": "free_form",
             "answer_type": "integer", "metadata": _mathvista_meta(), "query": "Hint: ..."},
            {"pid": "5", "question": "Find $m\\angle H$", "image": "images/5.jpg",
             "decoded_image": image("white"), "choices": ["97", "102", "107", "122"],
             "unit": None, "precision": None, "answer": "97", "question_type": "multi_choice",
             "answer_type": "text", "metadata": _mathvista_meta(),
             "query": hint + "Question: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122"}])}},
        "AI4Math/MathVerse": {
            "testmini": {"testmini": ("mathverse", [
                {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
                 "question": "As shown in the figure, in triangle ABC, it is known that angle A = "
                 "80.0, angle B = 60.0, DE parallel BC, then the size of angle CED is ()\n"
                 "Choices:\nA:40°\nB:60°\nC:120°\nD:140°", "image": image("white"),
                 "answer": "D", "question_type": "multi-choice",
                 "metadata": {"split": "testmini", "source": "GeoQA",
                              "subject": "Plane Geometry", "subfield": "Angle"},
                 "query_wo": "Please directly answer ...", "query_cot": "Please first ...",
                 "question_for_eval": "As shown in the figure, ... angle CED is ()"},
                {"sample_index": "5", "problem_index": "1", "problem_version": "Vision Only",
                 "question": "", "image": image("gray"), "answer": "D",
                 "question_type": "multi-choice",
                 "metadata": {"split": "testmini", "source": "GeoQA",
                              "subject": "Plane Geometry", "subfield": "Angle"},
                 "query_wo": "Please directly answer ...", "query_cot": "Please first ...",
                 "question_for_eval": "As shown in the figure, ... angle CED is ()"}])},
            "testmini_text_only": {"testmini": ("mathverse", [
                {"sample_index": "1", "problem_index": "1", "problem_version": "Text Only",
                 "question": "In triangle ABC ...", "image": None, "answer": "D",
                 "question_type": "multi-choice",
                 "metadata": {"split": "testmini", "source": "GeoQA",
                              "subject": "Plane Geometry", "subfield": "Angle"},
                 "query_wo": "...", "query_cot": "...", "question_for_eval": "..."}])}},
        "MathLLMs/MathVision": {None: {
            "test": ("mathvision", [
                {"id": "4", "question": "How many different digits can you find in this "
                 "picture?\n<image1>", "options": [], "image": "images/4.jpg",
                 "decoded_image": image("white"), "answer": "6", "solution": None, "level": 1,
                 "subject": "counting"},
                {"id": "39", "question": "Ingrid has 4 red, 3 blue, 2 green and 1 yellow cube. "
                 "Which colour is the cube with the question mark?\n<image1>",
                 "options": ["red", "blue", "green", "Yellow",
                             "This cannot be worked out for certain."],
                 "image": "images/39.jpg", "decoded_image": image("gray"), "answer": "A",
                 "solution": None, "level": 3, "subject": "logic"}]),
            "testmini": ("mathvision", [
                {"id": "4", "question": "How many different digits can you find in this "
                 "picture?\n<image1>", "options": [], "image": "images/4.jpg",
                 "decoded_image": image("white"), "answer": "6", "solution": None, "level": 1,
                 "subject": "counting"}])}},
        "MMMU/MMMU": {
            "Accounting": {"validation": ("mmmu", [
                _mmmu_row("validation_Accounting_1", "Each of the following situations relates "
                          "to a different company. <image 1> For company B, find the missing "
                          "amounts.", ["$63,020", "$58,410", "$71,320", "$77,490"], "B",
                          {1: "white"}),
                _mmmu_row("validation_Accounting_2", "Compare <image 2> with <image 1>: what is "
                          "the total?", [], "1.06", {1: "white", 2: "gray"}, kind="open")]),
                "dev": ("mmmu", [_mmmu_row("dev_Accounting_1", "q <image 1>", ["a", "b"], "A",
                                           {1: "white"})])},
            "Art": {"validation": ("mmmu", [
                _mmmu_row("validation_Art_1", "Which painting is older?", ["<image 1>",
                          "<image 2>"], "A", {1: "white", 2: "gray"})])}},
        "MMMU/MMMU_Pro": {
            "standard (10 options)": {"test": ("mmmu_pro", [
                _mmmu_row("test_History_1", "Which of the following best explains the overall "
                          "trend shown in the <image 1>?",
                          ["Political instability leading to population decline",
                           "The spread of pathogens across the Silk Road",
                           "Development of new trade routes", "Climate change",
                           "Technological innovation", "Agricultural surplus",
                           "Military conquest", "Urbanization", "Migration of nomads",
                           "Rise of religious conflicts along the Silk Road"], "B",
                          {1: "white"}, subject="History")])},
            "standard (4 options)": {"test": ("mmmu_pro", [
                _mmmu_row("test_History_1", "Which ... <image 1>?", ["a", "b", "c", "d"], "B",
                          {1: "white"}, subject="History")])},
            "vision": {"test": ("mmmu_pro_vision", [
                {"id": "test_History_1", "image": image("white"), "options": "['a', 'b']",
                 "answer": "B", "subject": "History"}])}},
        "whyu/mm-vet": {None: {"test": ("mmvet", [
            {"id": "v1_0", "image": image("white"), "question": "What is x in the equation?",
             "answer": "-1<AND>-5", "capability": ["ocr", "math"]},
            {"id": "v1_1", "image": image("gray"), "question": "Which country is highlighted?",
             "answer": "Iceland<OR>Greenland", "capability": ["rec", "know"]}])}},
        "lmms-lab/HallusionBench": {None: {
            "image": ("hallusion", [
                {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0",
                 "figure_id": "0", "sample_note": "circle", "question_id": "0",
                 "question": "Is the right orange circle the same size as the left orange "
                 "circle?", "gt_answer_details": "The right orange circle is the same size as "
                 "the left orange circle.", "gt_answer": "1",
                 "filename": "./hallusion_bench/VD/illusion/0_0.png", "image": image("white")},
                {"category": "VD", "subcategory": "illusion", "visual_input": "2", "set_id": "0",
                 "figure_id": "1", "sample_note": "circle", "question_id": "0",
                 "question": "Is the right orange circle the same size as the left orange "
                 "circle?", "gt_answer_details": "The right orange circle is larger than the "
                 "left orange circle.", "gt_answer": "0",
                 "filename": "./hallusion_bench/VD/illusion/0_1.png", "image": image("gray")}]),
            "non_image": ("hallusion", [
                {"category": "VS", "subcategory": "chart", "visual_input": "0", "set_id": "0",
                 "figure_id": "0", "sample_note": "", "question_id": "0",
                 "question": "Is China the largest producer?", "gt_answer_details": "",
                 "gt_answer": "1", "filename": "", "image": None}])}},
        "GML-FMGroup/VisNumBench": {None: {"train": ("visnum", [
            {"class": "Synthetic", "id": "25_Scale", "question": "Which of the following "
             "options is most likely to be the value of the class C in the figure?",
             "option": "(a) 0.15 (b) 0.27 (c) 0.76 (d) 0.64", "answer": "(c) 0.76",
             "task_class": "value estimation", "Attributes": "Scale", "image": image("white")},
            {"class": "Synthetic", "id": "17_Scale", "question": "Which of the following ranges "
             "is most likely to be the value of the class C in the figure?",
             "option": "(a) (0.50, 0.60) (b) (0.0, 0.10) (c) (0.80, 0.90) (d) (0.20, 0.30)",
             "answer": "(b) (0.0, 0.10)", "task_class": "range estimation",
             "Attributes": "Scale", "image": image("gray")},
            {"class": "Real", "id": "25_Scale", "question": "Which of the following options is "
             "a reasonable estimate of the time the clock in the figure is pointing to?",
             "option": "(a) 1 hours and 26 minutes (b) 10 hours and 43 minutes (c) 3 hours and "
             "55 minutes (d) 6 hours and 28 minutes", "answer": "(c) 3 hours and 55 minutes",
             "task_class": "value estimation", "Attributes": "Scale", "image": image("white")}])}},
        "RunsenXu/MMSI-Bench": {None: {"test": ("mmsi", [
            {"id": 0, "images": [image("white")["bytes"], image("gray")["bytes"]],
             "question_type": "Positional Relationship (Cam.-Obj.)",
             "question": "Where is the sofa relative to the camera in the second image?\n"
             "Options: A: left, B: right, C: behind, D: in front",
             "answer": "B", "thought": "..."}])}},
    }


def write_repos(root: Path) -> Path:
    """Every benchmark's fixture as ``root/<hub id>/`` (a dataset repository's files)."""
    import datasets as d
    import yaml

    features = _features()
    for hub, configs in datasets_rows().items():
        repo = root / hub
        cards = []
        for config, splits in configs.items():
            name = config or "default"
            folder = name.replace(" ", "_").replace("(", "").replace(")", "")
            files = []
            for split, (kind, rows) in splits.items():
                path = repo / folder / f"{split}-00000-of-00001.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                d.Dataset.from_list(rows, features=features[kind]).to_parquet(str(path))
                files.append({"split": split, "path": f"{folder}/{split}-*.parquet"})
            cards.append({"config_name": name, "data_files": files})
        (repo / "README.md").write_text("---\n" + yaml.safe_dump({"configs": cards}) + "---\n")
    return root
