"""The benchmarks' shared helpers (``benchmarks.common``): run naming, seeded attacks, cached scores, tables."""

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import common
from entruth_lite.core import emoji
from entruth_lite.infringer import presets
from entruth_lite.owner import decoys


def test_every_run_folder_is_named_by_one_rule(tmp_path):
    run = common.Run.named(tmp_path, common.rate_name(0.01, 1500), 0.01, seed=2, steps=1500)
    assert run.folder == common.run_folder(tmp_path, "rate0.01-steps1500", 2) == tmp_path / "rate0.01-steps1500-seed2"
    assert run.key == run.folder / "key" and not run.done
    run.probe_file.parent.mkdir(parents=True)
    run.probe_file.write_bytes(b"")
    assert run.done


def test_runs_of_the_first_key_design_keep_their_names_and_other_designs_get_their_own():
    from benchmarks import null_calibration, robustness

    assert robustness._tag("none", "no attack", 0, 0.02) == common.rate_name(0.02, robustness.STEPS)  # power's runs
    assert robustness._tag("training", "lora_rank", 8, 0.02) == "attack-training-lora_rank-8-rate0.02"
    assert null_calibration.run_name("random", 750, 3) == "rate0-steps750"
    design = common.design_suffix("mosaic", 6)
    assert design == "-mosaic-trigger6" and common.design_suffix("random", 3) == ""
    assert robustness._tag("none", "no attack", 0, 0.02, design) == "rate0.02-steps1500-mosaic-trigger6"
    assert robustness._tag("training", "lora_rank", 8, 0.02, design) == "attack-training-lora_rank-8-rate0.02-mosaic-trigger6"
    assert null_calibration.run_name("mosaic", 750, 6) == "null-mosaic-trigger6-steps750"


def test_the_power_benchmark_names_its_runs_and_tables_by_key_design(tmp_path, monkeypatch):
    """Its runs at another design are the robustness benchmark's no-attack runs, and its tables stay apart."""
    import sys

    from benchmarks import detection_power, robustness

    seen = []
    monkeypatch.setattr(detection_power, "fit_and_probe", lambda root, rate, seed, steps, **kw: seen.append(kw["name"]))
    monkeypatch.setattr(sys, "argv", ["detection_power", "--rates", "0.02", "--seeds", "0", "--family", "mosaic",
                                      "--trigger-length", "6", "--train-only", "--out", str(tmp_path)])
    detection_power.main()
    assert seen == [robustness._tag("none", "no attack", 0, 0.02, common.design_suffix("mosaic", 6))]


def test_seeded_attack_gives_each_seed_its_own_draws():
    calls = []

    def seeded(released, out, overwrite, seed=0):
        calls.append(("seeded", seed, overwrite))

    def unseeded(released, out, overwrite):  # de-duplication draws nothing
        calls.append(("unseeded", None, overwrite))

    common.seeded_attack(seeded, seed=2)("in", "out", None)
    common.seeded_attack(partial(seeded), seed=1)("in", "out", None)
    common.seeded_attack(unseeded, seed=2)("in", "out", None)
    assert calls == [("seeded", 2, True), ("seeded", 1, True), ("unseeded", None, True)]


def test_cached_scores_compute_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(3.0)}

    first = common.cached_scores(tmp_path / "s.npz", compute)
    second = common.cached_scores(tmp_path / "s.npz", compute)
    assert len(calls) == 1 and np.array_equal(first["a"], second["a"])


def test_tables_print_as_markdown_and_save_as_csv(tmp_path, capsys):
    rows = [dict(setting="full", p=0.001234, kept=None), dict(setting="lora", p=0.5, kept=0.25)]
    table = common.write_table(rows, tmp_path / "t.csv", dict(p=".1e", kept=".0%"))
    printed = capsys.readouterr().out
    assert "| setting | p | kept |" in printed and "| full | 1.2e-03 | - |" in printed and "| lora | 5.0e-01 | 25% |" in printed
    assert pd.read_csv(tmp_path / "t.csv").equals(table)
    assert common.write_table([], tmp_path / "none.csv") is None and not (tmp_path / "none.csv").exists()


def test_results_readme_is_generated_from_the_shipped_csvs():
    from benchmarks import results_readme

    shipped = (results_readme.RESULTS / "README.md").read_text(encoding="utf-8")
    assert results_readme.render() == shipped, "regenerate it: python -m benchmarks.results_readme"
    for name in ("detection_power.csv", "null_calibration.csv", "compare_baselines.csv", "robustness.csv"):
        assert (results_readme.RESULTS / name).is_file(), name


def test_every_table_a_notebook_reads_is_shipped():
    """A fresh clone has no runs/bench: each ``benchmark_results("...")`` in a notebook must find a shipped copy."""
    import re

    from benchmarks import results_readme
    from entruth_lite.teaching.notebooks import list_notebooks

    read = {Path(name).name for nb in list_notebooks()
            for name in re.findall(r'benchmark_results\(\\?"([^"\\]+)', nb.read_text(encoding="utf-8"))}
    assert "detection_power-mosaic-trigger6.csv" in read and "memorization.csv" in read
    assert sorted(n for n in read if not (results_readme.RESULTS / n).is_file()) == []


def test_gpu_estimates_are_current_and_size_each_preset_to_its_card():
    """The shipped estimates are the presets' own (a preset change must rerun them); the lab's two T4 fine-tunes fit
    one free Colab session (about an hour) and, on the release the lab gives them, show each image as often as the
    CPU preset that memorizes, with the CPU lab's number of templated images; every preset fits its card with a
    margin, by the stated assumptions."""
    import pandas as pd

    from benchmarks import gpu_estimates
    from entruth_lite.owner import selection
    from entruth_lite.teaching import demo

    rows = pd.DataFrame(gpu_estimates.rows())
    shipped = pd.read_csv(gpu_estimates.RESULTS / "gpu_estimates.csv")
    assert rows.to_dict("records") == shipped.to_dict("records"), "rerun: python -m benchmarks.gpu_estimates"
    assert set(rows.preset) == set(presets.gpu_presets()) == {"colab-t4", "a100"} and rows.fits_with_margin.all()
    tiny = presets.exposures(presets.preset("tiny-cpu"), len(emoji.emoji_splits().owner))
    for row in rows.itertuples():
        assert presets.exposures(presets.preset(row.preset), row.lab_release) == pytest.approx(row.passes, abs=0.05)
        assert row.passes >= round(tiny, 1), f"{row.preset}: fewer passes than the CPU preset that memorizes"
        assert row.templated == selection.count_for(len(emoji.emoji_splits().owner), rate=demo.LAB.rate)
    t4 = rows.set_index("preset").loc["colab-t4"]
    per_image = gpu_estimates.SECONDS_PER_IMAGE_512["colab-t4"] * (256 / 512) ** 2
    assert t4.est_lab_minutes == round(2 * t4.images_shown * per_image / 60)
    assert t4.est_lab_minutes <= 60 and t4.resolution == 256 and t4.lab_release <= t4.max_release_at_tiny_exposures
    assert t4.max_release_at_tiny_exposures == int(t4.images_shown // t4.tiny_exposures)


def test_template_family_scores_each_member_against_its_own_decoys():
    from PIL import Image

    from benchmarks import template_family

    foregrounds = [Image.new("RGB", (32, 32), colour) for colour in ((255, 255, 255), (200, 60, 60))]
    rows = template_family.member_rows("mosaic", 0, 5, foregrounds)
    assert [r["method"] for r in rows] == ["projection", "ncc"]
    for row in rows:  # after the VAE most of the surround survives, and no decoy matches it as well
        assert 0.5 < row["own"] <= 1.05 and 0 < row["q99_ratio"] <= row["max_ratio"] < 1
        assert row["decoys_at_or_above"] == 0
    import pandas as pd

    summary = template_family.summarize(pd.DataFrame(rows))
    assert summary.loc[0, "members"] == 1 and summary.loc[0, "members_with_a_decoy_at_or_above"] == 0


def test_the_tiny_lora_preset_is_the_setting_the_sweep_measured():
    """The preset's detection rates are the sweep's rows for this setting: the two must not drift apart."""
    from benchmarks import memorization_sweep as sweep

    measured = {k: v for k, v in sweep.SETTINGS[sweep.TINY_LORA_PRESET_SETTING].items() if k not in sweep.NOT_TRAINING}
    assert presets.preset("tiny-cpu", **measured).fingerprint() == presets.preset("tiny-cpu-lora").fingerprint()
    assert presets.preset("tiny-cpu").fingerprint() == presets.preset("tiny-cpu", **{
        k: v for k, v in sweep.SETTINGS["full-mosaic-trigger6"].items() if k not in sweep.NOT_TRAINING}).fingerprint()


def test_the_sweeps_full_fine_tune_at_the_key_design_reads_the_power_benchmarks_runs():
    """Same release, same settings: its rows are detection_power's runs (archived), not a second training."""
    from benchmarks import memorization_sweep as sweep

    assert sweep.tag(sweep.POWER_RUN_SETTING, 0.01) == common.rate_name(0.01, 1500) + common.design_suffix("mosaic", 6)
    archived = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "runs"
    assert (archived / f"{sweep.tag(sweep.POWER_RUN_SETTING, 0.01)}-seed0" / "probe.npz").is_file()
    setting = "lora-r8-all-te-mosaic-trigger6-alpha22.6"
    assert sweep.tag(setting, 0.02) == f"mem-{setting}-rate0.02"


def test_the_frontier_runs_settings_as_their_users_do_and_scores_every_snapshot(tmp_path, monkeypatch):
    """Epochs become steps on the release; one run gives a row per snapshot, each with the evidence of its stored
    probe and what it learned as a share of the reference fine-tune's gain (the reference's own last row: 1). The
    statistic search then scores the runs' stored probes: each run's last snapshot, and its base as a clean model."""
    from benchmarks import frontier

    lora = frontier.config_for("diffusers-lora", 1005, seed=2)
    assert (lora.steps, lora.batch_size, lora.lora_rank, lora.learning_rate) == (6282, 16, 4, 1e-4)
    assert lora.sample_latents and not lora.train_text_encoder and lora.lora_targets == presets.LORA_UNET_TARGETS
    assert frontier.snapshot_steps(6282)[:2] == [628, 1256] and frontier.snapshot_steps(6282)[-1] == 6282
    assert frontier.config_for("tiny-cpu", 1005, 0).fingerprint() == presets.preset(
        "tiny-cpu", seed=0, checkpoint_every=0).fingerprint()
    monkeypatch.setattr(frontier, "SNAPSHOTS", 2)
    monkeypatch.setattr(frontier, "KID_SAMPLES", 4)
    monkeypatch.setattr(frontier, "SAMPLE_STEPS", 4)
    monkeypatch.setattr(frontier, "RELEASE_IMAGES", 8)
    monkeypatch.setattr(frontier, "SETTINGS", {"tiny-cpu": dict(steps=2, batch_size=4),
                                               "quick-lora": dict(method="lora", lora_rank=4, steps=2, batch_size=4)})
    from entruth_lite.core import data
    from entruth_lite.core import emoji as emoji_data

    images, captions, names = emoji_data.emoji_dataset("owner", limit=60)  # a small owner: common.owner_dataset reuses it
    data.save_imagefolder(images, captions, tmp_path / "owner", file_names=names)
    frontier.main(["--settings", "tiny-cpu", "quick-lora", "--rates", "0.05", "--seeds", "0", "--queries", "4",
                   "--out", str(tmp_path)])
    import pandas as pd

    table = pd.read_csv(tmp_path / "frontier.csv")
    assert list(table.step) == [0, 1, 2, 0, 1, 2] and set(table.setting) == {"tiny-cpu", "quick-lora"}
    base_rows = table[table.step == 0]
    assert (base_rows.release_loss_share == 0).all() and base_rows.release_loss.nunique() == 1, "one base, shared"
    reference_end = table[(table.setting == "tiny-cpu") & (table.step == 2)].iloc[0]
    assert reference_end.release_loss_share == pytest.approx(1.0) and reference_end.kid_share == pytest.approx(1.0)
    assert ((table.decoy_p > 0) & (table.decoy_p <= 1)).all() and table.over_threshold.between(0, 1).all()
    frontier.main(["--settings", "tiny-cpu", "quick-lora", "--rates", "0.05", "--seeds", "0", "--out", str(tmp_path),
                   "--report-only"])
    assert pd.read_csv(tmp_path / "frontier.csv").equals(table), "re-scoring the stored probes gives the same table"
    from benchmarks import decoy_statistic

    decoy_statistic.main(["--decoys", "40", "--out", str(tmp_path), "--results", str(tmp_path)])
    runs = pd.read_csv(tmp_path / "decoy_statistic_runs.csv")
    names = {"frontier-tiny-cpu-rate0.05-seed0", "frontier-quick-lora-rate0.05-seed0"}
    assert set(runs.run) == names | {f"{n}/base" for n in names} and set(runs[runs.guilty].run) == names
    zeros = np.zeros((2, 4))
    assert set(runs.statistic) == set(decoy_statistic.candidate_statistics(zeros, zeros, zeros, (zeros, zeros))) \
        and set(runs.queries) == {4}, "every candidate; query counts above the probe's are cut to its size"
    assert runs.p_value.between(1 / 41, 1).all()
    from entruth_lite.owner import keys, probe

    folder = tmp_path / "frontier-tiny-cpu-rate0.05-seed0"
    key = keys.load_key(folder / "key")
    for statistic in ("mean", "unit-mean"):
        audit_p = decoys.rank_released(probe.load_probe(sorted((folder / "probes").glob("step-*.npz"))[-1]),
                                       key.template, key.key_sha256, 40, statistic_name=statistic,
                                       progress=False).verdict.p_value
        assert runs[(runs.run == folder.name) & (runs.statistic == statistic)].p_value.item() == \
            pytest.approx(audit_p), "one stream for every candidate gives the audit's own p-value"
    for cache in tmp_path.glob("frontier-*/decoy-counts-*.json"):
        cache.unlink()
    decoy_statistic.main(["--decoys", "40", "--out", str(tmp_path), "--results", str(tmp_path)])
    order = ["run", "statistic", "queries"]
    again = pd.read_csv(tmp_path / "decoy_statistic_runs.csv").sort_values(order, ignore_index=True)
    assert again.equals(runs.sort_values(order, ignore_index=True)), \
        "the unit candidates counted alone, the others read from the table: the same table"


def test_the_statistic_search_finds_the_power_and_null_runs_by_their_folder_names(tmp_path):
    from benchmarks import common, decoy_statistic, null_calibration

    design = common.design_suffix("mosaic", 6)
    names = {common.rate_name(0.02, 1500) + design: True, common.rate_name(0.0, 1500) + design: False,
             null_calibration.run_name("mosaic", 1500, 6): False, common.rate_name(0.02, 750) + design: None,
             common.rate_name(0.02, 1500): None}  # None: another design or step count, not scored
    for name in names:
        folder = common.run_folder(tmp_path, name, 3)
        folder.mkdir()
        (folder / "probe.npz").write_bytes(b"")
    found = {run["run"]: run["guilty"] for run in decoy_statistic.stored_runs(tmp_path)}
    assert found == {f"{name}-seed3": guilty for name, guilty in names.items() if guilty is not None}


def test_the_statistic_search_chooses_on_one_half_and_reports_the_other():
    from benchmarks import decoy_statistic

    halves = [decoy_statistic.half_of(f"run-{i}") for i in range(200)]
    assert halves == [decoy_statistic.half_of(f"run-{i}") for i in range(200)] and 70 < halves.count("choose") < 130
    rows = [dict(run="a", half="choose", guilty=True, statistic="mean", queries=64, p_value=1e-3),
            dict(run="a", half="choose", guilty=True, statistic="median", queries=64, p_value=0.2),
            dict(run="b", half="report", guilty=True, statistic="mean", queries=64, p_value=0.5),
            dict(run="b", half="report", guilty=True, statistic="median", queries=64, p_value=1e-4),
            dict(run="c", half="report", guilty=False, statistic="median", queries=64, p_value=0.004)]
    rows = [dict(row, max_decoys=9999) for row in rows]
    summary = pd.DataFrame(decoy_statistic.summarize(rows))
    assert set(summary[summary.chosen].statistic) == {"mean"}, "the report half's better numbers do not choose"
    report = summary[(summary.half == "report") & (summary.statistic == "median")].iloc[0]
    assert (report.detected, report.clean, report.clean_flagged) == (1, 1, 1)
    null = {row["statistic"]: row for row in decoy_statistic.null_summary(rows)}
    assert set(null) == {"median"} and null["median"]["models"] == 1, "clean models only, of both halves"
    assert null["median"]["flagged_at_0.01"] == 1 and null["median"]["p_rate_above_0.01"] == pytest.approx(0.01)


def test_the_plain_count_statistic_counts_trigger_images_over_each_templates_own_threshold():
    from benchmarks import decoy_statistic

    plain = np.tile(np.arange(100.0), (2, 1))  # 1 % of plain images over the threshold: scores >= 99
    plain[1] += 50
    trigger = np.array([[99.5, 120, 3, 0], [99.5, 120, 200, 0]])
    counts = decoy_statistic._plain_count(trigger, plain, np.zeros((2, 4)))
    assert np.allclose(counts, [2, 1])  # template 0: 99.5 and 120 reach its 99; template 1: only 200 reaches 149


def test_the_decoy_scale_benchmark_times_every_case(tmp_path):
    from benchmarks import decoy_scale

    decoy_scale.main(["--decoys", "300", "--ring-decoys", "30", "--queries", "4", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "decoy_scale.csv")
    assert set(table.statistic) == {decoys.DEFAULT_STATISTIC}, "it times the audit's own statistic"
    assert list(zip(table.family, table.image_px, table.model)) == [
        ("mosaic", 32, "clean"), ("mosaic", 32, "memorized"), ("mosaic", 512, "clean"), ("mosaic", 512, "memorized"),
        ("ring", 32, "memorized")]
    memorized = table[table.model == "memorized"]
    assert (memorized.drawn == memorized.max_decoys).all() and (memorized.at_least == 0).all(), "at the floor"
    assert np.allclose(memorized.p_value, 1 / (memorized.max_decoys + 1)) and list(table.work_px) == [32, 32, 64, 64, 32]
    clean = table[table.model == "clean"]
    assert ((clean.at_least == 20) & (clean.drawn < clean.max_decoys)).all(), "a clean model's audit stops early"


def test_the_query_budget_ranks_the_first_n_queries_of_each_stored_probe(tmp_path):
    from PIL import Image

    from benchmarks import query_budget
    from entruth_lite.core import data, templates
    from entruth_lite.core import emoji as emoji_data
    from entruth_lite.owner import keys, probe, protect

    images, captions, names = emoji_data.emoji_dataset("owner", limit=60)
    owner = data.save_imagefolder(images, captions, tmp_path / "owner", file_names=names)
    run = common.Run.named(tmp_path, common.rate_name(0.05, 1500) + common.design_suffix("mosaic", 6), 0.05, 0, 1500)
    protect.protect(owner, "mosaic:0", tmp_path / "released", run.key, rate=0.05, seed=0)
    key = keys.load_key(run.key)
    memorized = [Image.blend(image, templates.insert(image, key.template), 0.6) for image in images[:8]]
    probe.save_probe(probe.ProbeResult([f"c{i}" for i in range(8)], [f"t c{i}" for i in range(8)], list(range(8)),
                                       memorized, images[8:16]), run.probe_file)
    arguments = ["--rates", "0.05", "--seeds", "0", "1", "--queries", "1", "8", "--decoys", "300", "--out",
                 str(tmp_path), "--results", str(tmp_path)]
    query_budget.main(arguments)
    table = pd.read_csv(tmp_path / "query_budget.csv")
    assert list(table.queries) == [1, 8] and set(table.seed) == {0}, "seed 1 has no stored probe: left out"
    full = table[table.queries == 8].iloc[0]
    assert (full.drawn, full.p_value) == (300, pytest.approx(1 / 301)), "8 memorized queries beat every decoy"
    query_budget.main(arguments)
    assert pd.read_csv(tmp_path / "query_budget.csv").drop(columns="seconds").equals(table.drop(columns="seconds"))
    from benchmarks import decoy_statistic

    decoy_statistic.statistics_of_run(run.folder, run.probe_file, tmp_path, 300, progress=False)
    shutil.rmtree(run.folder / "query-budget")
    query_budget.main(arguments)
    from_search = pd.read_csv(tmp_path / "query_budget.csv")
    assert from_search.drop(columns="seconds").equals(table.drop(columns="seconds")), \
        "the search's stream is the audit's"
    assert list(from_search.seconds.isna()) == [False, True], "1 query: not in the search, ranked here"


def test_a_finished_run_is_archived_and_a_new_machine_restores_it_instead_of_training(tmp_path, monkeypatch):
    from benchmarks import archive_runs, common

    run = common.Run.named(tmp_path / "bench", "rate0.02-steps1500-mosaic-trigger6", 0.02, 0, 1500)
    (run.folder / "key").mkdir(parents=True)
    (run.folder / "key" / "key.json").write_text('{"trigger": "zq"}')
    (run.folder / "run.json").write_text('{"rate": 0.02}')
    np.savez(run.probe_file, trigger=np.arange(6, dtype=np.uint8))
    (run.folder / "model").mkdir()
    (run.folder / "model" / "weights.safetensors").write_bytes(b"big")
    archive = tmp_path / "archive"
    archive_runs.main(["store", "--out", str(tmp_path / "bench"), "--archive", str(archive)])
    kept = archive / run.folder.name
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == \
        ["key/key.json", "probe.npz", "run.json"], "what re-scoring needs, not the model"
    fresh = tmp_path / "new-machine"
    archive_runs.main(["restore", "--out", str(fresh), "--archive", str(archive)])
    again = fresh / run.folder.name
    assert (again / "probe.npz").read_bytes() == run.probe_file.read_bytes()
    assert (again / "key" / "key.json").read_text() == '{"trigger": "zq"}'

    def never_train(*args, **kwargs):
        raise AssertionError("an archived run must not be trained again")

    monkeypatch.setattr(common, "owner_dataset", never_train)
    elsewhere = tmp_path / "third-machine"
    restored = common.fit_and_probe(elsewhere, 0.02, 0, 1500, template_seed=0, name="rate0.02-steps1500-mosaic-trigger6",
                                    family="mosaic", trigger_length=6, archive=archive)
    assert restored.done and restored.folder == elsewhere / run.folder.name
    with pytest.raises(ValueError, match="only a finished run"):
        common.archive_run(common.Run.named(tmp_path, "unfinished", 0.0, 1, 10), archive)


def test_the_suite_time_is_summed_per_test_file_from_pytests_junit_report(tmp_path):
    from benchmarks import suite_time

    xml = tmp_path / "suite.xml"
    xml.write_text('<testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.test_a" name="test_one" time="2.5"/>'
                   '<testcase classname="tests.test_a" name="test_two" time="0.5"/>'
                   '<testcase classname="tests.test_b" name="test_slow[x]" time="7"/>'
                   '</testsuite></testsuites>')
    rows = suite_time.test_times(xml)
    assert [r["group"] for r in rows] == ["test_a", "test_a", "test_b"]
    table = suite_time.by_group(rows)
    assert [(r["group"], r["tests"], r["seconds"], r["slowest"]) for r in table] == [
        ("test_b", 1, 7.0, "test_slow[x]"), ("test_a", 2, 3.0, "test_one")]
    suite_time.main(["--xml", str(xml), "--report-only"])
    assert (tmp_path / "suite_time.csv").read_text().splitlines()[0].startswith("group,tests,seconds")


def test_the_robustness_sweep_passes_its_archive_to_every_fine_tune(monkeypatch, tmp_path):
    from benchmarks import robustness

    calls = []
    monkeypatch.setattr(robustness, "fit_and_probe", lambda *args, **kwargs: calls.append(kwargs))
    for kind, name, strength in [("none", "no attack", 0), ("dataset", "jpeg", 50), ("training", "lora_rank", 8)]:
        robustness.run_setting(tmp_path, kind, name, strength, 0, 0.02, archive=tmp_path / "archive")
    assert [c["archive"] for c in calls] == [tmp_path / "archive"] * 3
    assert robustness.run_setting(tmp_path, "output", "jpeg", 50, 0, 0.02) is None and len(calls) == 3


def test_the_power_report_keeps_the_rows_that_need_clean_runs_when_none_are_here(tmp_path, monkeypatch):
    """Clean power runs are not archived: re-scoring the protected ones alone replaces the tests they feed and
    keeps the earlier rows of the tests that need a clean model (reference), instead of dropping them."""
    import pandas as pd

    from benchmarks import verification_report
    from benchmarks.common import Run

    monkeypatch.setattr(verification_report, "run_scores", lambda run, root, reference: {})
    monkeypatch.setattr(verification_report, "p_values", lambda scores, n: {"decoy (projection)": 1e-3})
    previous = pd.DataFrame(dict(rate=[0.02, 0.02], test=["decoy (projection)", "reference (projection)"], n=[64, 64],
                                 detected=[0, 3], seeds=[3, 3], median_p=[0.5, 1e-4]))
    previous.to_csv(tmp_path / "detection_power-x.csv", index=False)
    runs = [Run(tmp_path / f"run{seed}", 0.02, seed, 10) for seed in range(3)]
    verification_report.power_report(runs, tmp_path, queries=(64,), design="-x")
    table = pd.read_csv(tmp_path / "detection_power-x.csv").set_index("test")
    assert table.loc["decoy (projection)", "detected"] == 3 and table.loc["decoy (projection)", "median_p"] == 1e-3
    assert table.loc["reference (projection)", "median_p"] == 1e-4, "kept from the earlier table"
