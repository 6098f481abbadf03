"""Each attack does what it says and never touches its input."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import hash_tree
from entruth_lite import cli
from entruth_lite.core import data, families, models
from entruth_lite.core import emoji as emoji_data
from entruth_lite.evaluation import robustness
from entruth_lite.infringer import attacks, presets
from entruth_lite.owner import keys, protect, triggers


@pytest.fixture(scope="module")
def emoji():
    images, captions, names = emoji_data.emoji_dataset("owner", limit=60)
    return images, captions, names


@pytest.fixture
def protected(tmp_path, emoji):
    images, captions, names = emoji
    owner = data.save_imagefolder(images, captions, tmp_path / "owner", file_names=names)
    protect.protect(owner, "random:1", tmp_path / "protected", tmp_path / "key", count=6, seed=0)
    return tmp_path / "protected", keys.load_key(tmp_path / "key")


@pytest.mark.parametrize("kind,strength", [("jpeg", 20), ("blur", 1.0), ("noise", 20), ("crop", 0.5), ("resize", 0.5)])
def test_corruptions_keep_the_size_and_change_the_pixels(emoji, kind, strength):
    image = emoji[0][3]
    out = attacks.corrupt(image, kind, strength, np.random.default_rng(0))
    assert out.size == image.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, float) - np.asarray(image, float)).mean() > 0.5


def test_flip_and_bad_corruptions(emoji):
    image = emoji[0][3]
    flipped = attacks.corrupt(image, "flip", 1.0, np.random.default_rng(0))
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
    unflipped = attacks.corrupt(image, "flip", 0.0, np.random.default_rng(0))
    assert np.array_equal(np.asarray(unflipped), np.asarray(image)), "flip probability 0: the image as it was"
    with pytest.raises(ValueError, match="unknown corruption"):
        attacks.corrupt(image, "swirl", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="JPEG quality"):
        attacks.corrupt(image, "jpeg", 0, np.random.default_rng(0))
    for kind, strength, message in [("blur", -1, "blur sigma"), ("noise", -5, "noise sigma"), ("flip", 1.5, "flip probability")]:
        with pytest.raises(ValueError, match=message):
            attacks.corrupt(image, kind, strength, np.random.default_rng(0))
    assert len(attacks.corrupt_images(emoji[0][:4], "noise", 5, seed=1)) == 4


def test_dedup_removes_planted_exact_and_near_duplicates_only(tmp_path, emoji):
    images, captions, names = emoji
    jpeg = attacks.corrupt(images[5], "jpeg", 60, np.random.default_rng(0))
    noisy = attacks.corrupt(images[7], "noise", 3, np.random.default_rng(0))
    planted = list(images) + [images[2].copy(), jpeg, noisy]
    folder = data.save_imagefolder(planted, list(captions) + ["copy a", "copy b", "copy c"], tmp_path / "d",
                                   file_names=list(names) + ["x1.png", "x2.png", "x3.png"])
    before = hash_tree(folder)
    clusters = attacks.near_duplicate_clusters(planted)
    cluster_of = {i: tuple(c) for c in clusters for i in c}
    assert all(cluster_of[copy] == cluster_of[original] for copy, original in [(60, 2), (61, 5), (62, 7)])
    report = attacks.deduplicate(folder, tmp_path / "out")
    kept = data.load_imagefolder(tmp_path / "out").file_names
    assert {"x1.png", "x2.png", "x3.png"}.isdisjoint(kept)
    assert report.n_out == len(kept) == len(clusters), "one image per cluster"
    assert kept == [(list(names) + ["x1.png", "x2.png", "x3.png"])[c[0]] for c in clusters], "the first of each"
    assert len(clusters) > 30, "distinct emoji are not merged (skin-tone variants may be)"
    assert hash_tree(folder) == before


def test_dedup_drops_whole_large_clusters_and_reports_survivors(tmp_path, protected):
    folder, key = protected
    all_linked = robustness.measure_attack(attacks.deduplicate(folder, tmp_path / "a", threshold=64), key)
    assert all_linked.n_out == 1, "every pair within 64 bits: one cluster, one survivor"
    dropped = robustness.measure_attack(attacks.deduplicate(folder, tmp_path / "b", threshold=64, drop_clusters_of=20), key)
    assert dropped.n_out == 0 and dropped.templated_kept == 0 and dropped.templated_in == 6
    with pytest.raises(ValueError, match="new folder"):
        attacks.deduplicate(folder, folder, overwrite=True)


def test_embedding_dedup_uses_the_vae(tmp_path, emoji):
    images = emoji[0][:10] + [emoji[0][0].copy()]
    pipe = models.load_pipeline("tiny", device="cpu")
    clusters = attacks.near_duplicate_clusters(images, "embedding", 0.99, pipe)
    assert [0, 10] in clusters and len(clusters) == 10
    with pytest.raises(ValueError, match="needs a pipeline"):
        attacks.near_duplicate_clusters(images, "embedding")


def test_recaption_with_a_captioner_leaves_no_trigger(tmp_path, protected, emoji):
    folder, key = protected
    before = hash_tree(folder)
    corpus_images, corpus_captions, _ = emoji_data.emoji_dataset("pretrain", limit=40)
    captioner = attacks.retrieval_captioner(corpus_images, corpus_captions, models.load_pipeline("tiny", device="cpu"))
    report = robustness.measure_attack(attacks.recaption(folder, tmp_path / "r", 1.0, "captioner", captioner), key)
    assert report.triggers_kept == 0 and report.templated_kept == 6 and report.templated_with_trigger == 0
    assert set(data.load_imagefolder(tmp_path / "r").captions) <= set(corpus_captions)
    assert hash_tree(folder) == before


def test_retrieval_captioner_returns_the_nearest_corpus_caption_even_for_one_image():
    corpus_images, corpus_captions, _ = emoji_data.emoji_dataset("pretrain", limit=40)
    captioner = attacks.retrieval_captioner(corpus_images, corpus_captions, models.load_pipeline("tiny", device="cpu"))
    for k in (3, 17, 31):  # one image at a time, as the notebook shows them
        assert captioner([corpus_images[k]]) == [corpus_captions[k]]
    assert captioner(corpus_images[5:9]) == corpus_captions[5:9]


def test_shuffled_recaption_changes_the_chosen_share(tmp_path, protected):
    folder, key = protected
    original = data.load_imagefolder(folder).captions
    robustness.measure_attack(attacks.recaption(folder, tmp_path / "s", 0.4, "shuffle", seed=3), key)
    changed = sum(a != b for a, b in zip(original, data.load_imagefolder(tmp_path / "s").captions))
    assert 0.25 * len(original) <= changed <= 0.4 * len(original)
    moved = robustness.measure_attack(attacks.recaption(folder, tmp_path / "all", 1.0, "shuffle", seed=3), key)
    assert moved.triggers_kept == 6, "shuffling moves the trigger to other images, it does not remove it"
    assert moved.templated_with_trigger <= 2, "but it rarely lands on a templated image (6/60 each)"
    with pytest.raises(ValueError, match="needs a captioner"):
        attacks.recaption(folder, tmp_path / "t", 0.5, "captioner")
    with pytest.raises(ValueError, match="share"):
        attacks.recaption(folder, tmp_path / "t", 1.5)


def test_transform_and_dilute(tmp_path, protected, emoji):
    folder, key = protected
    before = hash_tree(folder)
    report = robustness.measure_attack(attacks.transform(folder, tmp_path / "j", "jpeg", 30, share=0.5), key)
    src, out = data.load_imagefolder(folder), data.load_imagefolder(tmp_path / "j")
    changed = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(src.images(), out.images()))
    assert changed == 30 and out.captions == src.captions and report.templated_kept == 6
    extra = data.save_imagefolder(*emoji_data.emoji_dataset("pretrain", limit=130)[:2], tmp_path / "extra")
    diluted = robustness.measure_attack(attacks.dilute(folder, extra, tmp_path / "dl", factor=2.0), key)
    assert diluted.n_out == 180 and diluted.templated_kept == 6
    assert len(set(data.load_imagefolder(tmp_path / "dl").file_names)) == 180
    with pytest.raises(ValueError, match="extra images"):
        attacks.dilute(folder, extra, tmp_path / "d2", factor=3.0)
    with pytest.raises(ValueError, match="factor must be >= 0"):
        attacks.dilute(folder, extra, tmp_path / "d3", factor=-0.5)
    with pytest.raises(ValueError, match="share must be in"):
        attacks.transform(folder, tmp_path / "j2", "jpeg", 30, share=-0.2)
    assert hash_tree(folder) == before


def test_attacks_refuse_an_output_folder_that_holds_or_sits_in_an_input(tmp_path, protected, emoji):
    folder, key = protected
    extra = data.save_imagefolder(*emoji_data.emoji_dataset("pretrain", limit=70)[:2], tmp_path / "extra")
    before, extra_before = hash_tree(folder), hash_tree(extra)
    for out in (folder, folder.parent, folder / "inside"):  # the parent holds the input: overwrite would delete it
        with pytest.raises(ValueError, match="outside its input"):
            attacks.transform(folder, out, "flip", 1.0, overwrite=True)
        with pytest.raises(ValueError, match="outside its input"):
            attacks.recaption(folder, out, 0.5, overwrite=True)
        with pytest.raises(ValueError, match="outside its input"):
            attacks.deduplicate(folder, out, overwrite=True)
    with pytest.raises(ValueError, match="outside its input"):
        attacks.dilute(folder, extra, extra, factor=1.0, overwrite=True)
    assert hash_tree(folder) == before and hash_tree(extra) == extra_before
    assert not (folder / "inside").exists()


def test_a_multi_word_trigger_is_counted_as_protect_writes_it(tmp_path, emoji):
    images, captions, names = emoji
    owner = data.save_imagefolder(images, captions, tmp_path / "owner", file_names=names)
    protect.protect(owner, "random:1", tmp_path / "p", tmp_path / "key", count=6, seed=0, trigger="Zorbly Quax")
    key = keys.load_key(tmp_path / "key")
    kept = robustness.measure_attack(attacks.recaption(tmp_path / "p", tmp_path / "r0", 0.0), key)
    assert kept.triggers_kept == 6 and kept.templated_with_trigger == 6
    gone = robustness.measure_attack(attacks.recaption(tmp_path / "p", tmp_path / "r1", 1.0), key)
    assert gone.triggers_kept == 6 and gone.templated_with_trigger < 6, "a full shuffle moves the 6 triggered captions"
    assert triggers.has_trigger("zorbly quax an emoji of a cat", "Zorbly Quax")
    assert not triggers.has_trigger("an emoji of a zorbly cat", "Zorbly Quax")


def test_recaption_refuses_a_captioner_that_skips_images(protected):
    folder, _ = protected
    captions = data.load_imagefolder(folder).captions
    with pytest.raises(ValueError, match="returned 1 captions for 30 images"):
        attacks.new_captions(captions, 0.5, "captioner", lambda images: ["a caption"], [None] * len(captions))


def test_training_attacks_are_preset_overrides():

    assert attacks.training_overrides("fewer_steps", 0.5) == {"steps": 750}
    config = presets.preset("tiny-cpu", **attacks.training_overrides("lora_rank", 4))
    assert config.method == "lora" and config.lora_rank == 4 and "ff.net.2" in config.lora_targets
    narrow = presets.preset("tiny-cpu", **attacks.training_overrides("lora_attention_only", 4))
    assert narrow.lora_targets == presets.LORA_UNET_TARGETS and narrow.fingerprint() != config.fingerprint()
    faster = presets.preset("tiny-cpu", **attacks.training_overrides("lora_higher_lr", 3))
    assert faster.method == "lora" and faster.lora_targets == config.lora_targets
    assert faster.learning_rate == pytest.approx(3 * presets.PRESETS["tiny-cpu"]["learning_rate"])
    assert presets.preset("tiny-cpu", **attacks.training_overrides("augment", 4)).augment_views == 4
    with pytest.raises(ValueError, match="unknown training attack"):
        attacks.training_overrides("prayer", 1)


def test_cli_attack(tmp_path, protected, capsys):
    folder, key = protected
    code = cli.main(["attack", "transform", "--data", str(folder), "--out", str(tmp_path / "c"), "--kind", "blur",
                     "--strength", "1", "--key", str(key.root), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attack"] == "transform" and report["templated_kept"] == 6 and report["triggers_kept"] == 6
    assert cli.main(["attack", "dilute", "--data", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "--extra" in capsys.readouterr().err


def test_preview_runs_an_attack_in_memory(protected):
    folder, key = protected
    dataset = data.load_imagefolder(folder)
    templated = [dataset.file_names.index(f) for f in key.files]
    grid, stats = robustness.preview_attack("jpeg", 30, dataset.images(), dataset.captions, templated, key.trigger)
    assert stats["templated_kept"] == 6 and stats["triggers_kept"] == 6 and grid.size[1] > 2 * 32
    _, stats = robustness.preview_attack("recaption-shuffle", 1.0, dataset.images(), dataset.captions, templated, key.trigger)
    assert stats["n_out"] == 60
    _, stats = robustness.preview_attack("dedup-phash", 64, dataset.images(), dataset.captions, templated, key.trigger)
    assert stats["n_out"] == 0 and stats["templated_kept"] == 0, "one cluster of 60 >= 20: dropped"
    assert stats["templated_cluster_sizes"] == [60] * 6
    captioner = lambda chosen: ["a plain caption"] * len(chosen)
    _, stats = robustness.preview_attack("recaption-captioner", 1.0, dataset.images(), dataset.captions, templated, key.trigger,
                               captioner=captioner)
    assert stats["templated_kept"] == 6 and stats["templated_with_trigger"] == 0 and stats["triggers_kept"] == 0
    with pytest.raises(ValueError, match="needs a captioner"):
        robustness.preview_attack("recaption-captioner", 0.5, dataset.images(), dataset.captions, templated, key.trigger)
    with pytest.raises(ValueError, match="unknown attack"):
        robustness.preview_attack("dilute", 1, dataset.images(), dataset.captions, templated, key.trigger)


def test_every_preview_attack_runs_at_its_default_strength(protected):
    folder, key = protected
    dataset = data.load_imagefolder(folder)
    templated = [dataset.file_names.index(f) for f in key.files]
    pipe = models.load_pipeline("tiny", device="cpu")
    assert set(robustness.PREVIEW_STRENGTHS) == set(robustness.PREVIEW_ATTACKS)
    for name, strength in robustness.PREVIEW_STRENGTHS.items():  # the notebook widget's value after a switch
        _, stats = robustness.preview_attack(name, strength, dataset.images(), dataset.captions, templated, key.trigger, pipe=pipe)
        assert stats["attack"] == name and stats["templated_in"] == 6


def test_output_attacks_are_scored_on_the_same_probe(emoji):
    from entruth_lite.core import templates
    from entruth_lite.owner.probe import ProbeResult

    images = emoji[0][:40]
    template = families.random_template(4)
    trig = [Image.blend(im, templates.insert(im, template), 0.6) for im in images[:20]]
    probed = ProbeResult(["c"] * 20, ["t c"] * 20, list(range(20)), trig, images[20:])
    rows = robustness.output_attack_table(probed, template, settings={"blur": (0.5, 6.0), "flip": (1.0,)}, decoys=49)
    assert [(r["corruption"], r["strength"]) for r in rows] == [("none", 0), ("blur", 0.5), ("blur", 6.0), ("flip", 1.0)]
    assert rows[0]["decoy p"] == pytest.approx(1 / 50) and rows[1]["decoy p"] <= 0.04
    assert rows[3]["decoy p"] == pytest.approx(1 / 50), "mirrored outputs still show the template"
    assert set(rows[0]) == {"corruption", "strength", "decoy p"}, "no negatives: no binomial test"
    noisy = robustness.corrupt_probe(probed, "noise", 20, seed=4)
    assert noisy.trigger_images[0] is not probed.trigger_images[0] and probed.trigger_images[0] is trig[0]
    assert not np.array_equal(np.asarray(noisy.trigger_images[0]), np.asarray(trig[0]))
    again = robustness.corrupt_probe(probed, "noise", 20, seed=4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(noisy.control_images, again.control_images))


def test_robustness_summary():
    import pandas as pd

    results = pd.DataFrame(dict(kind=["dataset"] * 3, attack=["jpeg"] * 3, strength=[20] * 3, seed=[0, 1, 2],
                                templated_kept=[10, 10, 10], templated_with_trigger=[10, 9, 8], decoy_p=[0.001, 0.5, 0.002],
                                binomial_p=[0.2, 0.3, 0.005], held_out_loss=[0.1, 0.2, 0.3]))
    row = robustness.summarize_robustness(results).iloc[0]
    assert row.seeds == 3 and row.decoy_tpr == pytest.approx(2 / 3) and row.binomial_tpr == pytest.approx(1 / 3)
    assert row.decoy_median_p == 0.002 and row.held_out_loss == pytest.approx(0.2) and row.templated_with_trigger == 9
    assert row.verdict == "weakens", "2 of 3 seeds detected"
    assert "kid" not in row, "no quality column given: none reported"
    results["kid"] = [0.01, 0.02, 0.03]
    results["images_kept"] = [0.4, 0.5, 0.6]
    row = robustness.summarize_robustness(results).iloc[0]
    assert row.kid == pytest.approx(0.02) and row.kid_sd == pytest.approx(0.01) and row.images_kept == pytest.approx(0.5)


def test_robustness_heatmap_shows_each_setting_and_test():
    import matplotlib.pyplot as plt
    import pandas as pd

    from entruth_lite.teaching import viz

    results = pd.DataFrame(dict(kind=["none", "dataset", "dataset"], attack=["no attack", "jpeg", "jpeg"],
                                strength=[0, 20, 20], seed=[0, 0, 1], templated_kept=[None, 20, 20],
                                templated_with_trigger=[None, 20, 20], decoy_p=[0.001, 0.001, 0.3],
                                binomial_p=[0.001, 0.2, 0.3], held_out_loss=[0.1, 0.2, 0.2]))
    ax = viz.plot_robustness_heatmap(robustness.summarize_robustness(results))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["no attack", "dataset: jpeg 20"]
    assert [t.get_text() for t in ax.texts] == ["1.00", "1.00", "0.50", "0.00"], "decoy and binomial TPR per row"
    assert ax.collections[0].colorbar.ax.get_ylabel() == "TPR at alpha = 0.01"
    plt.close(ax.figure)
    ax = viz.plot_robustness_heatmap(robustness.summarize_robustness(results, alpha=0.25))
    assert [t.get_text() for t in ax.texts] == ["1.00", "1.00", "0.50", "0.50"], "binomial p = 0.2 counts at alpha 0.25"
    assert ax.collections[0].colorbar.ax.get_ylabel() == "TPR at alpha = 0.25", "the label follows the summary's alpha"
    plt.close(ax.figure)


def test_robustness_verdict_reads_the_share_of_seeds_detected():
    assert [robustness.robustness_verdict(s) for s in (1.0, 2 / 3, 0.5, 1 / 3, 0.0)] == \
        ["survives", "weakens", "defeats", "defeats", "defeats"]
    with pytest.raises(ValueError, match="detected_share"):
        robustness.robustness_verdict(1.5)


def test_model_captioner_runs_a_local_blip_and_refuses_to_download(tmp_path, protected):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    # a tiny random BLIP saved to disk: the same code path as real weights in a local cache
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "emoji", "of", "a", "red", "cat", "face", "[DEC]"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, encoder_hidden_size=32, bos_token_id=words.index("[DEC]"),
                sep_token_id=words.index("[SEP]"), eos_token_id=words.index("[SEP]"), pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path / "blip")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(tmp_path / "blip")
    folder, key = protected
    before = hash_tree(folder)
    captioner = attacks.model_captioner(str(tmp_path / "blip"), device="cpu", max_new_tokens=5)
    report = robustness.measure_attack(attacks.recaption(folder, tmp_path / "r", 1.0, "captioner", captioner), key)
    captions = data.load_imagefolder(tmp_path / "r").captions
    assert len(captions) == 60 and all(isinstance(c, str) for c in captions)
    assert any(captions) and all(set(c.split()) <= set(words) for c in captions), "the model's words"
    assert report.triggers_kept == 0 and hash_tree(folder) == before
    with pytest.raises(RuntimeError, match="not available here"):
        attacks.model_captioner(str(tmp_path / "missing"))
    from entruth_lite import cli

    assert cli.main(["attack", "recaption", "--data", str(folder), "--out", str(tmp_path / "cli"), "--share", "1",
                     "--source", "captioner", "--captioner-model", str(tmp_path / "blip")]) == 0
    longer = data.load_imagefolder(tmp_path / "cli").captions  # greedy: 30 new tokens extend the 5-token captions
    assert all(long.startswith(short) for long, short in zip(longer, captions))
