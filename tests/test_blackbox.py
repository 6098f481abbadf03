"""The black-box audit (issue #19): a suspect known only as a generation service. The owner writes a prompt sheet,
saves the service's answers in a folder and audits the folder; with the same images it must give the same
p-values as auditing the weights."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import protected_suspect
from entruth_lite import cli
from entruth_lite.core import data
from entruth_lite.infringer import presets
from entruth_lite.owner import audit, keys, probe, record, triggers

CONFIG = dict(queries=8, decoys=199, num_inference_steps=4, alpha=0.05)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(root, key, suspect pipeline, probe captions, the audit of its weights, a folder of the service's answers)."""
    root = protected_suspect(tmp_path_factory.mktemp("blackbox"))
    key = keys.load_key(root / "key")
    pipe = record.load_suspect("tiny", root / "full", device="cpu")
    captions = probe.default_captions("tiny")
    config = audit.AuditConfig(**CONFIG)
    white_box = audit.audit(pipe, key, captions, config, progress=False)
    rows = audit.prompt_sheet_for(key, captions, config, resolution=32)
    sheet = probe.write_prompt_sheet(rows, root / "prompts.jsonl")
    answers = probe.answer_prompt_sheet(pipe, probe.read_prompt_sheet(sheet), root / "service", progress=False)
    return root, key, pipe, captions, white_box, answers


def p_values(result) -> dict[str, float]:
    return {v.test: v.p_value for v in result.verdicts}


def copy_renamed(answers, out, rename) -> list[dict]:
    """The answers under other names (``rename(row) -> new name``); returns the manifest rows."""
    out.mkdir()
    rows = probe.read_prompt_sheet(answers.parent / "prompts.jsonl")
    manifest = []
    for row in rows:
        shutil.copyfile(answers / row["file"], out / rename(row))
        manifest.append(row | {"file": rename(row)})
    return manifest


def test_sheet_pairs_each_trigger_prompt_with_its_control(setting):
    root, key, *_ = setting
    rows = probe.read_prompt_sheet(root / "prompts.jsonl")
    assert len(rows) == 2 * CONFIG["queries"] and [r["kind"] for r in rows[:2]] == ["trigger", "control"]
    for trigger, control in zip(rows[::2], rows[1::2]):
        assert trigger["query"] == control["query"] and trigger["seed"] == control["seed"]
        assert trigger["prompt"] == triggers.apply_trigger(control["prompt"], key.trigger, key.placement)
        assert (trigger["steps"], trigger["width"]) == (CONFIG["num_inference_steps"], 32)
    with pytest.raises(FileExistsError, match="overwrite"):
        probe.write_prompt_sheet(rows, root / "prompts.jsonl")


def test_images_alone_give_the_same_p_values_as_the_weights(setting):
    """Same prompts, seeds and images: the decoy and paired tests match the white-box audit exactly; the tests that
    need plain images through the suspect's VAE are left out, and the result says so and how many images it used."""
    root, key, pipe, _, white_box, answers = setting
    rows = probe.read_prompt_sheet(root / "prompts.jsonl")
    result = audit.audit_images(answers, rows, key, audit.AuditConfig(**CONFIG), progress=False)
    assert p_values(result) == {t: p for t, p in p_values(white_box).items() if t in ("decoy", "paired")}
    assert result.headline.test == "decoy" and result.headline.p_value == white_box.headline.p_value
    assert np.array_equal(result.evidence.trigger_scores, white_box.evidence.trigger_scores)
    assert any("left out binomial, one-query" in n for n in result.notes)
    assert any("scored 8 trigger and 8 control images" in n for n in result.notes)
    assert len(result.model["image_files"]) == 16 and result.to_json()["p_value"] == white_box.headline.p_value

    with_vae = audit.audit_images(answers, rows, key, audit.AuditConfig(**CONFIG), vae=pipe.vae, progress=False)
    assert p_values(with_vae) == p_values(white_box), "with the base VAE every test runs, as on the weights"


def test_a_manifest_or_the_file_order_matches_renamed_images(setting, tmp_path):
    root, key, _, _, white_box, answers = setting
    manifest = copy_renamed(answers, tmp_path / "renamed", lambda r: f"download_{r['seed']}_{r['kind'][0]}.png")
    result = audit.audit_images(tmp_path / "renamed", manifest, key, audit.AuditConfig(**CONFIG), progress=False)
    assert result.headline.p_value == white_box.headline.p_value

    # by order: "image (2)" sorts before "image (10)", as in a file browser
    order = {(r["query"], r["kind"]): i + 1 for i, r in enumerate(probe.read_prompt_sheet(root / "prompts.jsonl"))}
    copy_renamed(answers, tmp_path / "ordered", lambda r: f"image ({order[r['query'], r['kind']]}).png")
    rows = probe.read_prompt_sheet(root / "prompts.jsonl")
    result = audit.audit_images(tmp_path / "ordered", rows, key, audit.AuditConfig(**CONFIG), progress=False)
    assert result.headline.p_value == white_box.headline.p_value
    assert any("file-name order" in n for n in result.notes)


def test_bad_answers_are_named(setting, tmp_path):
    root, key, *_, answers = setting
    rows = probe.read_prompt_sheet(root / "prompts.jsonl")
    config = audit.AuditConfig(**CONFIG)

    def folder(name):
        out = tmp_path / name
        shutil.copytree(answers, out)
        return out

    missing = folder("missing")
    (missing / "control-005.png").unlink()
    with pytest.raises(ValueError, match="missing from .*control-005.png"):
        audit.audit_images(missing, rows, key, config, progress=False)

    extra = folder("extra")
    Image.new("RGB", (32, 32)).save(extra / "holiday.png")
    assert any("ignored 1 image(s)" in n and "holiday.png" in n
               for n in audit.audit_images(extra, rows, key, config, progress=False).notes)

    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32)).save(unnamed / f"{i}.png")
    with pytest.raises(ValueError, match="5 images and no file the sheet names.*exactly one image per prompt \\(16"):
        audit.audit_images(unnamed, rows, key, config, progress=False)

    corrupt = folder("corrupt")
    (corrupt / "trigger-002.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(data.DatasetError, match="trigger-002.png"):
        audit.audit_images(corrupt, rows, key, config, progress=False)

    cropped = folder("cropped")
    Image.open(answers / "trigger-003.png").crop((0, 0, 32, 24)).save(cropped / "trigger-003.png")
    with pytest.raises(ValueError, match="trigger-003.png is 32x24.*square 32x32"):
        audit.audit_images(cropped, rows, key, config, progress=False)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        audit.audit_images(tmp_path / "nowhere", rows, key, config, progress=False)
    bad_sheet = tmp_path / "bad.jsonl"
    bad_sheet.write_text(json.dumps({"query": 0, "kind": "trigger", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1.*missing: seed, file"):
        probe.read_prompt_sheet(bad_sheet)


def test_larger_images_and_other_formats_are_resized_and_read(setting, tmp_path):
    """A service that answers at twice the size, in JPEG and WebP: resized to the sheet's size, with a note."""
    root, key, *_, answers = setting
    rows = probe.read_prompt_sheet(root / "prompts.jsonl")
    out = tmp_path / "service"
    out.mkdir()
    manifest = []
    for i, row in enumerate(rows):
        name = row["file"].replace(".png", [".jpg", ".webp"][i % 2])
        Image.open(answers / row["file"]).resize((64, 64)).save(out / name, quality=95)
        manifest.append(row | {"file": name})
    result = audit.audit_images(out, manifest, key, audit.AuditConfig(**CONFIG), progress=False)
    assert any("16 image(s) were not 32 px and were resized" in n for n in result.notes)
    assert result.headline is not None and 1 / 200 <= result.headline.p_value <= 1


def test_cli_black_box_route_gives_the_api_verdict(setting, tmp_path, capsys):
    root, key, pipe, _, white_box, _ = setting
    sheet = tmp_path / "prompts.jsonl"
    common = ["--key", str(root / "key"), "--queries", "8", "--decoys", "199", "--alpha", "0.05"]
    assert cli.main(["audit", "prompts", *common, "--out", str(sheet)]) == 0
    assert "entruth-lite audit --images" in capsys.readouterr().out
    rows = probe.read_prompt_sheet(sheet)
    assert rows[0]["width"] == 32 and rows[0]["steps"] == audit.AuditConfig().num_inference_steps

    # the sheet asks for the audit's default sampler steps; answer it with CONFIG's for speed, as a service might
    rows = [r | {"steps": CONFIG["num_inference_steps"]} for r in rows]
    probe.answer_prompt_sheet(pipe, rows, tmp_path / "service", progress=False)
    assert cli.main(["audit", *common, "--images", str(tmp_path / "service"), "--prompts", str(sheet),
                     "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["test"] == "decoy (projection)" and payload["p_value"] == white_box.headline.p_value
    assert cli.main(["audit", *common, "--images", str(tmp_path / "service")]) == 2
    assert "--images needs --prompts" in capsys.readouterr().err


def test_a_model_trained_below_its_native_size_is_probed_and_audited_at_that_size(setting, tmp_path):
    """A preset's resolution (colab-t4 trains SD 1.5 at 256 px) is where the lab and the audit query the model:
    the probe is stored apart from one at the model's own size, and the audit's plain images match it."""
    from entruth_lite.teaching import demo

    _, key, pipe, captions, _, _ = setting
    config = audit.AuditConfig(**(CONFIG | dict(queries=2, resolution=64)))
    kwargs = dict(n=config.queries, seed=config.probe_seed, num_inference_steps=config.num_inference_steps)
    native = demo.cached_probe(tmp_path, "full", lambda: pipe, key, captions, **kwargs)
    larger = demo.cached_probe(tmp_path, "full", lambda: pipe, key, captions, resolution=64, **kwargs)
    assert {im.size for im in native.trigger_images} == {(32, 32)}
    assert {im.size for im in larger.trigger_images + larger.control_images} == {(64, 64)}
    assert len(list((tmp_path / "probes").glob("full-*.npz"))) == 2
    result = audit.audit(pipe, key, captions, config, progress=False)
    assert {im.size for im in result.probe.trigger_images} == {(64, 64)} and result.environment["resolution"] == 64
    assert [a.tobytes() for a in result.probe.trigger_images] == [a.tobytes() for a in larger.trigger_images]


def test_a_probe_is_generated_once_and_reused_by_the_audit(setting, tmp_path):
    from entruth_lite.teaching import demo

    root, key, pipe, captions, white_box, _ = setting
    config = audit.AuditConfig(**CONFIG)
    calls = []

    def load():
        calls.append(1)
        return pipe

    first = demo.cached_probe(tmp_path, "full", load, key, captions, n=config.queries, seed=config.probe_seed,
                        num_inference_steps=config.num_inference_steps)
    again = demo.cached_probe(tmp_path, "full", load, key, captions, n=config.queries, seed=config.probe_seed,
                        num_inference_steps=config.num_inference_steps)
    assert len(calls) == 1, "the second notebook reads the stored probe instead of generating"
    assert [a.tobytes() for a in again.trigger_images] == [f.tobytes() for f in first.trigger_images]
    demo.cached_probe(tmp_path, "full", load, key, captions, n=4, seed=config.probe_seed,
                num_inference_steps=config.num_inference_steps)
    assert len(calls) == 2 and len(list((tmp_path / "probes").glob("full-*.npz"))) == 2, "other queries: a new probe"
    reused = audit.audit(pipe, key, captions, config, progress=False, probed=first)
    assert p_values(reused) == p_values(white_box), "the same queries give the same audit"
    with pytest.raises(ValueError, match="other queries than this audit sends"):
        audit.audit(pipe, key, captions, audit.AuditConfig(**(CONFIG | dict(queries=6))), progress=False,
                    probed=first)


def test_the_lab_serves_the_base_and_each_finetune_from_one_store(setting, tmp_path):
    from entruth_lite.teaching import demo

    root, key, pipe, captions, _, _ = setting
    lab = demo.Lab(tmp_path, presets.preset("tiny-cpu"), record.load_suspect("tiny", device="cpu"),
                   weights={"full": root / "full"})
    probes = lab.probes(key, captions, n=4, num_inference_steps=4, names=["base", "full"])
    assert list(probes) == ["base", "full"]
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "probes").glob("*.npz"))
    assert stored == ["base", "full"]
    again = demo.cached_probe(tmp_path, "full", lambda: pytest.fail("the stored probe must be read, not regenerated"), key,
                        captions, n=4, num_inference_steps=4)
    assert [a.tobytes() for a in again.trigger_images] == [p.tobytes() for p in probes["full"].trigger_images]
    direct = probe.probe_model(pipe, captions, key.trigger, key.placement, n=4, seed=1, num_inference_steps=4, progress=False)
    assert [a.tobytes() for a in direct.trigger_images] == [p.tobytes() for p in probes["full"].trigger_images]
