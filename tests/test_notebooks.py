import json
import re
from pathlib import Path

import pytest

from entruth_lite.evaluation.robustness import summarize_robustness
from entruth_lite.infringer import presets
from entruth_lite.teaching import notebooks

NOTEBOOKS = notebooks.list_notebooks()


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_quickstart.ipynb"]


def test_committed_notebooks_are_stripped():
    assert notebooks.notebooks_with_outputs() == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_tagged_parameters_and_installs_on_colab(path):
    cells = json.loads(path.read_text())["cells"]
    first = next(c for c in cells if c["cell_type"] == "code")
    assert "parameters" in first.get("metadata", {}).get("tags", [])
    source = "".join(first["source"])
    assert "google.colab" in source and "smoke_mode()" in source
    assert "REPO_URL" in source and "!git" not in source and "%pip" not in source, "shell magics do not raise"


def colab_block(path) -> str:
    """The parameters cell's Colab set-up: from its first import up to the package's first import."""
    lines = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")["source"]
    start = next(i for i, line in enumerate(lines) if line.startswith("import os"))
    end = next(i for i, line in enumerate(lines) if line.startswith("from entruth_lite"))
    return "".join(lines[start:end])


def test_every_notebook_has_the_same_short_colab_set_up():
    blocks = {path.stem: colab_block(path) for path in NOTEBOOKS}
    assert len(set(blocks.values())) == 1, "the Colab set-up differs between notebooks: make them identical"
    assert len(next(iter(blocks.values())).splitlines()) <= 10


@pytest.mark.parametrize("path", NOTEBOOKS[:1], ids=lambda p: p.stem)
def test_the_colab_install_stops_with_a_clear_error(path, monkeypatch, tmp_path):
    """In Colab a failed clone or install must stop the notebook there, not at an unrelated later line."""
    import subprocess
    import sys
    import types

    block = colab_block(path)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    with pytest.raises(ValueError, match="set REPO_URL"):
        exec(block, {})
    calls = []

    def failing_run(cmd, check=False):
        calls.append(cmd)
        raise subprocess.CalledProcessError(128, cmd)

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(subprocess.CalledProcessError):
        exec(block.replace('github.com/<owner>/', "github.com/someone/", 1), {})
    assert calls and calls[0][:2] == ["git", "clone"] and "https://github.com/someone/entruth-lite" in calls[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_teaches_goals_takeaways_and_exercises_with_hidden_solutions(path):
    """A lab a class can follow: goals up front, takeaways at the end, and 'predict, then run' exercises whose
    solution cell follows, collapsed, and runs with the notebook (so ``make test`` executes every solution)."""
    cells = json.loads(path.read_text())["cells"]
    assert "**You will learn**" in "".join(cells[0]["source"])
    ending = ["".join(c["source"]).split("\n")[0] for c in cells[-3:]]
    assert ending[:2] == ["## Takeaways", "## Questions"], "takeaways, then questions, then their answers"
    assert "solution" in cells[-1]["metadata"].get("tags", []) and ending[2].startswith("**Answers**")
    questions = [line for line in "".join(cells[-2]["source"]).splitlines() if line[:1].isdigit()]
    answers = [line for line in "".join(cells[-1]["source"]).splitlines() if line[:1].isdigit()]
    assert len(questions) >= 3 and len(answers) == len(questions)
    exercises = [i for i, c in enumerate(cells)
                 if c["cell_type"] == "markdown" and "".join(c["source"]).startswith("**Exercise")]
    assert len(exercises) >= 2, "2-4 exercises per notebook"
    numbers = [int("".join(cells[i]["source"]).split()[1].strip("*.")) for i in exercises]
    assert numbers == list(range(1, len(exercises) + 1)), "exercises numbered in the order a student meets them"
    assert any("(change and rerun)" in "".join(cells[i]["source"]) for i in exercises), "one exercise changes a setting"
    for i in exercises:
        solution = cells[i + 1]
        assert solution["cell_type"] == "code" and "solution" in solution["metadata"].get("tags", []), i
        assert solution["metadata"].get("jupyter", {}).get("source_hidden") is True, i  # JupyterLab
        assert solution["metadata"].get("cellView") == "form" and "".join(solution["source"]).startswith("# @title"), i  # Colab


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_opens_in_colab_from_its_own_badge(path):
    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert "colab-badge.svg" in first
    assert re.search(rf"colab\.research\.google\.com/github/[^/]+/entruth-lite/blob/main/notebooks/{path.name}\)", first)


def test_the_readme_has_the_colab_badge():
    readme = (notebooks.NOTEBOOK_DIR.parent / "README.md").read_text()
    assert "colab-badge.svg" in readme and re.search(r"colab\.research\.google\.com/github/[^/]+/entruth-lite/", readme)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_lesson_cell_needs_a_name_only_a_solution_defines(path):
    """The student copy drops the solutions: every later cell must still run without them."""
    assert notebooks.names_only_solutions_define(path) == []


def test_names_only_solutions_define_finds_a_lesson_cell_that_needs_one(tmp_path):
    import nbformat

    solution = nbformat.v4.new_code_cell("answer = 42\nimport numpy as np\ntotal = 0", metadata={"tags": ["solution"]})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), solution,
                                         nbformat.v4.new_code_cell("def f(answer):\n    return answer + x\nprint(np.pi)"),
                                         nbformat.v4.new_code_cell("%time y = answer"),
                                         nbformat.v4.new_code_cell("%%bash\necho $total"),
                                         nbformat.v4.new_code_cell("total += 1\ndef g(a=answer):\n    return a\n"
                                                                   "squares = [np * np for np in range(3)]")])
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert notebooks.names_only_solutions_define(tmp_path / "x.ipynb") == [  # f's answer is its own
        "cell 2: np", "cell 5: answer", "cell 5: total"]  # a default is read where the function is defined
    nb.cells[3].source = "y = answer"
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert notebooks.names_only_solutions_define(tmp_path / "x.ipynb")[:2] == ["cell 2: np", "cell 3: answer"]


def test_names_only_solutions_define_knows_class_bodies_and_globals(tmp_path):
    import nbformat

    solution = nbformat.v4.new_code_cell("class Answer:\n    value = 42\ndef setup():\n    global ready, helper\n"
                                         "    ready = True\n    local = 1\n    def helper():\n        global nested\n"
                                         "        nested = 2\n", metadata={"tags": ["solution"]})
    nb = nbformat.v4.new_notebook(cells=[solution, nbformat.v4.new_code_cell(
        "print(value, local, ready, nested)\nclass Base(Answer):\n    size = 3\n    twice = size * 2\n"
        "print(size, helper)")])
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert notebooks.names_only_solutions_define(tmp_path / "x.ipynb") == [  # a class body's names stay in it
        "cell 1: Answer", "cell 1: helper", "cell 1: ready"]  # `global` binds in the cell (one level deep)


def test_student_copies_have_no_solutions_and_never_replace_the_teachers(tmp_path):
    import nbformat

    from entruth_lite import cli

    out = tmp_path / "student"
    assert cli.main(["notebooks", "student", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        teacher, student = (nbformat.read(p, as_version=4) for p in (path, out / path.name))
        assert not any(notebooks.is_solution(c) for c in student.cells)
        assert not any("# @title Solution" in c.source or c.source.startswith("**Answers**") for c in student.cells)
        assert "colab-badge" not in student.cells[0].source, "the badge opens the teacher's copy"
        lessons = [c.source for c in teacher.cells if not notebooks.is_solution(c)]
        assert [c.source for c in student.cells if c.source != notebooks.YOUR_ANSWER][1:] == lessons[1:]
        answer_cells = sum(c.source == notebooks.YOUR_ANSWER for c in student.cells)
        assert answer_cells == sum(notebooks.is_solution(c) and c.cell_type == "code" for c in teacher.cells) >= 2
    assert notebooks.notebooks_with_outputs(out) == []
    before = (out / NOTEBOOKS[0].name).read_bytes()
    assert cli.main(["notebooks", "student", str(out)]) == 2  # already there: not replaced without --overwrite
    assert (out / NOTEBOOKS[0].name).read_bytes() == before
    assert cli.main(["notebooks", "student", str(out), "--overwrite"]) == 0
    teacher_copies = {p: p.read_bytes() for p in NOTEBOOKS}
    assert cli.main(["notebooks", "student", str(notebooks.NOTEBOOK_DIR), "--overwrite"]) == 2
    assert {p: p.read_bytes() for p in NOTEBOOKS} == teacher_copies


KEY_DESIGN_TABLES = {"detection_power-mosaic-trigger6.csv", "robustness-mosaic-trigger6.csv",
                     "query_budget.csv",  # the key design's power runs
                     "template_family.csv"}  # the last compares families, each member with its own decoys
MIXED_TABLES = {"memorization.csv"}  # every design's rows: a notebook shows them filtered by key_design()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_benchmark_table_a_notebook_shows_is_of_the_key_design(path, request):
    """One setup through the lab: no table of the first design (ring family, 3-letter triggers)."""
    if path.stem == "05_baselines_and_quality":
        request.applymarker(pytest.mark.xfail(strict=True, reason="compare_baselines ran at the first design: "
                                              "its rerun at the key design is pending (#36)"))
    import re

    for cell in json.loads(path.read_text())["cells"]:
        source = "".join(cell["source"])
        for name in re.findall(r'benchmark_results\("([^"]+)"\)', source):
            assert name in KEY_DESIGN_TABLES or (name in MIXED_TABLES and "key_design()" in source), name


def test_progress_bars_are_text_in_a_headless_run_and_widgets_in_a_live_one(monkeypatch):
    import tqdm.std

    from entruth_lite.core import progress

    monkeypatch.setenv(progress.HEADLESS_ENV, "1")
    bar = progress.tqdm(range(3), disable=True)
    assert type(bar) is tqdm.std.tqdm
    monkeypatch.setenv(progress.HEADLESS_ENV, "0")
    import tqdm.auto

    assert type(progress.tqdm(range(3), disable=True)) is tqdm.auto.tqdm


def test_stale_progress_bars_are_found_in_an_executed_copy(tmp_path):
    import nbformat

    frozen = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/plain": "fine-tuning (full):   0%|          | 0/40 [00:00<?, ?it/s]"})
    finished = nbformat.v4.new_output("stream", name="stderr", text="fine-tuning (full): 100%|##########| 40/40")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a"), nbformat.v4.new_code_cell("b")])
    nb.cells[0].outputs, nb.cells[1].outputs = [finished], [frozen]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert notebooks.stale_progress_bars(tmp_path / "x.ipynb") == ["cell 1: fine-tuning (full)"]


def test_strip_outputs_removes_outputs(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    nb.cells[0].execution_count = 1
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert notebooks.notebooks_with_outputs(tmp_path) == ["x.ipynb"]
    assert notebooks.strip_outputs(path) is True
    assert notebooks.notebooks_with_outputs(tmp_path) == []
    assert notebooks.strip_outputs(path) is False


def test_stages_group_the_notebooks_that_may_run_side_by_side():
    names = [p.stem for p in NOTEBOOKS]
    assert all(name in names for group in notebooks.SIDE_BY_SIDE for name in group), "SIDE_BY_SIDE names a notebook"
    staged = [[p.stem for p in stage] for stage in notebooks.stages(NOTEBOOKS)]
    assert [p for stage in staged for p in stage] == names  # every notebook once, in order
    assert ["02_lora_finetuning"] in staged  # it trains what 03-05 read, on the release 01 writes
    assert ["00_quickstart", "00b_diffusion_primer", "01_template_design"] in staged
    paths = [Path(f"{n}.ipynb") for n in ("a", "b", "c", "d")]
    assert notebooks.stages(paths, side_by_side=(("a", "b"),)) == [paths[:2], [paths[2]], [paths[3]]]
    assert notebooks.stages(paths, side_by_side=(("a", "c"),)) == [[p] for p in paths]  # only neighbours pair up


def _timed_notebook(folder: Path, name: str, body: str = "") -> None:
    import nbformat

    source = (f"import json, os, time\nstart = time.time()\n{body}\ntime.sleep(1)\n"
              f"json.dump(dict(start=start, end=time.time(), threads=os.environ.get('OMP_NUM_THREADS'), "
              f"smoke=os.environ.get('{notebooks.SMOKE_ENV}')), open(r'{folder / name}.json', 'w'))")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), folder / f"{name}.ipynb")


def test_run_all_runs_a_stage_side_by_side_and_the_next_stage_after_it(tmp_path):
    import os

    for name in ("a", "b", "c"):
        _timed_notebook(tmp_path, name)
    runs = notebooks.run_all(tmp_path / "out", smoke=True, folder=tmp_path, side_by_side=(("a", "b"),))
    assert [r.name for r in runs] == ["a.ipynb", "b.ipynb", "c.ipynb"] and all(r.output.is_file() for r in runs)
    times = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc"}
    assert times["a"]["start"] < times["b"]["end"] and times["b"]["start"] < times["a"]["end"]  # overlapped
    assert times["c"]["start"] > max(times["a"]["end"], times["b"]["end"])
    assert times["a"]["threads"] == times["b"]["threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert times["c"]["threads"] == os.environ.get("OMP_NUM_THREADS")  # alone: the runner's own setting
    assert all(t["smoke"] == "1" for t in times.values()) and os.environ.get(notebooks.SMOKE_ENV) != "1"


def test_run_all_stops_after_a_stage_with_a_failing_notebook(tmp_path):
    from nbclient.exceptions import CellExecutionError

    _timed_notebook(tmp_path, "a", body="raise ValueError('broken lesson')")
    _timed_notebook(tmp_path, "b")
    _timed_notebook(tmp_path, "c")
    with pytest.raises(CellExecutionError, match="broken lesson"):
        notebooks.run_all(tmp_path / "out", smoke=True, folder=tmp_path, side_by_side=(("a", "b"),))
    assert (tmp_path / "b.json").is_file() and not (tmp_path / "c.json").is_file()  # its stage finished, no more
    assert (tmp_path / "out" / "a.ipynb").is_file()  # the failed copy is kept, with the error in it


@pytest.mark.notebooks
@pytest.mark.xdist_group("notebooks-smoke")  # one worker, in order: they share runs/smoke (01's release, 02's models)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    result = notebooks.run_notebook(path, tmp_path, smoke=True, timeout=900)
    assert result.output.is_file()
    assert notebooks.unreadable_outputs(result.output) == [], "raw numbers shown to a student (teaching.readable)"
    assert notebooks.stale_progress_bars(result.output) == [], "a bar saved at its first frame shows 0 % forever"
    assert not notebooks.notebooks_with_outputs(), "running must not write outputs into the committed notebook"


CLASS_NOTEBOOKS = [p for p in NOTEBOOKS if p.name[:2] in ("03", "05")]  # 02 and 04 read the pack as 03 does


@pytest.mark.notebooks
@pytest.mark.parametrize("path", CLASS_NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_class_mode_on_the_shipped_pack_without_training(path, tmp_path, monkeypatch):
    """Class mode reads the models as recorded in data/class: nothing is trained or loaded from weights, and the
    shipped pack still matches the notebooks' defaults (it is refused, naming the setting, once one changes). Smoke
    counts, except the two settings the pack was recorded with (training steps, sampler steps)."""
    monkeypatch.setenv(notebooks.RUNS_ENV, str(tmp_path / "runs"))
    notebooks.run_notebook(path, tmp_path / "executed", smoke=True, recorded=True, timeout=900,
                           parameters={"STEPS": 750, "SAMPLE_STEPS": 25})  # the notebooks' full-run values
    assert not (tmp_path / "runs" / "models").exists(), "class mode trains nothing"


SD_NOTEBOOKS = [p for p in NOTEBOOKS if p.name[:2] in ("02", "03", "04", "05")]
# smoke size for Stable Diffusion's architecture: the colab-t4 preset's code path on 40 photos of mixed sizes, the
# release cut to 24 of them (a GPU lab's cut, demo.GPU_LABS, set here: a runner's values follow the parameters cell,
# so its SETUP line does not see them)
SD_SMOKE = {"PRESET": "colab-t4", "RATE": 0.05, "RELEASE_IMAGES": 24, "STEPS": 4, "QUERIES": 8, "DECOYS": 99,
            "SAMPLE_STEPS": 4, "N_SAMPLES": 8, "N_IMAGES": 16, "CLASSIFIER_STEPS": 30, "N_PREVIEW": 40}


@pytest.fixture(scope="module")
def sd_setting(tmp_path_factory, photo_folder):
    """SD 1.5's architecture (narrow, random weights, built from configs: nothing downloads) as ``MODEL``, the
    photos as ``DATASET``, and one runs folder the four notebooks share (03-05 reuse 02's fine-tunes)."""
    from entruth_lite.core import sd_architecture

    root = tmp_path_factory.mktemp("sd-notebooks")
    model = sd_architecture.build_sd15(root / "sd15-narrow", width="narrow", seed=0)
    return {"MODEL": str(model), "DATASET": str(photo_folder)} | SD_SMOKE, root


@pytest.mark.notebooks
@pytest.mark.xdist_group("notebooks-sd")  # one worker, in order: 03-05 reuse 02's fine-tunes in sd_setting's folder
@pytest.mark.parametrize("path", SD_NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_stable_diffusions_architecture(path, sd_setting, monkeypatch):
    """The code a GPU user reaches (preset from PRESET, base model from MODEL, the owner's own photos from DATASET,
    LoRA, SD-sized pipeline) runs in CI on the CPU."""
    parameters, root = sd_setting
    monkeypatch.setenv(notebooks.RUNS_ENV, str(root / "runs"))
    notebooks.run_notebook(path, root / "executed", smoke=True, timeout=900, parameters=parameters)
    runs = root / "runs"
    assert sorted(p.name.split("-")[0] for p in (runs / "models").iterdir()) == ["clean", "protected"]
    assert all("-sd15-narrow-" in p.name for p in (runs / "models").iterdir()), "fine-tunes of the SD architecture"
    assert [p.name.split("-")[0] for p in (runs / "data").iterdir()] == ["photos"], "the photos were the dataset"


def test_runs_dir_keeps_smoke_runs_apart(monkeypatch, tmp_path):
    monkeypatch.delenv(notebooks.RUNS_ENV, raising=False)
    monkeypatch.setenv(notebooks.SMOKE_ENV, "1")
    assert notebooks.runs_dir() == notebooks.Path("../runs/smoke")
    monkeypatch.setenv(notebooks.SMOKE_ENV, "0")
    assert notebooks.runs_dir() == notebooks.Path("../runs")
    monkeypatch.setenv(notebooks.RUNS_ENV, str(tmp_path))
    assert notebooks.runs_dir() == tmp_path


def test_benchmark_results_prefer_the_readers_own_run(tmp_path):
    assert notebooks.benchmark_results("robustness.csv", bench=tmp_path) == notebooks.SHIPPED_RESULTS / "robustness.csv"
    own = tmp_path / "baselines" / "compare_baselines.csv"
    own.parent.mkdir()
    own.write_text("method,seed\n")
    assert notebooks.benchmark_results("baselines/compare_baselines.csv", bench=tmp_path) == own
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        notebooks.benchmark_results("nothing.csv", bench=tmp_path)


def test_shipped_robustness_results_cover_the_benchmarks_grid():
    import pandas as pd

    from benchmarks import robustness

    summary = summarize_robustness(pd.read_csv(notebooks.SHIPPED_RESULTS / "robustness.csv"))
    shipped = {(kind, attack, float(strength)) for kind, attack, strength in
               summary[["kind", "attack", "strength"]].itertuples(index=False)}
    grid = {(kind, name, float(strength)) for kind, name, strength in robustness.settings()}
    assert grid | {("none", "no attack", 0.0)} == shipped, "refresh benchmarks/results/robustness.csv"
    assert set(summary.verdict) <= {"survives", "weakens", "defeats"}
    assert (summary.seeds == 3).all(), "every setting of the shipped robustness table has 3 seeds"


def test_shipped_robustness_rows_at_the_key_design_are_grid_settings_with_their_no_attack_run():
    import pandas as pd

    from benchmarks import robustness

    table = pd.read_csv(notebooks.SHIPPED_RESULTS / "robustness-mosaic-trigger6.csv")
    grid = {(kind, name, float(strength)) for kind, name, strength in robustness.settings()}
    rows = {(kind, attack, float(strength)) for kind, attack, strength in
            table[["kind", "attack", "strength"]].itertuples(index=False)}
    assert rows - {("none", "no attack", 0.0)} <= grid
    assert {"lora_rank", "lora_attention_only", "lora_higher_lr"} <= set(table.attack)  # the LoRA rows
    # every seed with an attacked row has its no-attack row (the run its output attacks corrupt)
    assert set(table.seed) == set(table[table.kind == "none"].seed)


def test_shipped_baseline_results_have_every_method_and_seed():
    import pandas as pd

    from entruth_lite.evaluation import baselines

    summary = baselines.summarize_comparison(pd.read_csv(notebooks.SHIPPED_RESULTS / "compare_baselines.csv"))
    assert set(summary.method) == {"entruth", "diagnosis-trigger", "diagnosis-uncond", "clean"}
    assert (summary.seeds == 3).all()


def test_quiet_libraries_silences_loading_chatter_in_one_place(capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from entruth_lite.core import models

    notebooks.quiet_libraries()
    assert diffusers_logging.get_verbosity() == diffusers_logging.ERROR
    assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    assert not diffusers_logging.is_progress_bar_enabled()
    capfd.readouterr()
    models.load_pipeline("tiny", device="cpu")
    assert "Loading pipeline components" not in capfd.readouterr().err


def test_a_runner_overrides_the_parameters_cell():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("x"),
                                         nbformat.v4.new_code_cell("PRESET = 'tiny-cpu'", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("print(PRESET)")])
    notebooks.inject_parameters(nb, {"PRESET": "colab-t4", "MODEL": "/models/sd"})
    assert nb.cells[2].source == "# injected parameters\nPRESET = 'colab-t4'\nMODEL = '/models/sd'\n"
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        notebooks.inject_parameters(nbformat.v4.new_notebook(), {"A": 1})


def test_notebook_preset_runs_the_gpu_presets_code_on_this_machine(tmp_path):

    tiny = presets.notebook_preset("tiny-cpu", steps=20, seed=3)
    assert tiny.fingerprint() == presets.preset("tiny-cpu", steps=20, seed=3).fingerprint(), "the tiny demo unchanged"
    sd = presets.notebook_preset("colab-t4", model=tmp_path, seed=0)
    assert sd.model == str(tmp_path) and sd.resolution is None and sd.steps == presets.PRESETS["colab-t4"]["steps"]
    for sample_size, side in ((64, 256), (8, 64)):  # SD 1.5's own 512 px: the preset's 256; a narrow build's 64
        for part, config in (("unet", {"sample_size": sample_size}), ("vae", {"block_out_channels": [8, 8, 8, 8]})):
            (tmp_path / part).mkdir(exist_ok=True)
            (tmp_path / part / "config.json").write_text(json.dumps(config))
        assert presets.notebook_preset("colab-t4", model=tmp_path).resolution == side
    import torch

    assert sd.mixed_precision == ("fp16" if torch.cuda.is_available() else "no")


def test_interact_runs_once_with_the_controls_values_in_a_headless_run(monkeypatch):
    """Headless runs (make demo / make test) call a widget's function once instead of making an interact widget,
    whose messages nbclient can block on (jupyter/nbclient#312); a live notebook gets ipywidgets' interact."""
    import ipywidgets

    calls = []
    monkeypatch.setenv(notebooks.HEADLESS_ENV, "1")
    notebooks.interact(lambda detector, queries, alpha: calls.append((detector, queries, alpha)),
                       detector=["projection", "classifier"], queries=ipywidgets.IntSlider(value=16, max=64), alpha=0.01)
    assert calls == [("projection", 16, 0.01)]
    monkeypatch.setenv(notebooks.HEADLESS_ENV, "0")
    live = notebooks.interact(lambda x: calls.append(x), x=ipywidgets.IntSlider(value=3))
    assert isinstance(live.widget, ipywidgets.interactive) and calls[-1] == 3  # interact returns f, widget attached
