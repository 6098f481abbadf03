"""What a fine-tune learned: the measures, their shares of a reference's gain, and snapshots along one run."""

import numpy as np
import pytest
from safetensors.torch import load_file

from entruth_lite.core import data, models
from entruth_lite.core import emoji as emoji_data
from entruth_lite.evaluation import utility
from entruth_lite.infringer import presets, train


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    images, captions, names = emoji_data.emoji_dataset("owner", limit=12)
    return data.save_imagefolder(images, captions, tmp_path_factory.mktemp("u") / "owner", file_names=names)


def test_gain_share_is_the_share_of_the_references_gain():
    assert utility.gain_share(0.4, 0.3, 0.2) == pytest.approx(0.5)
    assert utility.gain_share(0.4, 0.2, 0.2) == pytest.approx(1.0)
    assert utility.gain_share(0.4, 0.5, 0.2) == pytest.approx(-0.5), "worse than the base: a negative share"
    with pytest.raises(ValueError, match="gained nothing"):
        utility.gain_share(0.4, 0.3, 0.4)
    with pytest.raises(ValueError, match="finite"):
        utility.gain_share(float("nan"), 0.3, 0.2)


def test_a_finetune_learns_what_it_was_shown_and_the_measures_are_replayable(owner, tmp_path):
    images, captions, _ = emoji_data.emoji_dataset("owner", limit=12)
    held = emoji_data.emoji_dataset("probe", limit=8)[:2]
    base = models.load_pipeline("tiny", device="cpu")
    measure = dict(held_out=held, samples=8, num_inference_steps=4, repeats=2)
    before = utility.measure_learned(base, (images, captions), **measure)
    assert before == utility.measure_learned(base, (images, captions), **measure), "seeded: the same numbers again"
    train.finetune(owner, tmp_path / "m", presets.TrainConfig(method="full", steps=60, batch_size=12,
                                                             learning_rate=1e-3), pipe=base, progress=False)
    tuned = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "m")
    after = utility.measure_learned(tuned, (images, captions), **measure)
    assert after.release_loss < before.release_loss and np.isfinite(after.kid)
    shares = utility.utility(before, after, after)
    assert set(shares) == set(utility.MEASURES) and shares["release_loss"] == pytest.approx(1.0)
    assert utility.utility(before, before, after)["release_loss"] == pytest.approx(0.0)
    assert set(utility.utility(before, utility.Learned(0.1), after)) == {"release_loss"}, "only what all three have"


def test_snapshots_along_a_run_are_the_shorter_runs_weights(owner, tmp_path):
    """One run gives a curve: the weights saved after step 2 of a 4-step run are a 2-step run's (constant rate)."""
    config = presets.TrainConfig(method="lora", lora_rank=4, steps=4, batch_size=4)
    train.finetune(owner, tmp_path / "long", config, progress=False, snapshots=(2, 4))
    train.finetune(owner, tmp_path / "short", presets.TrainConfig(method="lora", lora_rank=4, steps=2, batch_size=4),
                   progress=False)
    name = models.LORA_WEIGHTS_NAME
    snapshot, short = (load_file(folder / name) for folder in (train.snapshot_folder(tmp_path / "long", 2),
                                                                tmp_path / "short"))
    assert snapshot.keys() == short.keys() and all(np.array_equal(snapshot[k], short[k]) for k in short)
    final, last = (load_file(folder / name) for folder in (tmp_path / "long", train.snapshot_folder(tmp_path / "long", 4)))
    assert all(np.array_equal(final[k], last[k]) for k in final)
    models.load_finetuned(models.load_pipeline("tiny", device="cpu"), train.snapshot_folder(tmp_path / "long", 2))
