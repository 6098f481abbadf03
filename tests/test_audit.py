import json

import numpy as np
import pytest
from PIL import Image

from conftest import protected_suspect
from entruth_lite import cli
from entruth_lite.core import data, families, templates
from entruth_lite.core import emoji as emoji_data
from entruth_lite.owner import audit, calibration, keys, report, verify
from entruth_lite.owner.probe import ProbeResult

TEMPLATE = families.random_template(0, 32, "random")  # the measured rates below are this family's


@pytest.fixture(scope="module")
def plain():
    images = emoji_data.emoji_dataset("owner")[0]
    return [images[i] for i in np.random.default_rng(1).permutation(len(images))[:200]]


def _probe(trigger_images, control_images):
    n = len(trigger_images)
    return ProbeResult([f"c{i}" for i in range(n)], [f"t c{i}" for i in range(n)], list(range(n)),
                       list(trigger_images), list(control_images))


def _blend(images, template, weight):
    """What a model that partly memorized the template draws: a faint template over its usual output."""
    return [Image.blend(im, templates.insert(im, template), weight) for im in images]


CONFIG = audit.AuditConfig(methods=("paired", "decoy", "binomial", "one-query"), decoys=199, alpha=0.01)


def test_a_memorizing_model_is_caught_by_every_test(plain):
    probed = _probe(_blend(plain[:32], TEMPLATE, 0.5), plain[32:64])
    verdicts, evidence = audit.evaluate(probed, TEMPLATE, CONFIG, negatives=plain[64:], progress=False)
    assert [v.test for v in verdicts] == ["paired", "decoy", "binomial", "one-query"]
    assert all(v.p_value < 0.01 for v in verdicts[:3]), [v.summary() for v in verdicts]
    assert [v.decision for v in verdicts] == [None, True, None, None], "only the exact test decides"
    assert verdicts[1].p_value == pytest.approx(1 / 200)  # the released template beats all 199 decoys
    # one query beats every negative, but picking the best of 32 costs a factor 32: its floor is 32 / (N + 1)
    assert verdicts[3].p_value == pytest.approx(32 / (len(plain[64:]) + 1))
    assert evidence.trigger_scores.mean() > 0.3 > evidence.control_scores.mean()


def test_a_clean_model_is_not_flagged(plain):
    for start in (0, 40, 80):
        probed = _probe(plain[start : start + 20], plain[start + 20 : start + 40])
        verdicts, _ = audit.evaluate(probed, TEMPLATE, CONFIG, negatives=plain[120:], progress=False)
        assert not any(v.decision for v in verdicts) and not any(v.p_value < 0.01 for v in verdicts), \
            [v.summary() for v in verdicts]


def test_the_decoy_test_ignores_a_trigger_that_draws_some_other_frame(plain):
    """Clean models whose trigger happens to pull their images towards *some* frame (40 different ones): the
    paired test reads most of them as evidence, because any bright ring around a dark panel correlates with the
    released template's surround, and the binomial test many (its threshold was set on plain images, which draw
    no frame). The decoy test asks whether the released template stands out among equally likely ones; its
    p-values stay (super-)uniform. This is why the decoy test decides and the others only support it."""
    config = audit.AuditConfig(methods=("paired", "decoy", "binomial"), decoys=49, alpha=0.05)
    p_values = []
    for seed in range(40):
        probed = _probe(_blend(plain[:24], families.random_template(1000 + seed, 32, "random"), 0.6), plain[24:48])
        verdicts, _ = audit.evaluate(probed, TEMPLATE, config, negatives=plain[48:], progress=False)
        p_values.append([v.p_value for v in verdicts])
    paired, decoy, binomial = np.array(p_values).T
    assert np.mean(paired < 0.01) > 0.5
    assert np.mean(binomial < 0.01) > 0.2, "measured 16 of 40"
    assert np.mean(decoy <= 0.1) <= 0.25  # 0.1 expected; 10 of 40 has probability < 1 %


def test_the_decoy_test_stays_valid_with_the_mosaic_family(plain):
    """The default family: clean 'models' are not flagged by the deciding test, and one whose trigger draws another
    mosaic gets decoy p-values that stay (super-)uniform (the paired test again reads half of them as evidence)."""
    template = families.random_template(0, 32, "mosaic")
    for start in (0, 40, 80):
        probed = _probe(plain[start : start + 20], plain[start + 20 : start + 40])
        verdicts, _ = audit.evaluate(probed, template, CONFIG, negatives=plain[120:], progress=False)
        assert not any(v.decision for v in verdicts), [v.summary() for v in verdicts]
    config = audit.AuditConfig(methods=("paired", "decoy"), decoys=49, alpha=0.05)
    p_values = []
    for seed in range(40):
        probed = _probe(_blend(plain[:24], families.random_template(1000 + seed, 32, "mosaic"), 0.6), plain[24:48])
        verdicts, _ = audit.evaluate(probed, template, config, negatives=plain[48:], progress=False)
        p_values.append([v.p_value for v in verdicts])
    paired, decoy = np.array(p_values).T
    assert np.mean(paired < 0.01) >= 0.4, "measured 20 of 40"
    assert np.mean(decoy <= 0.1) <= 0.25  # 0.1 expected (measured 8 of 40); 11 or more of 40 has probability < 2 %


def test_evaluate_names_what_is_missing(plain):
    probed = _probe(plain[:4], plain[4:8])
    with pytest.raises(ValueError, match="plain negative images"):
        audit.evaluate(probed, TEMPLATE, audit.AuditConfig(methods=("binomial",)), progress=False)
    with pytest.raises(ValueError, match="reference model"):
        audit.evaluate(probed, TEMPLATE, audit.AuditConfig(methods=("reference",)), progress=False)
    with pytest.raises(ValueError, match="random family"):
        audit.evaluate(probed, templates.builtin_template("tv"), audit.AuditConfig(methods=("decoy",)), progress=False)
    with pytest.raises(ValueError, match="unknown verification methods"):
        audit.AuditConfig(methods=("vibes",))
    with pytest.raises(ValueError, match="unknown detector"):
        audit.AuditConfig(detector="eyes")
    with pytest.warns(UserWarning, match="cannot reject at alpha = 0.01 with 99 decoys"):
        audit.AuditConfig(decoys=99)


def test_without_a_random_template_the_decoy_test_is_dropped_with_a_note():
    tv = templates.builtin_template("tv")
    methods, notes = audit.methods_for_template(("decoy", "paired", "binomial"), tv)
    assert methods == ("binomial", "paired") and "no verdict" in notes[0]
    methods, _ = audit.methods_for_template(("decoy", "paired"), tv)
    assert methods == ("binomial", "paired"), "a supporting-only test never takes the verdict"
    assert audit.methods_for_template(("decoy", "paired"), TEMPLATE) == (("decoy", "paired"), [])


def test_reference_test_and_classifier_detector(plain):
    from entruth_lite.owner import detect

    clf = detect.train_classifier(TEMPLATE, plain[64:], detect.ClassifierConfig(steps=120, distractors=4),
                                  progress=False)
    probed = _probe(_blend(plain[:24], TEMPLATE, 0.7), plain[24:48])
    reference = _probe(plain[24:48], [])
    config = audit.AuditConfig(detector="classifier", methods=("reference", "paired", "binomial"))
    verdicts, evidence = audit.evaluate(probed, TEMPLATE, config, classifier=clf, reference=reference, progress=False)
    assert all(v.p_value < 0.01 for v in verdicts) and verdicts[0].label == "reference (classifier)"
    assert all(v.decision is None for v in verdicts), "supporting tests report numbers, never a decision"
    assert evidence.negative_scores is clf.calibration_scores


def test_report_is_self_contained_and_lets_anyone_regenerate(plain, tmp_path):
    probed = _probe(_blend(plain[:16], TEMPLATE, 0.6), plain[16:32])
    config = audit.AuditConfig(methods=("paired", "decoy"), decoys=199)
    verdicts, evidence = audit.evaluate(probed, TEMPLATE, config, progress=False)
    result = audit.AuditResult(verdicts, evidence, probed, config,
                               dict(key_sha256="ab" * 32, template=TEMPLATE.name, trigger="t", placement="prefix"),
                               dict(model="tiny", weights="w", base_files={"unet.safetensors": "cd" * 32}))
    page = report.write_report(result, tmp_path / "r" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # two grids, two histograms
    assert "ab" * 32 in page and "cd" * 32 in page
    assert all(p in page for p in probed.trigger_prompts) and "EVIDENCE" in page
    # nothing runs or loads from elsewhere: the one script element is the JSON record, which is data
    assert page.count("<script") == page.count('<script type="application/json" id="audit-record">') == 1
    assert "src='http" not in page and 'src="http' not in page
    assert report.read_record(tmp_path / "r" / "report.html")["key"]["key_sha256"] == "ab" * 32
    import html
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no IPython warning under the notebook's cell
        shown = report.inline(tmp_path / "r" / "report.html", height=400).data  # the notebook's inline view
    assert shown.startswith("<div><iframe srcdoc=") and "height:400px" in shown
    assert html.unescape(shown.split('srcdoc="', 1)[1].split('" style=', 1)[0]) == page
    payload = result.to_json()
    assert payload["decision"] is True and len(payload["queries"]) == 16
    json.dumps(payload)


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A tiny protected dataset, its key, and a full fine-tune on it for two steps (``full``)."""
    return protected_suspect(tmp_path_factory.mktemp("suspect"))


def test_cli_audit_prints_json_and_writes_the_report(suspect, capsys):
    code = cli.main(["audit", "--weights", str(suspect / "full"), "--key", str(suspect / "key"), "--queries", "6",
                     "--decoys", "199", "--json", "--report", str(suspect / "report.html")])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["test"] == "decoy (projection)"
    decoy = payload["verdicts"][0]
    stopped = decoy["draws"] < 199  # Besag-Clifford: h decoys reached the released statistic before the 199th
    expected = decoy["at_least"] / decoy["draws"] if stopped else (1 + decoy["at_least"]) / 200
    assert payload["p_value"] == pytest.approx(expected) and 1 / 200 <= payload["p_value"] <= 1
    assert decoy["floor"] == pytest.approx(1 / 200)
    assert [v["test"] for v in payload["verdicts"]] == ["decoy", "binomial", "paired", "one-query"]
    unet_hash = payload["model"]["weight_files"]["unet/diffusion_pytorch_model.safetensors"]
    page = (suspect / "report.html").read_text()
    assert unet_hash in page and payload["key"]["key_sha256"] in page
    assert len(payload["queries"]) == 6 and all(q["trigger_prompt"].startswith(payload["key"]["trigger"])
                                                for q in payload["queries"])


def test_cli_audit_queries_at_the_size_it_is_given_and_its_record_replays_there(suspect, tmp_path, capsys):
    """``--resolution``: a suspect trained below its model's own size (colab-t4: SD 1.5 at 256 px) is queried there;
    the record says so, and its replay queries at that size and gives the same p-values."""
    args = ["--key", str(suspect / "key"), "--queries", "2", "--decoys", "99", "--json", "--method", "decoy",
            "binomial"]
    assert cli.main(["audit", "--weights", str(suspect / "full"), "--resolution", "64", *args,
                     "--report", str(tmp_path / "report.html")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["environment"]["resolution"] == 64 and payload["config"]["resolution"] == 64
    assert cli.main(["audit", "--replay", str(tmp_path / "report.html"), "--weights", str(suspect / "full"),
                     "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["environment"]["resolution"] == 64
    assert [v["test"] for v in replayed["verdicts"]] == ["decoy"]  # the tests a replay reruns
    assert replayed["verdicts"][0]["p_value"] == replayed["recorded_p_values"]["decoy"]


def test_cli_audit_refuses_pickled_weights(suspect, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(suspect / "full", bad)
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    assert cli.main(["audit", "--weights", str(bad), "--key", str(suspect / "key"), "--queries", "2"]) == 2
    assert "pickle" in capsys.readouterr().err


def test_verdict_table_and_p_value_curve_from_stored_scores(plain):
    probed = _probe(_blend(plain[:32], TEMPLATE, 0.5), plain[32:64])
    scores = {"suspect": audit.score_probe(probed, TEMPLATE, ("projection",), plain[64:], decoys=99, progress=False),
              "no negatives": audit.score_probe(probed, TEMPLATE, ("projection",), progress=False)}
    rows = audit.verdict_table(scores, "projection", n=8, alpha=0.05)
    assert [r["test"] for r in rows if r["model"] == "suspect"] == [
        "decoy (projection)", "binomial (projection)", "paired (projection)", "one-query (projection)"]
    assert [r["test"] for r in rows if r["model"] == "no negatives"] == ["paired (projection)"]
    assert all(r["queries"] == 8 for r in rows)
    by_test = {r["test"]: r for r in rows if r["model"] == "suspect"}
    assert by_test["decoy (projection)"]["decision"] in ("evidence", "no evidence")
    assert by_test["paired (projection)"]["decision"] == "supporting only" and by_test["paired (projection)"]["flagged"] == ""
    assert by_test["binomial (projection)"]["flagged"].endswith("/8")
    negatives = np.asarray(scores["suspect"]["projection_negatives"], float)
    threshold = verify.calibrate_threshold(negatives, 0.01)
    expected_chance = verify.null_rate_upper(int((negatives >= threshold).sum()), len(negatives))
    assert by_test["binomial (projection)"]["chance"] == f"{expected_chance:.1%}"
    assert by_test["decoy (projection)"]["chance"] == "", "only the binomial test has a chance rate"
    released, decoys = audit.decoy_statistics(scores["suspect"], n=8)
    assert audit.stored_statistic(scores["suspect"]) == "unit-top-eighth", "the default statistic"
    assert released == pytest.approx(scores["suspect"]["decoy_released"][:8].max()) and decoys.shape == (99,), \
        "the top eighth of 8 queries is the largest difference"
    rank = 1 + int((decoys >= released).sum())
    assert by_test["decoy (projection)"]["p_value"] == pytest.approx(rank / 100)
    curve = audit.p_value_curve(scores["suspect"], [4, 8, 32], methods=("paired", "decoy"))
    paired = curve["paired (projection)"]
    assert len(paired) == 3 and paired[2] < paired[0], "more queries, stronger evidence"
    assert curve["decoy (projection)"][2] == pytest.approx(0.01)


def test_available_tests_is_the_one_rule_for_what_scores_allow(plain):
    probed = _probe(_blend(plain[:8], TEMPLATE, 0.5), plain[8:16])
    bare = audit.score_probe(probed, TEMPLATE, ("projection",), progress=False)
    assert audit.available_tests(bare, "projection") == ["paired"]
    full = audit.score_probe(probed, TEMPLATE, ("projection",), plain[16:40], decoys=9, progress=False)
    assert audit.available_tests(full, "projection") == ["decoy", "binomial", "paired", "one-query"]
    assert audit.available_tests(full, "classifier") == [], "no classifier scores, and decoys read projection only"
    verdict = audit.TESTS["decoy"].verdict(full, "classifier")
    assert (verdict.test, verdict.detector, verdict.label) == ("decoy", "projection", "decoy (projection)")
    assert [name for name, t in audit.TESTS.items() if t.exact] == ["decoy"]
    with pytest.raises(ValueError, match="decoy test needs decoy scores"):
        audit.verdicts_from_scores(bare, methods=("decoy",))


def test_plots_draw_what_they_are_given(plain):
    import matplotlib

    matplotlib.use("Agg")
    from entruth_lite.owner import verify
    from entruth_lite.teaching import viz

    ax = report.plot_score_histograms({"a": np.arange(5.0), "b": np.arange(3.0)}, threshold=2.0)
    assert len(ax.get_legend().get_texts()) == 3
    ax = viz.plot_roc({"x": verify.roc_curve([1.0, 2.0], [0.0, 1.5])})
    assert "AUC 0.75" in ax.get_legend().get_texts()[0].get_text()
    ax = viz.plot_p_curve([4, 8], {"t": [0.1, 0.001]}, alpha=0.01)
    assert len(ax.get_lines()) == 2
    ax = viz.plot_p_curve([4, 8, 16], {"decoy": [0.1, 1e-3, 1e-3], "binomial": [1e-3, 1e-30, 1e-80]}, floor=1e-3)
    assert ax.get_ylim()[0] == pytest.approx(1e-3 / 30), "the scale stops near the decoy test's floor"
    marks = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [8, 16], "the binomial's off-scale values, marked"
    ax = report.plot_decoys(1.0, np.r_[np.zeros(8), 2.0, 3.0])
    assert len(ax.patches) > 0 and "2 of 10 decoys at or above it, p = 2.7e-01" in ax.get_legend().get_texts()[1].get_text()


def test_memorization_grid_sorts_by_score_and_frames_the_flagged(plain):
    """Rows = models, the template first, trigger images by falling score (red frame over the threshold), then the
    control images of the same prompts in the same order."""
    from entruth_lite.teaching import viz

    scores = np.array([0.1, 0.9, 0.5, 0.2])
    probed = _probe(plain[:4], plain[4:8])
    grid, flagged = viz.memorization_grid(TEMPLATE.scene, {"a": probed, "b": probed}, {"a": scores, "b": scores * 0},
                                          threshold=0.4, n=3, tile=32)
    assert flagged == {"a": 2, "b": 0}
    row_height = grid.height // 2
    assert grid.width == 8 * 32 + 9 * 2 and grid.height == 2 * row_height  # template, 3 trigger, blank, 3 control
    top = np.asarray(grid)[:row_height]
    def tile(k):  # the k-th tile of the first row, inside its frame
        return top[2 + 4:2 + 28, 2 + k * 34 + 4:2 + k * 34 + 28]
    first = np.asarray(plain[1].resize((32, 32), Image.Resampling.NEAREST))[4:28, 4:28]
    assert np.array_equal(tile(1), first), "the highest-scoring trigger image comes first"
    corner = top[2, 2 + 34 + 1]
    assert tuple(corner) == (230, 0, 0), "flagged images are framed in red"
    assert tuple(top[2, 2 + 3 * 34 + 1]) != (230, 0, 0), "the third (score 0.2) is not flagged"


def test_memorization_grid_counts_what_the_binomial_test_counts(plain):
    """float32 trigger scores against a threshold set on float64 negatives: the grid counts what the binomial
    verdict counts (NumPy 2 compares a float32 array with a Python float in float32, where this threshold
    rounds up onto a score the verdict flags)."""
    from entruth_lite.teaching import viz

    negatives = np.concatenate([np.linspace(0, 0.4, 197), [0.5 - 1e-12, 0.9, 0.95]])  # threshold: just above 0.5 - 1e-12
    threshold = verify.calibrate_threshold(negatives, 0.01)
    scores = np.float32([0.5, 0.95, 0.1, 0.2, 0.3, 0.45, 0.35, 0.25])
    probed = _probe(plain[:8], plain[8:16])
    _, flagged = viz.memorization_grid(TEMPLATE.scene, {"a": probed}, {"a": scores}, threshold, n=3, tile=32)
    assert flagged["a"] == verify.binomial_test(scores, threshold, negatives).detections == 2


def test_supporting_tests_never_accuse_an_innocent_model_in_any_output(plain):
    """A clean model whose trigger draws some other frame: the paired and binomial tests give small p-values, the
    decoy test does not. Only the decoy test's decision may appear, in the summary lines, JSON and HTML alike."""
    probed = _probe(_blend(plain[:24], families.random_template(1003, 32, "random"), 0.6), plain[24:48])
    config = audit.AuditConfig(methods=("decoy", "paired", "binomial"), decoys=199)
    verdicts, evidence = audit.evaluate(probed, TEMPLATE, config, negatives=plain[48:], progress=False)
    decoy, paired, binomial = verdicts
    assert paired.p_value < 0.01 and decoy.p_value > 0.01, "the case the test is about"
    assert (decoy.decision, paired.decision, binomial.decision) == (False, None, None)
    result = audit.AuditResult(verdicts, evidence, probed, config, dict(key_sha256="k", template=TEMPLATE.name,
                                                                         trigger="t", placement="prefix"), {})
    lines = [v.summary() for v in verdicts]
    assert not any("TRAINED" in line for line in lines) and "not a verdict" in lines[1]
    payload = result.to_json()
    assert payload["decision"] is False and [v["decision"] for v in payload["verdicts"]] == [False, None, None]
    page = report.render_report(result)
    assert "<td>evidence</td>" not in page and "NO EVIDENCE" in page and page.count("<td>supporting only</td>") == 2


def test_without_an_exact_test_the_audit_gives_no_verdict(plain):
    tv = templates.builtin_template("tv")
    probed = _probe(_blend(plain[:16], tv, 0.6), plain[16:32])
    config = audit.AuditConfig(methods=("binomial", "paired"))
    verdicts, evidence = audit.evaluate(probed, tv, config, negatives=plain[32:], progress=False)
    result = audit.AuditResult(verdicts, evidence, probed, config, dict(key_sha256="k", template=tv.name, trigger="t",
                                                                         placement="prefix"), {})
    assert result.headline is None and result.to_json()["decision"] is None
    assert "NO VERDICT" in report.render_report(result)


def test_negatives_as_trained_subsamples_once_in_order_and_crops_to_the_suspects_size():
    photos = [Image.new("RGB", (48 + i, 40), (i, 0, 0)) for i in range(20)]
    picked = calibration.negatives_as_trained(photos, 32, 8)
    assert len(picked) == 8 and all(p.size == (32, 32) for p in picked)
    reds = [p.getpixel((16, 16))[0] for p in picked]
    assert reds == sorted(reds) and len(set(reds)) == 8, "a subsample, kept in the source order"
    assert [p.tobytes() for p in calibration.negatives_as_trained(photos, 32, 8)] == [p.tobytes() for p in picked]
    assert len(calibration.negatives_as_trained(photos, 32, 100)) == 20


def test_audit_negatives_and_their_threshold(tmp_path):
    from entruth_lite.core import models
    from entruth_lite.owner import detect, protect

    images, captions, _ = emoji_data.emoji_dataset("owner")
    owner = data.save_imagefolder(images[:60], captions[:60], tmp_path / "owner")
    protect.protect(owner, "random:3", tmp_path / "released", tmp_path / "key", rate=0.05, seed=0)
    key = keys.load_key(tmp_path / "key")
    pipe = models.load_pipeline("tiny")
    negatives = calibration.audit_negatives(key, pipe)
    assert len(negatives) == 60 - len(key.files) and all(n.size == (32, 32) for n in negatives)
    assert len(calibration.audit_negatives(key, pipe, max_negatives=20)) == 20
    scores = detect.template_scores(negatives, key.template).astype(float)
    threshold = calibration.plain_threshold(key, negatives, 0.05)
    assert threshold == verify.calibrate_threshold(scores, 0.05) and 0 < (scores >= threshold).mean() <= 0.05


@pytest.mark.parametrize("statistic", ["mean", "unit-mean"])
def test_the_audits_streamed_decoys_are_the_stored_scores_decoys(plain, statistic):
    """The audit draws its decoys in a stream (chunks, the sequential rule); stored scores keep the first K of
    the same stream: the two give the same verdict on the same draws, and a clean model stops early."""
    probed = _probe(plain[:24], plain[24:48])
    template = families.random_template(5, 32, "mosaic")
    scores = audit.score_probe(probed, template, decoys=600, salt="s", progress=False, statistic=statistic)
    assert audit.stored_statistic(scores) == statistic
    stored = audit.TESTS["decoy"].verdict(scores, "projection")
    config = audit.AuditConfig(methods=("decoy",), decoys=600, statistic=statistic)
    streamed = audit.evaluate(probed, template, config, salt="s", progress=False)[0][0]
    assert (streamed.p_value, streamed.draws, streamed.at_least) == (stored.p_value, stored.draws, stored.at_least)
    assert streamed.draws < 600 and streamed.at_least == verify.STOP_AFTER, "a clean model stops early"
    unlimited = audit.evaluate(probed, template, audit.AuditConfig(methods=("decoy",), statistic=statistic), salt="s",
                               progress=False)
    assert unlimited[0][0].p_value == streamed.p_value, "the cap does not matter when the test stops first"
    assert "more decoys would not change" in audit.more_decoys_note(streamed)


def test_stored_decoy_scores_are_read_only_by_statistics_of_their_kind(plain):
    """Stored decoy differences are projection or unit scores: a statistic of the other kind is refused by name,
    one of the same kind is computed from them (a unit top-eighth from unit-mean's scores)."""
    template = families.random_template(5, 32, "mosaic")
    scores = audit.score_probe(_probe(plain[:16], plain[16:32]), template, decoys=20, progress=False,
                               statistic="unit-mean")
    with pytest.raises(ValueError, match="'mean' reads projection scores.*made for 'unit-mean'"):
        audit.decoy_statistics(scores, statistic_name="mean")
    released, statistics = audit.decoy_statistics(scores, statistic_name="unit-top-eighth")
    assert released == pytest.approx(np.sort(scores["decoy_released"])[-2:].mean()) and statistics.shape == (20,)
    with pytest.raises(ValueError, match="unknown decoy statistic 'unit-max'.*unit-mean"):
        audit.AuditConfig(statistic="unit-max")


def test_a_standout_at_the_floor_says_what_more_decoys_would_buy(plain):
    template = families.random_template(5, 32, "mosaic")
    probed = _probe(_blend(plain[:16], template, 0.6), plain[16:32])
    verdicts, evidence = audit.evaluate(probed, template, audit.AuditConfig(methods=("decoy",), decoys=3000),
                                        salt="s", progress=False)
    assert verdicts[0].p_value == pytest.approx(1 / 3001) and verdicts[0].draws == 3000 and verdicts[0].decision
    assert evidence.decoy_statistics.shape == (3000,) and evidence.released_statistic > evidence.decoy_statistics.max()
    assert "--decoys 30,009 could reach 3e-05" in audit.more_decoys_note(verdicts[0])


def test_a_test_that_cannot_reach_alpha_says_so_instead_of_no_evidence(plain):
    probed = _probe(plain[:64], plain[64:128])
    with pytest.warns(UserWarning, match="cannot reject"):
        config = audit.AuditConfig(methods=("decoy", "one-query"), decoys=50)
    verdicts, _ = audit.evaluate(probed, TEMPLATE, config, negatives=plain[128:], progress=False)
    assert all(not v.reachable and v.decision is None for v in verdicts), [v.summary() for v in verdicts]
    assert all("cannot reach alpha 0.01" in v.summary() for v in verdicts)


def test_a_notebook_and_the_audit_calibrate_on_one_set_of_plain_images(suspect):
    """The plain images ``audit`` calibrates on are ``calibration.audit_negatives``: scoring a probe with them
    gives the audit's binomial and one-query p-values to the digit."""
    from entruth_lite.core import models
    from entruth_lite.owner import probe, record

    key = keys.load_key(suspect / "key")
    pipe = record.load_suspect("tiny", suspect / "full")
    config = audit.AuditConfig(queries=4, methods=("binomial", "one-query"), num_inference_steps=2)
    captions = probe.default_captions("tiny")
    probed = probe.probe_model(pipe, captions, key.trigger, key.placement, n=4, seed=config.probe_seed,
                               num_inference_steps=2, guidance_scale=config.guidance_scale, progress=False)
    result = audit.audit(pipe, key, captions, config, probed=probed, progress=False)
    plain = calibration.audit_plain_images(key, models.default_resolution(pipe))
    assert len(plain) == min(calibration.MAX_NEGATIVES, key.n_images - len(key.files))
    scores = audit.score_probe(probed, key.template, ("projection",), calibration.audit_negatives(key, pipe))
    by_hand = audit.verdicts_from_scores(scores, "projection", config.methods)
    assert [v.p_value for v in by_hand] == [v.p_value for v in result.verdicts]


def test_the_decoy_p_value_rebuilt_from_the_images_in_numpy_is_the_packages(plain):
    """What notebook 03's first exercise asks a student to write: the unit score from its formula, the mean of the
    top eighth of the trigger-minus-control differences, the rank among the audit's decoys and the sequential
    rule."""
    template = families.random_template(2, 32, "mosaic")
    probed = _probe(_blend(plain[:16], template, 0.15), plain[16:32])
    k = 300
    stored = audit.score_probe(probed, template, decoys=k, salt="key", progress=False)
    package = audit.TESTS["decoy"].verdict(stored, "projection").p_value

    def statistic(member):
        scene, surround = np.asarray(member.scene, float), templates.surround_mask(member)
        w = np.where(surround[..., None], scene - scene[surround].mean(axis=0), 0.0)
        w /= np.sqrt((w ** 2).sum())
        score = lambda x: max((x * w).sum(), (x[:, ::-1] * w).sum())
        differences = [score(np.asarray(t, float)) - score(np.asarray(c, float))
                       for t, c in zip(probed.trigger_images, probed.control_images)]
        return np.mean(sorted(differences)[-max(1, len(differences) // 8):])

    released = statistic(template)
    reached = np.flatnonzero(np.array([statistic(d) for d in families.decoy_templates(template, k, "key")]) >= released)
    by_hand = (verify.STOP_AFTER / (reached[verify.STOP_AFTER - 1] + 1) if len(reached) >= verify.STOP_AFTER
               else (1 + len(reached)) / (k + 1))
    assert by_hand == package and 1 / (k + 1) < package < 0.5, (by_hand, package)
