"""Class mode: the lab in class time, on the demo's models as recorded once.

Fine-tuning is most of a full run (notebook 02 trains two models). A *class pack* stores what the lab needs from
the demo's three models (``base``, the ``clean`` fine-tune and the ``protected`` one) at the notebooks' default
settings: each fine-tune's loss curve and training time, each model's answers to the probe queries and its samples
for notebook 05's image quality. With ``ENTRUTH_CLASS=1`` the notebooks read these instead of training and sampling;
everything the owner computes from the answers (scores, decoys, p-values, the report) still runs in front of the
class. A pack serves only the settings it was recorded with (the key's template, trigger and files; the training
settings' fingerprint; the sampler) and names the setting that differs otherwise. ``entruth-lite notebooks
record-class`` records it again after the defaults change.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..core import files
from ..core.models import REPO_ROOT
from ..owner import probe

PACK_DIR = REPO_ROOT / "data" / "class"
PACK_FILE = "pack.json"
MODELS = ("base", "clean", "protected")
FINETUNES = ("protected", "clean")


def pack_settings(config, key) -> dict:
    """What a pack must agree on with a run to stand in for its models: the fine-tunes' settings and the key."""
    return dict(model=Path(str(config.model)).name, train_fingerprint=config.fingerprint(), template=key.template.name,
                trigger=key.trigger, placement=key.placement, files=sorted(key.files), n_images=key.n_images)


def sampler_settings(n: int | None = None, seed: int | None = None, num_inference_steps: int = 25,
                     guidance_scale: float = 3.0) -> dict:
    """How a pack's images were drawn (queries and probe seed where they apply), as ``pack.json`` stores it."""
    return {k: v for k, v in dict(n=n, seed=seed, num_inference_steps=num_inference_steps,
                                  guidance_scale=float(guidance_scale)).items() if v is not None}


@dataclass
class ClassPack:
    folder: Path
    record: dict  # pack.json: settings, probe and sample settings, losses and training seconds per fine-tune

    def check(self, config, key) -> "ClassPack":
        """This pack, if it was recorded for these training settings and this key; else a ValueError naming the
        first setting that differs."""
        for name, value in pack_settings(config, key).items():
            recorded = self.record["settings"].get(name)
            if recorded != value:
                same_count = name == "files" and isinstance(recorded, list) and len(recorded) == len(value)
                raise ValueError(f"the class pack in {self.folder} was recorded with {name} = {_shown(name, recorded)}, "
                                 f"this run has {_shown(name, value)}{' (other files)' if same_count else ''}: run in "
                                 "full mode (ENTRUTH_CLASS=0) or record a pack for these settings "
                                 "(entruth-lite notebooks record-class)")
        return self

    def losses(self) -> dict[str, list[float]]:
        return {name: list(self.record["losses"][name]) for name in FINETUNES}

    def train_seconds(self) -> dict[str, float]:
        return {name: float(self.record["train_seconds"][name]) for name in FINETUNES}

    def probe(self, name: str, captions: Sequence[str], trigger: str, placement: str, n: int, seed: int = 1,
              num_inference_steps: int = 25, guidance_scale: float = 3.0) -> probe.ProbeResult:
        """``name``'s recorded answers to these queries: the first ``n`` recorded ones, refused unless they are
        exactly the queries asked (prompts, seeds and sampler)."""
        _check_model(name)
        asked = sampler_settings(seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        recorded = {k: v for k, v in self.record["probe"].items() if k != "n"}
        if asked != recorded or n > self.record["probe"]["n"]:
            raise ValueError(f"the class pack recorded {self.record['probe']} for its probes; asked for n={n} with "
                             f"{asked}: run in full mode (ENTRUTH_CLASS=0) for other queries")
        stored = self.stored_probe(name)
        plain, triggered, seeds = probe.probe_prompts(captions, trigger, placement, n, seed)
        if (stored.captions[:n], stored.trigger_prompts[:n], stored.seeds[:n]) != (plain, triggered, seeds):
            raise ValueError(f"the class pack's probe of {name!r} holds other prompts than these {n} queries "
                             "(other held-out captions?): run in full mode (ENTRUTH_CLASS=0)")
        return probe.ProbeResult(plain, triggered, seeds, stored.trigger_images[:n], stored.control_images[:n])

    def stored_probe(self, name: str) -> probe.ProbeResult:
        """Every recorded answer of ``name`` (``probe`` checks and slices them for given queries)."""
        _check_model(name)
        return probe.load_probe(self.folder / "probes" / f"{name}.npz")

    def answer(self, name: str, sheet: Sequence[dict], folder: str | os.PathLike) -> Path:
        """``name``'s recorded answers to a prompt sheet's rows, saved under the sheet's file names (refused when the
        sheet asks other sampler settings or queries the pack does not hold)."""
        recorded = self.record["probe"]
        if any((row["steps"], float(row["guidance_scale"])) !=
               (recorded["num_inference_steps"], recorded["guidance_scale"]) for row in sheet):
            raise ValueError(f"the class pack's answers were drawn with {recorded}: the sheet asks other sampler "
                             "settings; run in full mode (ENTRUTH_CLASS=0)")
        return probe.answer_from_probe(self.stored_probe(name), sheet, folder)

    def samples(self, name: str, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 25,
                guidance_scale: float = 3.0) -> list[Image.Image]:
        """``name``'s recorded samples for these (prompt, seed) pairs, refused if any pair was not recorded."""
        if name not in FINETUNES:
            raise ValueError(f"the class pack holds samples of {FINETUNES}, not {name!r}")
        asked = sampler_settings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        if asked != self.record["samples"]:
            raise ValueError(f"the class pack's samples were drawn with {self.record['samples']}, asked for {asked}")
        with np.load(self.folder / "samples" / f"{name}.npz", allow_pickle=False) as stored:
            index = {(str(p), int(s)): i for i, (p, s) in enumerate(zip(stored["prompts"], stored["seeds"]))}
            missing = [(p, s) for p, s in zip(prompts, seeds) if (p, int(s)) not in index]
            if missing:
                raise ValueError(f"the class pack holds no sample of {name!r} for {len(missing)} of the "
                                 f"{len(prompts)} prompts asked (first: {missing[0]}): ask for fewer or run in full mode")
            return [Image.fromarray(stored["images"][index[(p, int(s))]]) for p, s in zip(prompts, seeds)]


def _shown(name: str, value) -> str:
    return f"{len(value)} templated files" if name == "files" and isinstance(value, list) else repr(value)


def _check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"the class pack holds models {MODELS}, not {name!r}")


def load_pack(folder: str | os.PathLike = PACK_DIR) -> ClassPack:
    folder = Path(folder)
    if not (folder / PACK_FILE).is_file():
        raise FileNotFoundError(f"no class pack in {folder} ({PACK_FILE} missing): record one with "
                                "`entruth-lite notebooks record-class` after a full run, or run in full mode")
    return ClassPack(folder, json.loads((folder / PACK_FILE).read_text()))


def write_pack(out: str | os.PathLike, config, key, losses: dict[str, list[float]], train_seconds: dict[str, float],
               probes: dict[str, probe.ProbeResult], probe_sampler: dict,
               samples: dict[str, tuple[Sequence[str], Sequence[int], Sequence[Image.Image]]],
               sample_sampler: dict) -> ClassPack:
    """Write a pack to ``out`` (replacing the one there, whole or not at all): ``probes`` of every model in ``MODELS``; samples, losses
    and seconds of both fine-tunes, and the settings they were made with (``probe_sampler``: seed, n and
    the sampler; ``sample_sampler``: the sampler)."""
    for what, have, need in (("probes", probes, MODELS), ("samples", samples, FINETUNES), ("losses", losses, FINETUNES),
                             ("train_seconds", train_seconds, FINETUNES)):
        if set(have) != set(need):
            raise ValueError(f"a class pack needs {what} of {sorted(need)}, got {sorted(have)}")
    out = Path(out)
    record = dict(settings=pack_settings(config, key), probe=probe_sampler, samples=sample_sampler,
                  losses={k: [round(float(v), 5) for v in losses[k]] for k in FINETUNES},
                  train_seconds={k: round(float(train_seconds[k]), 1) for k in FINETUNES})
    # a pack is replaced whole: never new answers under old settings
    tmp = files.atomic_folder(out, overwrite=True, ours=(files.MARKER, PACK_FILE))
    try:
        for name in MODELS:
            probe.save_probe(probes[name], tmp / "probes" / f"{name}.npz")
        (tmp / "samples").mkdir()
        for name in FINETUNES:
            prompts, seeds, images = samples[name]
            np.savez_compressed(tmp / "samples" / f"{name}.npz", prompts=np.asarray(list(prompts), dtype=str),
                                seeds=np.asarray(list(seeds), dtype=np.int64),
                                images=np.stack([np.asarray(probe.to_rgb(i)) for i in images]))
        (tmp / PACK_FILE).write_text(json.dumps(record) + "\n")
        files.commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ClassPack(out, record)


