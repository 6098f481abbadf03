"""Class mode (issue #22): a pack recorded from a full run stands in for its models, answers exactly what they
answered, and refuses any setting it was not recorded with."""

import dataclasses

import numpy as np
import pytest

from conftest import protected_suspect
from entruth_lite.core import data, models
from entruth_lite.evaluation import quality
from entruth_lite.infringer import presets
from entruth_lite.owner import audit, keys, probe
from entruth_lite.teaching import classroom, demo

QUERIES, STEPS, SAMPLES = 4, 2, 3


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(full-mode lab, class-mode lab, key, probe captions, owner captions) for two 2-step fine-tunes."""
    root = protected_suspect(tmp_path_factory.mktemp("classroom"), methods=())
    release = demo.Release(owner=root / "owner", protected=root / "protected", key=root / "key")
    config = presets.preset("tiny-cpu", steps=2)
    base = models.load_pipeline("tiny", device="cpu")
    full = demo.lab(root / "runs", release, config, base)
    key = keys.load_key(release.key)
    captions = probe.default_captions("tiny")
    owner_captions = list(data.load_imagefolder(release.owner).captions)
    demo.record_lab(full, key, captions, owner_captions, root / "pack", QUERIES, STEPS, SAMPLES)
    class_lab = demo.lab(root / "runs", release, config, base, recorded=True, pack_folder=root / "pack")
    return full, class_lab, key, captions, owner_captions


def as_bytes(images):
    return [np.asarray(i).tobytes() for i in images]


def test_the_pack_answers_what_the_models_answered(recorded):
    full, class_lab, key, captions, owner_captions = recorded
    assert class_lab.recorded and not full.recorded
    live = full.probes(key, captions, n=QUERIES, num_inference_steps=STEPS)
    stored = class_lab.probes(key, captions, n=QUERIES, num_inference_steps=STEPS)
    assert list(stored) == ["base", "protected", "clean"]
    for name in live:
        assert as_bytes(stored[name].trigger_images) == as_bytes(live[name].trigger_images), name
        assert as_bytes(stored[name].control_images) == as_bytes(live[name].control_images), name
        assert stored[name].seeds == live[name].seeds
    fewer = class_lab.probes(key, captions, n=2, num_inference_steps=STEPS, names=["protected"])["protected"]
    assert as_bytes(fewer.trigger_images) == as_bytes(live["protected"].trigger_images[:2]), "the first n queries"
    prompts, seeds = quality.quality_prompts(owner_captions, SAMPLES)
    assert as_bytes(class_lab.samples("clean", prompts, seeds, STEPS)) == \
        as_bytes(probe.generate(full.pipeline("clean"), prompts, seeds, num_inference_steps=STEPS, progress=False))
    for name, losses in class_lab.losses().items():
        assert losses == pytest.approx(full.losses()[name], abs=1e-5)
    assert all(s is not None and s > 0 for s in class_lab.train_seconds().values())


def test_the_black_box_audit_of_recorded_answers_matches_the_audit_of_the_weights(recorded, tmp_path):
    full, class_lab, key, captions, _ = recorded
    config = audit.AuditConfig(queries=QUERIES, decoys=99, num_inference_steps=STEPS, alpha=0.05)
    sheet = audit.prompt_sheet_for(key, captions, config, resolution=32)
    live = audit.audit_images(full.answer("protected", sheet, tmp_path / "live"), sheet, key, config)
    replayed = audit.audit_images(class_lab.answer("protected", sheet, tmp_path / "recorded"), sheet, key, config)
    assert replayed.headline.p_value == live.headline.p_value
    assert sorted(p.name for p in (tmp_path / "recorded").iterdir()) == sorted(r["file"] for r in sheet)
    weights_audit = audit.audit(class_lab.audit_pipeline("protected"), key, captions, config, progress=False,
                                probed=class_lab.probes(key, captions, QUERIES, num_inference_steps=STEPS)["protected"],
                                model=class_lab.model_info("protected"))
    assert weights_audit.headline.p_value == live.headline.p_value
    assert "class mode" in weights_audit.model["weights"]


def test_the_pack_refuses_what_it_did_not_record(recorded, tmp_path):
    full, class_lab, key, captions, owner_captions = recorded
    with pytest.raises(ValueError, match="answers, not its weights"):
        class_lab.pipeline("protected")
    with pytest.raises(ValueError, match="n=5"):
        class_lab.probes(key, captions, n=QUERIES + 1, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="num_inference_steps"):
        class_lab.probes(key, captions, n=QUERIES, num_inference_steps=STEPS + 1)
    with pytest.raises(ValueError, match="other prompts"):
        class_lab.probes(key, captions[::-1], n=QUERIES, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="no sample of 'clean' for 1 of"):
        class_lab.samples("clean", ["an emoji of a never recorded thing"], [0], STEPS)
    with pytest.raises(ValueError, match="holds samples of"):
        class_lab.samples("base", [], [], STEPS)
    sheet = audit.prompt_sheet_for(key, captions, audit.AuditConfig(queries=QUERIES + 1, num_inference_steps=STEPS),
                                   resolution=32)
    with pytest.raises(ValueError, match="no answer to 2 of the sheet's"):
        class_lab.answer("protected", sheet, tmp_path / "answers")
    assert not (tmp_path / "answers").exists() or not any((tmp_path / "answers").iterdir()), "nothing half-written"
    pack = classroom.load_pack(class_lab.pack.folder)
    with pytest.raises(ValueError, match="train_fingerprint"):
        pack.check(dataclasses.replace(full.config, steps=3), key)
    with pytest.raises(ValueError, match="trigger = .*this run has 'zzqq'"):
        pack.check(full.config, dataclasses.replace(key, trigger="zzqq"))
    with pytest.raises(ValueError, match=r"files = 4 templated files, this run has 4 templated files \(other files\)"):
        pack.check(full.config, dataclasses.replace(key, files=list(key.files[:-1]) + ["elsewhere.png"]))
    before = sorted(p.relative_to(pack.folder) for p in pack.folder.rglob("*"))
    with pytest.raises(ValueError, match="needs probes of"):
        classroom.write_pack(pack.folder, full.config, key, {}, {}, {}, {}, {}, {})
    assert sorted(p.relative_to(pack.folder) for p in pack.folder.rglob("*")) == before, "a refused write changes nothing"
    with pytest.raises(FileNotFoundError, match="no class pack"):
        classroom.load_pack(tmp_path)


def test_a_pack_is_replaced_whole_or_not_at_all(recorded, tmp_path, monkeypatch):
    full, class_lab, key, captions, owner_captions = recorded
    probes = class_lab.probes(key, captions, n=QUERIES, num_inference_steps=STEPS)
    prompts, seeds = quality.quality_prompts(owner_captions, SAMPLES)
    samples = {name: (prompts, seeds, class_lab.samples(name, prompts, seeds, STEPS)) for name in classroom.FINETUNES}
    args = (full.config, key, class_lab.losses(), class_lab.train_seconds(), probes,
            classroom.sampler_settings(QUERIES, 1, STEPS), samples, classroom.sampler_settings(num_inference_steps=STEPS))
    pack = classroom.write_pack(tmp_path / "pack", *args)
    before = {p.relative_to(pack.folder): p.read_bytes() for p in pack.folder.rglob("*") if p.is_file()}
    calls = []
    real = np.savez_compressed

    def fail_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(np, "savez_compressed", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        classroom.write_pack(tmp_path / "pack", *args)
    after = {p.relative_to(pack.folder): p.read_bytes() for p in pack.folder.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in tmp_path.iterdir()] == ["pack"], "the old pack, and no leftovers"
