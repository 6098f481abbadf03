"""The lab the notebooks share: its settings, its models (fine-tuned once under ``runs/``, or read from a class
pack) and their answers to probe queries, so that each notebook can run on its own (it reuses what an earlier
notebook wrote when the settings match). Its data, the owner's dataset and release, is ``lab_data``'s."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..core import data, files, models
from ..core.families import DEFAULT_FAMILY
from ..core.models import load_finetuned, load_pipeline
from ..core.progress import tqdm
from ..evaluation import quality
from ..infringer import checkpoints, presets, train
from ..infringer.presets import TrainConfig
from ..infringer.train import TrainResult
from ..owner import keys, probe, record, verify
from . import classroom
from .lab_data import (  # noqa: F401  the notebooks' demo.release, demo.held_out_captions, ...
    EMOJI,
    MIN_HELD_OUT,
    Release,
    captioning_corpus,
    dataset_tag,
    held_out_captions,
    images_at,
    release,
    release_folders,
    split_held_out,
)

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
    release_images: int | None = None  # images of the owner's data the release holds (None: all of them)

    def for_preset(self, preset: str) -> "LabSettings":
        """The lab at another preset: its own number of steps, and the release a GPU preset is sized for
        (``GPU_LABS``)."""
        if preset == self.preset:
            return self
        presets.preset(preset)  # a clear error for an unknown name
        return replace(self, preset=preset, steps=None, **GPU_LABS.get(preset, {}))


LAB = LabSettings()
# The release a GPU preset is sized for, where the whole dataset would get too few passes in the card's session:
# colab-t4 (1,500 steps of 4 images per fine-tune, the lab's two in about an hour of a free T4:
# benchmarks/gpu_estimates.py) shows 125 images 48 times each, as often as tiny-cpu shows the 1,005 emoji, and
# 8 % of them are as many templated images (10) as the CPU lab's 1 %
GPU_LABS: dict[str, dict] = {"colab-t4": dict(rate=0.08, release_images=125)}


def measured_power_note(table, rate: float, template: str, steps: int = LAB.steps) -> str:
    """``verify.measured_power`` for the lab's run, saying what sets it apart from the benchmark's fine-tunes (the
    tiny preset's steps, on members of the default family)."""
    measured_steps = presets.PRESETS["tiny-cpu"]["steps"]
    caveats = [f"the benchmark trained {measured_steps:,} steps, this lab {steps:,}: expect fewer"] if steps < measured_steps else []
    if not template.startswith(f"{DEFAULT_FAMILY}:"):
        caveats.append(f"it measured {DEFAULT_FAMILY} members, not {template!r}")
    note = verify.measured_power(table, rate)
    return note + (f" ({'; '.join(caveats)})" if caveats else "")


def training_size(config: TrainConfig, pipe) -> int:
    """The side in px the lab trains, probes and audits at: the preset's resolution, or the model's own."""
    return config.resolution or models.default_resolution(pipe)


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
                 guidance_scale: float = 3.0, resolution: int | None = None):
    """The probe of a model (``model``: its name under ``runs/models``, e.g. a ``finetuned`` folder's, or
    ``"base-tiny"``) with ``key``'s trigger on ``captions``, at ``resolution`` px (None: the model's own): generated
    once, stored under ``runs/probes`` and read back by any notebook that asks for the same queries (``load()`` is
    called only when it must generate)."""
    settings = dict(trigger=key.trigger, placement=key.placement, captions=list(captions), n=n, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    if resolution is not None:  # probes stored before the setting existed keep their names
        settings["resolution"] = resolution
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(runs) / "probes" / f"{Path(str(model)).name}-{digest}.npz"
    if path.is_file():
        return probe.load_probe(path)
    result = probe.probe_model(load(), captions, key.trigger, key.placement, n=n, seed=seed,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               resolution=resolution)
    probe.save_probe(result, path)
    return result


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
                                   n, seed, num_inference_steps, guidance_scale, self.config.resolution)
                for name in names}

    def samples(self, name: str, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 25,
                guidance_scale: float = 3.0) -> list:
        """``name``'s images for these prompts and seeds (generated now in full mode, recorded in class mode)."""
        if self.recorded:
            return self.pack.samples(name, prompts, seeds, num_inference_steps, guidance_scale)
        return probe.generate(self.pipeline(name), prompts, seeds, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, resolution=self.config.resolution)

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
                      size=training_size(config, base), images=settings.release_images)
    owner_captions = list(data.load_imagefolder(folders.owner).captions)  # notebook 05's, as images_at gives them
    return record_lab(lab(runs, folders, config, base), keys.load_key(folders.key, release=folders.protected),
                      held_out_captions(folders), owner_captions, out, settings.queries, settings.sample_steps,
                      settings.quality_samples, seed=settings.seed)
