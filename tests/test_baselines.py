"""DIAGNOSIS-style coating and loss-based membership inference, the baselines EnTruth is compared to."""

import numpy as np
import pytest

from conftest import hash_tree
from entruth_lite.core import data
from entruth_lite.core import emoji as emoji_data
from entruth_lite.evaluation import baselines
from entruth_lite.owner import detect, verify


@pytest.fixture(scope="module")
def emoji():
    images, captions, names = emoji_data.emoji_dataset("owner")
    order = np.random.default_rng(0).permutation(len(images))[:200]
    return [images[i] for i in order], [captions[i] for i in order], [names[i] for i in order]


@pytest.fixture
def owner(tmp_path, emoji):
    return data.save_imagefolder(emoji[0][:40], emoji[1][:40], tmp_path / "owner", file_names=emoji[2][:40])


def test_coating_with_a_trigger_writes_a_new_folder_and_a_key(tmp_path, owner):
    before = hash_tree(owner)
    key = baselines.coat_dataset(owner, tmp_path / "coated", tmp_path / "key", rate=0.2, strength=1.0, seed=3)
    assert hash_tree(owner) == before
    coated = data.load_imagefolder(tmp_path / "coated")
    src = data.load_imagefolder(owner)
    changed = [n for n, a, b in zip(src.file_names, src.images(), coated.images())
               if not np.array_equal(np.asarray(a), np.asarray(b))]
    assert len(key.files) == 8 and set(changed) <= set(key.files) and len(changed) >= 6
    with_trigger = {n for n, c in zip(coated.file_names, coated.captions) if key.trigger in c.split()}
    assert with_trigger == set(key.files)
    assert baselines.load_coat_key(tmp_path / "key") == key
    with pytest.raises(FileExistsError):
        baselines.coat_dataset(owner, tmp_path / "c2", tmp_path / "key")


def test_unconditional_coating_is_subtle_and_everywhere(tmp_path, owner):
    key = baselines.coat_dataset(owner, tmp_path / "c", tmp_path / "k", mode="unconditional", strength=1.0)
    assert key.rate == 1.0 and key.trigger is None and len(key.files) == 40
    a, b = data.load_imagefolder(owner).image(0), data.load_imagefolder(tmp_path / "c").image(0)
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
    assert 0 < diff < 25, "a warp, not a template"
    with pytest.raises(ValueError, match="coating mode"):
        baselines.coat_dataset(owner, tmp_path / "x", tmp_path / "y", mode="sometimes")


def test_coating_classifier_detects_coated_images_and_diagnosis_decides(emoji):
    images = emoji[0]
    key = baselines.CoatKey(seed=1, strength=2.0, grid=4, rate=1.0, mode="unconditional", trigger=None, files=[],
                            source="")
    config = detect.ClassifierConfig(augment=False, steps=300, distractors=0, seed=0)
    clf = baselines.train_coat_classifier(key, images[:160], config, progress=False)
    unseen = images[160:]
    coated_scores = clf.scores([key.coat(im) for im in unseen])
    plain_scores = clf.scores(unseen)
    assert verify.roc_curve(coated_scores, plain_scores)[2] > 0.8
    infringer = baselines.diagnosis_test(coated_scores, clf)
    innocent = baselines.diagnosis_test(plain_scores, clf)
    assert infringer.share_flagged > innocent.share_flagged
    assert not innocent.decision and innocent.binomial.p_value > 0.01


def test_membership_test_direction_and_validity():
    rng = np.random.default_rng(0)
    assert baselines.membership_test(rng.normal(0.9, 0.1, 100), rng.normal(1.0, 0.1, 100)).decision
    null = [baselines.membership_test(rng.normal(size=50), rng.normal(size=50), alpha=0.05).decision for _ in range(600)]
    assert np.mean(null) <= 0.05 + 0.03
    with pytest.raises(ValueError, match="member"):
        baselines.membership_test([], [1.0])


def test_split_holdout_keeps_a_random_share_back(tmp_path, owner):
    released, held = baselines.split_holdout(owner, tmp_path / "rel", 0.25, seed=2)
    names = data.load_imagefolder(owner).file_names
    kept = data.load_imagefolder(released).file_names
    assert len(held) == 10 and len(kept) == 30 and set(kept).isdisjoint(names[i] for i in held)


def test_comparison_summary_counts_own_tests_and_false_positives_on_clean_models():
    import pandas as pd

    results = pd.DataFrame(dict(
        method=["entruth"] * 3 + ["clean"] * 3, seed=[0, 1, 2] * 2, rate=[0.01] * 3 + [0.0] * 3,
        psnr=[12.0, 14.0, 13.0] + [np.nan] * 3,
        p_entruth=[0.001, 0.002, 0.5, 0.3, 0.004, 0.9], membership_p=[0.001, 0.2, 0.3, 0.5, 0.6, 0.7],
        fid=[2.0, 3.0, 4.0, 1.0, 2.0, 3.0], kid=[0.02, 0.03, 0.04, 0.01, 0.02, 0.03]))
    summary = baselines.summarize_comparison(results).set_index("method")
    entruth = summary.loc["entruth"]
    assert entruth.tpr == pytest.approx(2 / 3) and entruth.median_p == 0.002 and entruth.clean_flagged == "1/3"
    assert entruth.membership_tpr == pytest.approx(1 / 3) and entruth.psnr_db == 13.0
    assert entruth.fid == 3.0 and entruth.fid_sd == pytest.approx(1.0)
    assert pd.isna(summary.loc["clean"].clean_flagged) and np.isnan(summary.loc["clean"].tpr), "no test of its own"


def test_baseline_comparison_plot_shows_fid_and_every_tests_p_values():
    import matplotlib.pyplot as plt
    import pandas as pd

    from entruth_lite.teaching import viz

    results = pd.DataFrame(dict(method=["entruth", "entruth", "clean", "clean"], seed=[0, 1, 0, 1],
                                p_entruth=[0.001, 0.002, 0.3, 0.5], membership_p=[0.1, 0.2, 0.3, 0.4],
                                fid=[2.0, 3.0, 1.0, 2.0]))
    axes = viz.plot_baseline_comparison(results)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["entruth", "clean"]
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["p_entruth"], "one column per test's p-value"
    assert axes[1].get_yscale() == "log"
    plt.close(axes[0].figure)
