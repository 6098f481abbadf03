"""EnTruth against DIAGNOSIS-style coating and loss-based membership inference, at matched settings.

    python -m benchmarks.compare_baselines [--seeds 0 1 2] [--out runs/bench/baselines] [--train-only | --report-only]

Per seed, four fine-tunes of the tiny base with the ``tiny-cpu`` preset (full UNet, lr 1e-3, 1,500 steps), all
on the owner's emoji minus a random 10 % the owner kept back (the non-members membership inference needs):

- ``entruth``: 1 % of the release templated with ``random:<seed>`` and triggered;
- ``diagnosis-trigger``: 20 % coated (WaNet-style warp, strength 1) with a trigger word (DIAGNOSIS's default);
- ``diagnosis-uncond``: 100 % coated, no trigger (DIAGNOSIS's unconditional setting);
- ``clean``: the same data unaltered (the quality reference and every method's negative control).

Each model is probed with 64 held-out captions with its method's trigger (or without, for unconditional
coating) and samples 256 images of owner captions for quality. The report prints, per method: alteration rate,
visible change per altered image (PSNR), TPR at alpha = 0.01 over seeds, median p-value, the same on the clean
models (false positives), and the quality cost (FID/KID on the offline feature network vs the clean model's,
with the seed-to-seed spread); CSV + plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from entruth_lite.core import data, diffusion, emoji, models, templates
from entruth_lite.evaluation import baselines, quality
from entruth_lite.infringer import presets, train
from entruth_lite.owner import audit, detect, keys, probe, protect, selection

from .common import DECOYS, base_pipeline, markdown_table, owner_dataset, run_folder

METHODS = ("entruth", "diagnosis-trigger", "diagnosis-uncond", "clean")
HOLDOUT = 0.1
QUALITY_SAMPLES = 256


def prepare(root: Path, method: str, seed: int) -> dict:
    """The released data for one method and seed, and what the auditor needs to probe it."""
    run = run_folder(root, method, seed)
    released, held = baselines.split_holdout(owner_dataset(root), run / "released", HOLDOUT, seed=seed, overwrite=True)
    info = dict(held_out=held, trigger=None, psnr=None, rate=0.0)
    if method == "entruth":
        report = protect.protect(released, f"random:{seed}", run / "train-data", run / "key", rate=0.01, seed=seed,
                                 overwrite=True)
        info.update(trigger=report.trigger, psnr=report.psnr_db, rate=report.rate)
    elif method.startswith("diagnosis"):
        mode = "trigger" if method == "diagnosis-trigger" else "unconditional"
        key = baselines.coat_dataset(released, run / "train-data", run / "key", rate=0.2, mode=mode, seed=seed,
                                     overwrite=True)
        src = data.load_imagefolder(released)
        pairs = [(src.image(src.file_names.index(f)), key.coat(src.image(src.file_names.index(f)))) for f in key.files]
        info.update(trigger=key.trigger, psnr=selection.mean_stats(pairs)["psnr_db"], rate=key.rate)
    else:
        shutil.copytree(released, run / "train-data", dirs_exist_ok=True)
    return info


def fit(root: Path, method: str, seed: int, steps: int = 1500, queries: int = 64, samples: int = QUALITY_SAMPLES) -> Path:
    run = run_folder(root, method, seed)
    if (run / "result.npz").is_file():
        return run
    info = prepare(root, method, seed)
    config = presets.preset("tiny-cpu", seed=seed, steps=steps)
    train.ensure_finetuned(run / "train-data", run / "model", config)
    pipe = models.load_finetuned(base_pipeline(), run / "model")
    # probe with every method's key of this seed: a model's own key measures detection, the clean model's
    # probes with the others' keys measure false positives (METHODS puts the clean model last)
    for other in METHODS[:-1] if method == "clean" else (method,):
        trigger = None if other == "diagnosis-uncond" else _trigger(root, other, seed)
        probe.save_probe(_probe(pipe, trigger, queries), run / f"probe-{other}.npz")
    source = data.load_imagefolder(owner_dataset(root))
    caps = source.captions
    quality_seeds = list(range(samples))
    quality_prompts = [caps[i] for i in np.random.default_rng(seed).permutation(len(caps))[:samples]]
    samples = probe.generate(pipe, quality_prompts, quality_seeds)
    held = info["held_out"]
    members = [i for i in range(len(source)) if i not in set(held)][: 4 * len(held)]
    losses_in = diffusion.image_losses(pipe, [source.image(i) for i in members], [caps[i] for i in members])
    losses_out = diffusion.image_losses(pipe, [source.image(i) for i in held], [caps[i] for i in held])
    np.savez_compressed(run / "result.npz", samples=np.stack([np.asarray(s) for s in samples]),
                        member_losses=losses_in, nonmember_losses=losses_out)
    (run / "info.json").write_text(json.dumps({k: v for k, v in info.items() if k != "held_out"}, indent=2))
    for folder in ("released", "train-data"):
        shutil.rmtree(run / folder, ignore_errors=True)
    return run


def _trigger(root: Path, method: str, seed: int) -> str:
    key_dir = run_folder(root, method, seed) / "key"
    return keys.load_key(key_dir).trigger if method == "entruth" else baselines.load_coat_key(key_dir).trigger


def _probe(pipe, trigger: str | None, queries: int = 64) -> probe.ProbeResult:
    """64 held-out captions with the trigger and without (same seeds); unconditional coating has no trigger, so
    its auditor queries ordinary captions."""
    held_out = [c for _, c in emoji.emoji_splits().probe]
    if trigger:
        return probe.probe_model(pipe, held_out, trigger, "prefix", n=queries, seed=1)
    plain, _, seeds = probe.probe_prompts(held_out, "x", n=queries, seed=1)
    images = probe.generate(pipe, plain, seeds)
    return probe.ProbeResult(plain, plain, seeds, images, images)


def own_test(root: Path, method: str, seed: int, probed: probe.ProbeResult) -> float:
    """p-value of ``method``'s own test (its seed's key) on a probe of any model."""
    run = run_folder(root, method, seed)
    if method == "entruth":
        key = keys.load_key(run / "key")
        scores = audit.score_probe(probed, key.template, decoys=DECOYS, salt=key.key_sha256, progress=False)
        return audit.verdicts_from_scores(scores, methods=("decoy",))[0].p_value
    key = baselines.load_coat_key(run / "key")
    classifier_dir = run / "coat-classifier"
    if (classifier_dir / "classifier.json").is_file():
        clf = detect.load_classifier(classifier_dir)
    else:
        source = data.load_imagefolder(owner_dataset(root))
        plain = [source.image(i) for i in range(len(source)) if source.file_names[i] not in set(key.files)][:600]
        clf = baselines.train_coat_classifier(key, templates.vae_round_trip(base_pipeline(), plain),
                                              progress=False)
        detect.save_classifier(clf, classifier_dir)
    return baselines.diagnosis_test(clf.scores(probed.trigger_images), clf).binomial.p_value


def evaluate(root: Path, method: str, seed: int) -> dict:
    """One model: its own test's p-value (methods), every key's test on it (the clean model), membership."""
    from PIL import Image

    run = run_folder(root, method, seed)
    result = np.load(run / "result.npz")
    out = dict(method=method, seed=seed, **json.loads((run / "info.json").read_text()))
    out["membership_p"] = baselines.membership_test(result["member_losses"], result["nonmember_losses"]).p_value
    for other in METHODS[:-1] if method == "clean" else (method,):
        out[f"p_{other}"] = own_test(root, other, seed, probe.load_probe(run / f"probe-{other}.npz"))
    out["samples"] = [Image.fromarray(a) for a in result["samples"]]
    return out


def report(root: Path, seeds) -> None:
    import pandas as pd

    rows = [evaluate(root, m, s) for m in METHODS for s in seeds if (run_folder(root, m, s) / "result.npz").is_file()]
    if not rows:
        print("no finished runs yet")
        return
    net = quality.load_feature_net()
    reference = data.load_imagefolder(owner_dataset(root)).images()
    for row in rows:
        row.update(quality.fid_kid(reference, row.pop("samples"), net))
    table = pd.DataFrame(rows)
    table.to_csv(root / "compare_baselines.csv", index=False)
    summary = baselines.summarize_comparison(table)
    print(markdown_table(summary, dict(rate=".2g", psnr_db=".1f", tpr=".2f", median_p=".1e", membership_tpr=".2f",
                                       fid=".2f", fid_sd=".2f", kid=".4f", kid_sd=".4f")))
    print("\nQuality cost against the clean model of the same seed (same held-out split and training seed):\n")
    cost = quality.cost_against_clean(table).groupby("method", sort=False).agg(
        seeds=("fid", "count"), delta_fid=("fid", "mean"), delta_fid_sd=("fid", "std"), delta_kid=("kid", "mean"),
        delta_kid_sd=("kid", "std")).reset_index()
    print(markdown_table(cost, dict(delta_fid="+.2f", delta_fid_sd=".2f", delta_kid="+.4f", delta_kid_sd=".4f")))
    _plot(table, root / "compare_baselines.png")


def _plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from entruth_lite.teaching import viz

    axes = viz.plot_baseline_comparison(table)
    axes[0].figure.savefig(path, dpi=110)
    plt.close(axes[0].figure)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench/baselines")
    parser.add_argument("--steps", type=int, default=1500, help="fine-tuning steps (the tiny-cpu preset's 1,500)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--samples", type=int, default=QUALITY_SAMPLES, help="generations per model for FID/KID")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.out)
    if not args.report_only:
        for seed in args.seeds:
            for method in METHODS:
                started = time.time()
                fit(root, method, seed, args.steps, args.queries, args.samples)
                print(f"{method} seed {seed}: {time.time() - started:.0f} s", flush=True)
    if not args.train_only:
        report(root, args.seeds)


if __name__ == "__main__":
    main()
