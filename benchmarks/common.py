"""What every benchmark shares: run folders, the owner dataset and its plain images, fine-tune-and-probe,
cached scores, and writing tables. Benchmarks are modules of this package: ``python -m benchmarks.<name>``.

A run is one folder ``<out>/<name>-seed<seed>``: protect the owner data with ``random:<template seed>``,
fine-tune the tiny base on the release (or on the clean data: rate 0), probe it with the key's trigger and store
the probe images, so every detector and test can be evaluated later without sampling again. A finished run is
skipped when asked again; a killed one resumes from its newest checkpoint.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from entruth_lite.core import data, diffusion, emoji, models, templates
from entruth_lite.evaluation import robustness
from entruth_lite.infringer import presets, train
from entruth_lite.owner import audit, decoys, keys, probe, protect, triggers

HELD_OUT_SEED = 1  # probe seeds: the same for every model, so scores are paired across models
CHECKPOINT_EVERY = 500  # a run killed mid-training (sessions end abruptly) loses at most this many steps
DECOYS = 999  # enough for p < 0.01 (floor 1e-3); the audit draws up to 999,999 (benchmarks.query_budget)
FPR = audit.AuditConfig().fpr  # binomial tests: detector threshold at this false-positive rate on plain images
SCORES = "scores-mirror"  # cache name: bump it when the scoring changes (mirror: detect.template_scores's default;
# a cache of another decoy statistic than the audit's is scored again: cached_scores)


def run_folder(root: Path, name: str, seed: int) -> Path:
    """The one naming rule for a run's folder."""
    return Path(root) / f"{name}-seed{seed}"


LEGACY_FAMILY, LEGACY_TRIGGER_LENGTH = "random", 3  # the first tables' key design: their runs keep their names


def rate_name(rate: float, steps: int) -> str:
    """The name of an unattacked run at ``rate`` (0: a clean model) and ``steps`` (power and null benchmarks)."""
    return f"rate{rate:g}-steps{steps}"


def design_suffix(family: str, trigger_length: int) -> str:
    """What a run name adds for a key design other than the first tables' (``random`` family, 3-letter triggers)."""
    return "" if (family, trigger_length) == (LEGACY_FAMILY, LEGACY_TRIGGER_LENGTH) else f"-{family}-trigger{trigger_length}"


@dataclass
class Run:
    folder: Path
    rate: float  # share of the *released* data that was templated; 0 = a clean model (key never released)
    seed: int
    steps: int

    @classmethod
    def named(cls, root: Path, name: str, rate: float, seed: int, steps: int) -> "Run":
        return cls(run_folder(root, name, seed), rate, seed, steps)

    @property
    def key(self) -> Path:
        return self.folder / "key"

    @property
    def probe_file(self) -> Path:
        return self.folder / "probe.npz"

    @property
    def done(self) -> bool:
        return self.probe_file.is_file()


def add_run_arguments(parser) -> None:
    """The flags every verification benchmark shares."""
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--train-only", action="store_true", help="fine-tune and probe, no report")
    parser.add_argument("--report-only", action="store_true", help="report on the finished runs only")
    parser.add_argument("--archive", type=Path, help="keep what re-scoring needs of each finished run here (e.g. "
                        "benchmarks/results/runs, committed), and take finished runs from it instead of training")


ARCHIVED = ("run.json", "probe.npz")  # with the key folder: what re-scoring a run needs (not its model)


def archive_run(run: Run, archive: Path) -> Path:
    """Copy a finished run's probe, record and key to ``archive/<run folder name>``: machines are not kept between
    working sessions, so a sweep longer than one keeps its finished runs in the repository."""
    if not run.done:
        raise ValueError(f"{run.folder} has no probe: only a finished run is archived")
    kept = Path(archive) / run.folder.name
    (kept / "key").mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED:
        shutil.copy2(run.folder / name, kept / name)
    for path in run.key.iterdir():
        shutil.copy2(path, kept / "key" / path.name)
    return kept


def restore_run(run: Run, archive: Path) -> bool:
    """Bring an archived run back into its folder (probe, record, key); False when the archive does not hold it."""
    kept = Path(archive) / run.folder.name
    if not (kept / "probe.npz").is_file():
        return False
    shutil.copytree(kept, run.folder, dirs_exist_ok=True)
    return True


def restore_all(root: Path, archive: Path) -> tuple[int, int]:
    """Every archived run not yet under ``root`` brought back; (runs restored, runs that were there)."""
    kept = sorted(f for f in Path(archive).glob("*") if (f / "probe.npz").is_file()) if Path(archive).is_dir() else []
    brought = [f for f in kept if not (Path(root) / f.name / "probe.npz").is_file()
               and restore_run(Run(Path(root) / f.name, rate=float("nan"), seed=-1, steps=-1), archive)]
    return len(brought), len(kept) - len(brought)


def restored(run: Run, archive: Path | None) -> Run:
    """``run``, brought back from ``archive`` first when it is not in its folder (``--report-only`` on a new machine)."""
    if archive is not None and not run.done:
        restore_run(run, archive)
    return run


def owner_dataset(root: Path) -> Path:
    owner = Path(root) / "owner"
    if not (owner / data.METADATA).is_file():
        emoji.write_emoji_dataset(owner, overwrite=True)
    return owner


def base_pipeline():
    return models.load_pipeline("tiny", device="cpu")


def owner_negatives(root: Path) -> tuple[list[str], list[Image.Image]]:
    """The owner's images after the base VAE (what a model draws of them), cached as ``negatives.npz``."""
    cache = Path(root) / "negatives.npz"
    owner = data.load_imagefolder(owner_dataset(root))
    if not cache.is_file():
        round_trip = templates.vae_round_trip(base_pipeline(), list(owner.images()))
        np.savez_compressed(cache, names=np.asarray(owner.file_names), images=np.stack([np.asarray(i) for i in round_trip]))
    with np.load(cache, allow_pickle=False) as stored:
        return [str(n) for n in stored["names"]], [Image.fromarray(a) for a in stored["images"]]


def plain_negatives(root: Path, key) -> list[Image.Image]:
    """The owner's plain images (not templated under ``key``) after the base VAE."""
    names, images = owner_negatives(root)
    altered = set(key.files)
    return [image for name, image in zip(names, images) if name not in altered]


def fit_and_probe(root: Path, rate: float, seed: int, steps: int, template_seed: int, queries: int = 64,
                  keep_model: bool = True, attack=None, overrides: dict | None = None, name: str | None = None,
                  family: str = "random", trigger_length: int | None = None, archive: Path | None = None) -> Run:
    """Protect the owner data with ``<family>:<template_seed>`` (a real key either way), train on the protected
    copy (``rate`` > 0) or on the clean data (``rate`` = 0: the key exists but its release was never used,
    which is exactly the null hypothesis), then probe with the key's trigger and save the images. A
    ``trigger_length`` draws the trigger with that many letters from the run's seed (default: protect's "auto").

    Robustness runs: ``attack(released, out, key) -> AttackReport`` rewrites the release before training, and
    ``overrides`` change the preset's settings; ``name`` labels the run folder (default ``rate_name``). With an
    ``archive``, a run it holds is restored instead of trained, and a finished run is archived (``archive_run``)."""
    run = Run.named(root, name or rate_name(rate, steps), rate, seed, steps)
    if not run.done and archive is not None:
        restore_run(run, archive)
    if run.done:
        if archive is not None and not (Path(archive) / run.folder.name / "probe.npz").is_file():
            archive_run(run, archive)
        return run
    owner = owner_dataset(root)
    released = run.folder / "protected"
    trigger = "auto" if trigger_length is None else triggers.generate_trigger(
        data.load_imagefolder(owner).captions, length=trigger_length, seed=seed)  # as protect draws "auto"
    report = protect.protect(owner, f"{family}:{template_seed}", released, run.key, rate=rate or 0.01, seed=seed,
                             trigger=trigger, overwrite=True)
    key = keys.load_key(run.key)
    # checkpoints make a killed run resumable; ``checkpoint_every`` is not part of the settings' fingerprint
    config = presets.preset("tiny-cpu", **({"steps": steps, "seed": seed, "checkpoint_every": CHECKPOINT_EVERY}
                                         | (overrides or {})))
    data_dir = released if rate > 0 else owner
    attack_report = None
    if attack is not None:
        shutil.rmtree(run.folder / "attacked", ignore_errors=True)  # made again from the release: never a user's
        attack_report = attack(data_dir, run.folder / "attacked", key)
        data_dir = run.folder / "attacked"
    model_dir = run.folder / "model"
    result = train.ensure_finetuned(data_dir, model_dir, config, pipe=base_pipeline())
    if result is None:  # trained before the probe was interrupted
        seconds = json.loads((model_dir / "train_seconds.json").read_text()) \
            if (model_dir / "train_seconds.json").is_file() else float("nan")
        losses, resumed_from = json.loads((model_dir / "loss_history.json").read_text()), None
    else:
        seconds, losses, resumed_from = result.seconds, result.losses, result.resumed_from
        (model_dir / "train_seconds.json").write_text(json.dumps(round(seconds, 1)))
    tuned = models.load_finetuned(base_pipeline(), model_dir)
    split = emoji.emoji_splits().probe
    started = time.time()
    probed = probe.probe_model(tuned, [caption for _, caption in split], key.trigger, key.placement, n=queries,
                         seed=HELD_OUT_SEED)
    held_out_loss = diffusion.image_losses(tuned, [emoji.render_emoji(p) for p, _ in split], [c for _, c in split])
    meta = dict(rate=rate, seed=seed, steps=steps, template=key.template.name, trigger=key.trigger,
                n_altered=report.n_altered,
                trained_on="protected" if rate > 0 else "clean", train_seconds=round(seconds, 1),
                sample_seconds=round(time.time() - started, 1), final_loss=float(np.mean(losses[-50:])),
                held_out_loss=float(held_out_loss.mean()), overrides=overrides or {},
                resumed_from_step=resumed_from,  # train_seconds then counts only the steps after it
                attack=attack_report.to_dict() if attack_report is not None else None)
    (run.folder / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    probe.save_probe(probed, run.probe_file)
    shutil.rmtree(released)  # the release can be rebuilt from the owner data and the key's seed
    shutil.rmtree(run.folder / "attacked", ignore_errors=True)
    shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)  # the finished model is kept; its checkpoints are not
    if not keep_model:
        shutil.rmtree(model_dir)
    if archive is not None:
        archive_run(run, archive)
    return run


def seeded_attack(attack, seed: int):
    """A dataset attack as ``fit_and_probe`` calls it, drawing its random choices (which captions, images, extra
    data) from the run's seed, so seeds are independent replicates of the attack too (de-duplication draws
    nothing and takes no seed)."""
    seeded = {"seed": seed} if "seed" in inspect.signature(attack).parameters else {}

    def attacked(released, out, key):
        report = attack(released, out=out, overwrite=True, **seeded)
        return report if key is None else robustness.measure_attack(report, key)  # what survived, by the key
    return attacked


def cached_scores(cache: Path, compute) -> dict[str, np.ndarray]:
    """``compute()``'s score arrays, stored in ``cache`` (.npz) the first time and read from it afterwards; again
    when its decoy scores were made for another statistic than the audit's (a cache older than the choice)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            scores = dict(stored)
        if "decoy_released" not in scores or decoys.stored_statistic(scores) == decoys.DEFAULT_STATISTIC:
            return scores
    scores = compute()
    np.savez_compressed(cache, **scores)
    return scores


def projection_scores(root: Path, run: Run, corruption: tuple[str, float] | None = None, seed: int = 0) -> dict:
    """The projection detector's scores of the run's probe (corrupted by ``robustness.corrupt_probe`` for output
    attacks) with ``DECOYS`` decoys and the owner's plain images. A run scored with every detector already
    (``SCORES``.npz, the verification report) is read from there."""

    folder = run.folder
    if corruption is None and (folder / f"{SCORES}.npz").is_file():
        cache = folder / f"{SCORES}.npz"
    elif corruption is None:
        cache = folder / f"{SCORES}-projection.npz"
    else:
        cache = folder / f"{SCORES}-output-{corruption[0]}-{corruption[1]:g}.npz"

    def compute():
        key = keys.load_key(run.key)
        probed = probe.load_probe(run.probe_file)
        if corruption is not None:
            probed = robustness.corrupt_probe(probed, *corruption, seed=seed)
        return audit.score_probe(probed, key.template, ("projection",), plain_negatives(root, key), decoys=DECOYS,
                                 salt=key.key_sha256, progress=False)

    return cached_scores(cache, compute)


NULL_FORMATS = {"p_rate_above_0.05": ".2g", "p_rate_above_0.01": ".2g", "median_p": ".2g"}


def false_positive_row(p_values) -> dict:
    """Clean models' p-values of one test as a calibration row: how many are flagged at alpha 0.05 and 0.01, the
    one-sided binomial p-value of 'the false-positive rate exceeds alpha' (small = anti-conservative), the median p
    (near 0.5 for an exact test)."""
    from scipy import stats

    p = np.asarray(p_values, float)
    row = dict(models=len(p))
    for alpha in (0.05, 0.01):
        k = int((p < alpha).sum())
        row[f"flagged_at_{alpha:g}"] = k
        row[f"p_rate_above_{alpha:g}"] = float(stats.binomtest(k, len(p), alpha, alternative="greater").pvalue)
    return row | dict(median_p=float(np.median(p)))


def markdown_table(table, formats: dict[str, str] | None = None) -> str:
    """A pandas table as GitHub markdown; ``formats`` maps a column to a format spec (missing values print "-")."""
    formats = formats or {}

    def cell(column, value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        return format(value, formats[column]) if column in formats else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_table(rows: list[dict], path: Path, formats: dict[str, str] | None = None):
    """Save ``rows`` as CSV at ``path`` and print them as markdown; returns the table (None when empty)."""
    import pandas as pd

    if not rows:
        print("no finished runs yet")
        return None
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False)
    print(markdown_table(table, formats))
    print(f"\ntable: {path}")
    return table
