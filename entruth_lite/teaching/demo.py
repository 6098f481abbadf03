"""The demo's shared artefacts under ``runs/``: the owner's dataset, its protected release and key, so that
each notebook can run on its own (it reuses what an earlier notebook wrote when the settings match)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core import data, emoji, files, models
from ..core.families import DEFAULT_FAMILY, is_family
from ..core.models import load_finetuned, load_pipeline
from ..core.progress import tqdm
from ..evaluation import quality
from ..infringer import checkpoints, presets, train
from ..infringer.presets import TrainConfig
from ..infringer.train import TrainResult
from ..owner import keys, probe, protect, record, selection, triggers, verify
from . import classroom

EMOJI = "emoji"  # the default dataset: the owner split of the Twemoji images that ship with the package
HELD_OUT_SHARE = 0.1  # of the owner's own dataset, kept out of the release: its captions are the probe prompts
MIN_HELD_OUT = 8
SOURCE_FILE = "source.json"
SECONDS_FILE = "train_seconds.json"  # in a fine-tune's folder: how long ``finetuned`` trained it


@dataclass(frozen=True)
class LabSettings:
    """The lab's settings, in one place: notebooks 02-05 read them in their parameter cells and ``record_class``
    records the class pack at them (a pack serves only the settings it was recorded with)."""

    preset: str = "tiny-cpu"
    rate: float = 0.01  # share of the release that is templated
    template: str = "mosaic:0"  # one fixed member of the default family: a class's models were recorded with it
    seed: int = 0
    steps: int = 750  # half the tiny preset's 1,500: what a lab fine-tunes in minutes on two cores
    queries: int = 64  # probe queries per model (trigger and control prompts each)
    sample_steps: int = 25  # sampler steps of every probe and quality sample
    quality_samples: int = 128  # notebook 05's generations per model for FID / KID


LAB = LabSettings()


def measured_power_note(table, rate: float, template: str, steps: int = LAB.steps) -> str:
    """``verify.measured_power`` for the lab's run, saying what sets it apart from the benchmark's fine-tunes (the
    tiny preset's steps, on members of the default family)."""
    measured_steps = presets.PRESETS["tiny-cpu"]["steps"]
    caveats = [f"the benchmark trained {measured_steps:,} steps, this lab {steps:,}: expect fewer"] if steps < measured_steps else []
    if not template.startswith(f"{DEFAULT_FAMILY}:"):
        caveats.append(f"it measured {DEFAULT_FAMILY} members, not {template!r}")
    note = verify.measured_power(table, rate)
    return note + (f" ({'; '.join(caveats)})" if caveats else "")


@dataclass
class Release:
    owner: Path  # the owner's data as the demo trains on it (the clean model's training set)
    protected: Path  # its protected release
    key: Path  # the owner's key
    held_out: Path | None = None  # captioned images never released: their captions are the probe prompts


def dataset_tag(dataset: str | Path = EMOJI, size: int = 32) -> str:
    """The folder name of one dataset at one training resolution (``32px`` for the emoji; ``<name>-<hash>-<size>px``
    for the owner's own data, the hash of where it came from, so two datasets called ``photos`` never mix)."""
    if str(dataset) == EMOJI:
        return f"{size}px"
    source = str(Path(dataset).resolve()) if Path(dataset).exists() else str(dataset)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(dataset)).name or "dataset").strip("-.") or "dataset"
    return f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:8]}-{size}px"


def release_folders(runs: str | Path, size: int = 32, dataset: str | Path = EMOJI) -> Release:
    """Where the demo keeps the owner's data, its release, the held-out probe set and the key: one set per dataset
    and resolution, so tiny and Stable Diffusion runs never overwrite each other."""
    runs, tag = Path(runs), dataset_tag(dataset, size)
    return Release(owner=runs / "data" / tag / "owner", protected=runs / "data" / tag / "protected",
                   key=runs / "keys" / tag / "owner-key", held_out=runs / "data" / tag / "held-out")


def split_held_out(n: int, seed: int = 0) -> np.ndarray:
    """Indices of the rows of an ``n``-row dataset kept out of the release (a fixed, seeded share)."""
    n_held = max(MIN_HELD_OUT, round(HELD_OUT_SHARE * n))
    if n - n_held < MIN_HELD_OUT:
        raise data.DatasetError(f"the dataset has {n} images: the demo needs at least {2 * MIN_HELD_OUT} "
                                f"({MIN_HELD_OUT} held out for probe prompts, the rest released)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_held])


def write_owner_data(dataset: str | Path, folders: Release, size: int) -> None:
    """The owner's data and a held-out probe set: the emoji (owner and probe splits, drawn at ``size``), or the
    owner's own imagefolder (or hub dataset, imported at ``size``) split into released and held-out rows. Files
    of a local folder are copied byte for byte; the source is never modified."""
    if (folders.owner.parent / SOURCE_FILE).is_file():  # the demo's own folders, perhaps from an earlier version
        for folder in (folders.owner, folders.held_out):
            files.adopt(folder)
    if str(dataset) == EMOJI:
        emoji.write_emoji_dataset(folders.owner, size=size, overwrite=True)
        emoji.write_emoji_dataset(folders.held_out, split="probe", size=size, overwrite=True)
    else:
        folder = Path(dataset)
        if not (folder / data.METADATA).is_file():  # a hub id (or a datasets folder): import once
            folder = folders.owner.parent / "imported"
            if not (folder / data.METADATA).is_file():
                data.import_captioned(str(dataset), folder, resolution=size, overwrite=True)
        source = data.load_imagefolder(folder)
        held = set(split_held_out(len(source)).tolist())
        for folder, rows in ((folders.owner, [i for i in range(len(source)) if i not in held]),
                             (folders.held_out, sorted(held))):
            data.save_imagefolder([source.path(i) for i in rows], [source.captions[i] for i in rows], folder,
                                  file_names=[source.file_names[i] for i in rows],
                                  extras=[source.extras[i] for i in rows], overwrite=True)
    (folders.owner.parent / SOURCE_FILE).write_text(json.dumps({"dataset": str(dataset), "size": size}))


def _owner_data_current(dataset: str | Path, folders: Release, size: int) -> bool:
    marker = folders.owner.parent / SOURCE_FILE
    return (marker.is_file() and json.loads(marker.read_text()) == {"dataset": str(dataset), "size": size}
            and (folders.owner / data.METADATA).is_file() and (folders.held_out / data.METADATA).is_file())


def release(runs: str | Path, rate: float = 0.01, template: str = DEFAULT_FAMILY, seed: int = 0,
            size: int = 32, dataset: str | Path = EMOJI) -> Release:
    """The owner's dataset (``dataset``: the emoji, or a folder or hub id of the owner's own captioned images;
    ``size`` px: 32 for the tiny model, 512 for Stable Diffusion) and its protected release at ``rate``; made
    once, then reused while the settings match. Images of any size are templated at ``size``, as a trainer
    would crop them."""
    folders = release_folders(runs, size, dataset)
    owner, protected, key_dir = folders.owner, folders.protected, folders.key
    fresh_owner = not _owner_data_current(dataset, folders, size)
    if fresh_owner:
        write_owner_data(dataset, folders, size)
    try:
        key = keys.load_key(key_dir, release=protected)  # also: the release committed to this key
        same_template = (key.template.family == template if is_family(template) and ":" not in template
                         else key.template.name == template)  # a family name: any secret member of it will do
        current = (not fresh_owner and same_template and key.seed == seed
                   and len(key.files) == selection.count_for(key.n_images, rate=rate)
                   and (protected / data.METADATA).is_file()
                   # the trigger protect draws now (a release made before a change of the default is remade)
                   and key.trigger == triggers.generate_trigger(data.load_imagefolder(owner).captions, seed=seed))
    except (FileNotFoundError, ValueError):
        current = False
    if not current:
        protect.protect(owner, template, protected, key_dir, rate=rate, seed=seed, overwrite=True,
                        resolution=None if str(dataset) == EMOJI else size)
    return folders


def held_out_captions(release: Release) -> list[str]:
    """The probe prompts: captions of images the release never contained."""
    return [record.text for record in data.read_metadata(release.held_out)]


def images_at(folder: str | Path, size: int, limit: int | None = None) -> tuple[list, list[str]]:
    """(images, captions) of an imagefolder as a trainer sees them: each resized and centre-cropped to ``size``."""
    dataset = data.load_imagefolder(folder)
    rows = range(len(dataset) if limit is None else min(limit, len(dataset)))
    return [data.crop_to_square(dataset.image(i), size) for i in rows], [dataset.captions[i] for i in rows]


def model_folder(runs: str | Path, name: str, config, data_dir: str | Path) -> Path:
    """``runs/models/<name>-<model>-<hash of the settings and data>``: a run with other settings, another base
    model or other data gets its own folder, so a finished fine-tune (hours on a small GPU) is never overwritten."""
    digest = hashlib.sha256(f"{config.fingerprint()}|{checkpoints.dataset_fingerprint(data_dir)}".encode()).hexdigest()
    return Path(runs) / "models" / f"{name}-{Path(str(config.model)).name}-{digest[:10]}"


def finetuned(runs: str | Path, release: Release, config, pipe=None, progress: bool = True,
              side_by_side: bool | None = None) -> dict[str, Path]:
    """Weights of the demo's two fine-tunes, ``protected`` (on the release) and ``clean`` (on the owner's data):
    reused when an earlier run (notebook 02) finished them, resumed from a checkpoint when one was interrupted,
    trained now otherwise. ``side_by_side`` (default: the tiny model on a CPU with several cores, whose small
    matrices leave cores idle) trains both at once, one process each (``finetune_side_by_side``);
    otherwise one after the other in this process."""
    data_dirs = {"protected": release.protected, "clean": release.owner}
    folders = {name: model_folder(runs, name, config, data_dir) for name, data_dir in data_dirs.items()}
    if side_by_side is None:
        side_by_side = (str(config.model) in models.TINY_ALIASES and not torch.cuda.is_available()
                        and (os.cpu_count() or 1) > 1)
    if side_by_side:
        results = dict(zip(data_dirs, finetune_side_by_side(
            [(data_dirs[name], folders[name]) for name in data_dirs], config, progress=progress)))
    else:
        results = {name: train.ensure_finetuned(data_dirs[name], folders[name], config, pipe=pipe, progress=progress)
                   for name in data_dirs}
    for name, result in results.items():
        if result is not None and not result.resumed_from:  # a resumed run's seconds count only its last part
            (folders[name] / SECONDS_FILE).write_text(json.dumps(round(result.seconds, 1)) + "\n")
    return folders


def saved_seconds(folder: str | Path) -> float | None:
    """How long ``finetuned`` took to train the model in ``folder`` (None if it was resumed or trained elsewhere)."""
    path = Path(folder) / SECONDS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def cached_probe(runs: str | Path, model: str, load, key, captions, n: int, seed: int = 1, num_inference_steps: int = 25,
           guidance_scale: float = 3.0):
    """The probe of a model (``model``: its name under ``runs/models``, e.g. a ``finetuned`` folder's, or
    ``"base-tiny"``) with ``key``'s trigger on ``captions``: generated once, stored under ``runs/probes`` and read
    back by any notebook that asks for the same queries (``load()`` is called only when it must generate)."""
    settings = dict(trigger=key.trigger, placement=key.placement, captions=list(captions), n=n, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(runs) / "probes" / f"{Path(str(model)).name}-{digest}.npz"
    if path.is_file():
        return probe.load_probe(path)
    result = probe.probe_model(load(), captions, key.trigger, key.placement, n=n, seed=seed,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    probe.save_probe(result, path)
    return result


def captioning_corpus(release: Release, dataset: str | Path, size: int, limit: int | None = None):
    """(images, captions) an infringer's retrieval captioner learns from, none of them released: another emoji
    split for the emoji, the held-out images for the owner's own data."""
    if str(dataset) == EMOJI:
        images, captions, _ = emoji.emoji_dataset("pretrain", size=size, limit=limit)
        return images, captions
    return images_at(release.held_out, size, limit)


@dataclass
class Lab:
    """The lab's three models (``base`` and the fine-tunes ``protected`` and ``clean``), as notebooks 02-05 use them:
    trained and sampled here (full mode), or read from a class pack (class mode, ``classroom``). Both modes answer
    the same calls, so a notebook has one code path."""

    runs: Path
    config: object  # presets.TrainConfig
    base: object  # the base pipeline
    weights: dict[str, Path] | None = None  # full mode: each fine-tune's folder
    pack: object | None = None  # class mode: a classroom.ClassPack checked against this run

    @property
    def recorded(self) -> bool:
        return self.pack is not None

    def losses(self) -> dict[str, list[float]]:
        return self.pack.losses() if self.recorded else {n: checkpoints.saved_losses(f) for n, f in self.weights.items()}

    def train_seconds(self) -> dict[str, float | None]:
        return self.pack.train_seconds() if self.recorded else {n: saved_seconds(f) for n, f in self.weights.items()}

    def pipeline(self, name: str):
        """``name``'s pipeline (the base, or the base with a fine-tune's weights); there are none in class mode."""
        if self.recorded:
            raise ValueError(f"class mode holds {name!r}'s recorded answers, not its weights: run in full mode "
                             "(ENTRUTH_CLASS=0) to load it")
        return self.base if name == "base" else load_finetuned(load_pipeline(self.config.model), self.weights[name])

    def _model_name(self, name: str) -> str:
        return f"base-{Path(str(self.config.model)).name}" if name == "base" else Path(self.weights[name]).name

    def probes(self, key, captions, n: int, seed: int = 1, num_inference_steps: int = 25,
               guidance_scale: float = 3.0, names: Sequence[str] = ("base", "protected", "clean")) -> dict:
        """Each model's answers to ``n`` probe queries with ``key``'s trigger (``cached_probe``: stored under
        ``runs/probes`` and generated only on a miss; recorded in class mode)."""
        if self.recorded:
            return {name: self.pack.probe(name, captions, key.trigger, key.placement, n, seed, num_inference_steps,
                                          guidance_scale) for name in names}
        return {name: cached_probe(self.runs, self._model_name(name), lambda name=name: self.pipeline(name), key, captions,
                             n, seed, num_inference_steps, guidance_scale) for name in names}

    def samples(self, name: str, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 25,
                guidance_scale: float = 3.0) -> list:
        """``name``'s images for these prompts and seeds (generated now in full mode, recorded in class mode)."""
        if self.recorded:
            return self.pack.samples(name, prompts, seeds, num_inference_steps, guidance_scale)
        return probe.generate(self.pipeline(name), prompts, seeds, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale)

    def audit_pipeline(self, name: str):
        """The pipeline an audit of ``name``'s stored answers needs for the owner's side (its VAE draws the plain
        images as the model would; fine-tuning never changes the VAE, so in class mode it is the base's)."""
        return self.base if self.recorded else self.pipeline(name)

    def model_info(self, name: str) -> dict:
        """The audited model as a report names it (in class mode: the pack's recording, with the weights'
        settings)."""
        if self.recorded:
            recording = self.pack.folder / "probes" / f"{name}.npz"
            return dict(model=str(self.config.model), weights=f"none (class mode): the answers recorded in {recording}",
                        train_fingerprint=self.pack.record["settings"]["train_fingerprint"])
        return record.model_info(self.config.model, None if name == "base" else self.weights[name])

    def answer(self, name: str, sheet: Sequence[dict], folder: str | Path) -> Path:
        """Stand in for ``name`` as a generation service answering a prompt sheet (class mode: its recorded
        answers to the same prompts and seeds)."""
        if not self.recorded:
            return probe.answer_prompt_sheet(self.pipeline(name), sheet, folder)
        return self.pack.answer(name, sheet, folder)


def lab(runs: str | Path, release: Release, config, base, recorded: bool = False,
        pack_folder: str | Path | None = None) -> Lab:
    """The lab's models for this release and these settings: fine-tuned here (or reused: ``finetuned``), or, with
    ``recorded``, the class pack's (``classroom.load_pack``), refused if it was recorded for other settings."""
    if recorded:
        key = keys.load_key(release.key)
        pack = classroom.load_pack(pack_folder or classroom.PACK_DIR).check(config, key)
        return Lab(Path(runs), config, base, pack=pack)
    return Lab(Path(runs), config, base, weights=finetuned(runs, release, config, pipe=base))


def _side_by_side_worker(index: int, data: str, out: str, config: TrainConfig, threads: int, events) -> None:
    """One run of ``finetune_side_by_side``, in its own process: steps and the result (or the error) go back on
    ``events``; its own progress bars stay quiet (the parent draws one for all runs)."""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (a child's bars and warnings would land in the server log)
    torch.set_num_threads(threads)
    try:
        result = train.finetune(data, out, config, overwrite=True, resume="latest", progress=False, device="cpu",
                          on_step=lambda step, loss: events.put(("step", index, step)))
        events.put(("done", index, result))
    except BaseException as error:  # noqa: BLE001 (reported to the parent, which raises it)
        events.put(("error", index, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def finetune_side_by_side(jobs: list[tuple[str | os.PathLike, str | os.PathLike]], config: TrainConfig,
                          progress: bool = True) -> list[TrainResult | None]:
    """``ensure_finetuned`` for several ``(data, out)`` runs at once on the CPU, one process each with an equal
    share of the cores: a small model keeps two cores only partly busy in one process, so two runs side by side
    finish sooner than one after the other (``benchmarks/train_speed.py``). Finished runs are reused (None), an
    interrupted one resumes from its checkpoint; a run that fails stops the others and raises its error."""
    results: list[TrainResult | None] = [None] * len(jobs)
    todo = [i for i, (data, out) in enumerate(jobs) if not checkpoints.is_current(out, config, data)]
    if not todo:
        return results
    context = multiprocessing.get_context("spawn")  # a forked child would inherit the parent's thread pools
    events = context.Queue()
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)  # a cap set for this process holds for them
    threads = max(1, cores // len(todo))
    workers = {i: context.Process(target=_side_by_side_worker, daemon=True,
                                  args=(i, str(jobs[i][0]), str(jobs[i][1]), config, threads, events))
               for i in todo}
    steps_done = dict.fromkeys(todo, 0)
    bar = tqdm(total=config.steps * len(todo), desc=f"fine-tuning {len(todo)} runs side by side ({config.method})",
               disable=not progress, mininterval=2)
    try:
        for worker in workers.values():
            worker.start()
        pending = set(todo)
        while pending:
            try:
                kind, i, payload = events.get(timeout=5)
            except queue.Empty:
                for i in pending:
                    if not workers[i].is_alive():
                        raise RuntimeError(f"the fine-tune into {jobs[i][1]} stopped without a result (exit code "
                                           f"{workers[i].exitcode}); rerun to resume it from its last checkpoint")
                continue
            if kind == "step":
                bar.update(payload - steps_done[i])
                steps_done[i] = payload
            elif kind == "done":
                results[i] = payload
                pending.discard(i)
            else:
                raise RuntimeError(f"the fine-tune into {jobs[i][1]} failed:\n{payload}")
    finally:
        bar.close()
        for worker in workers.values():  # on an error or an interrupt: no run keeps training unseen
            if worker.is_alive():
                worker.terminate()
            worker.join()
        events.close()
        events.join_thread()
    return results


def record_lab(lab, key, captions: Sequence[str], quality_captions: Sequence[str], out: str | os.PathLike,
               queries: int = 64, sample_steps: int = 25, quality_samples: int = 128, guidance_scale: float = 3.0,
               seed: int = 0) -> classroom.ClassPack:
    """Record a full-mode ``Lab`` as a pack: the three models' answers to ``queries`` probe queries on
    ``captions`` (probe seed 1, as the notebooks send them), both fine-tunes' samples of ``quality_samples`` of
    ``quality_captions`` (``quality.quality_prompts``), their loss curves and training times."""
    if lab.recorded:
        raise ValueError("record a lab that holds models (full mode), not a recorded one")
    probes = lab.probes(key, captions, n=queries, num_inference_steps=sample_steps, guidance_scale=guidance_scale)
    prompts, seeds = quality.quality_prompts(quality_captions, quality_samples, seed)
    samples = {name: (prompts, seeds, lab.samples(name, prompts, seeds, sample_steps, guidance_scale))
               for name in classroom.FINETUNES}
    seconds = lab.train_seconds()
    if any(v is None for v in seconds.values()):
        raise ValueError(f"training times unknown for {[k for k, v in seconds.items() if v is None]} (resumed, or "
                         f"trained before times were kept): delete their folders under {lab.runs / 'models'} and "
                         "record again")
    return classroom.write_pack(out, lab.config, key, lab.losses(), seconds, probes,
                      classroom.sampler_settings(queries, 1, sample_steps, guidance_scale), samples,
                      classroom.sampler_settings(num_inference_steps=sample_steps, guidance_scale=guidance_scale))


def record_class(runs: str | os.PathLike = "runs", out: str | os.PathLike = classroom.PACK_DIR,
                 settings: LabSettings = LAB) -> classroom.ClassPack:
    """Record the pack at the lab's settings (``LAB``, which the notebooks' parameter cells read too): fine-tune
    both models (or reuse a full run's under ``runs``), probe the three models with notebook 03's queries and sample
    notebook 05's quality prompts. A class-mode run of the notebooks refuses the pack if a setting changed since."""
    files.check_replaceable(Path(out), (files.MARKER, classroom.PACK_FILE))  # before the recording, not after
    config = presets.notebook_preset(settings.preset, None, settings.steps, settings.seed)
    base = models.load_pipeline(config.model)
    folders = release(runs, rate=settings.rate, template=settings.template, seed=settings.seed,
                      size=models.default_resolution(base))
    owner_captions = list(data.load_imagefolder(folders.owner).captions)  # notebook 05's, as images_at gives them
    return record_lab(lab(runs, folders, config, base), keys.load_key(folders.key, release=folders.protected),
                      held_out_captions(folders), owner_captions, out, settings.queries, settings.sample_steps,
                      settings.quality_samples, seed=settings.seed)
