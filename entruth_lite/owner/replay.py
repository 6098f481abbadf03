"""Rerunning an audit from its record (``AuditResult.to_json``, embedded in every report): the same prompts and
seeds on the recorded model give the same images and p-values on the same device and dtype."""

from __future__ import annotations

import os
from dataclasses import replace

from ..core.template_io import resolve_template
from . import probe
from .audit import AuditConfig, AuditResult, evaluate
from .record import base_dir, environment, file_hashes, load_suspect

REPLAYABLE = ("decoy", "paired")  # tests that need nothing but the record and the model


def replay(record: dict, model: str | None = None, weights: str | os.PathLike | None = None, device: str = "cpu",
           progress: bool = True) -> AuditResult:
    """Rerun an audit from its JSON record (``AuditResult.to_json``): load the recorded model (``model`` /
    ``weights`` point to copies on this machine; every recorded file hash must match), regenerate each query from
    its prompt and seed with the recorded sampler settings, rebuild the template and its decoys from the record,
    and rerun the tests that need nothing the record lacks (decoy, paired; the others need the owner's plain images).
    Same device and dtype give the same images and p-values."""
    if "images" in record["model"] and model is None:
        raise ValueError("this record audits a folder of saved images (a black-box audit), not a model: rerun "
                         "`entruth-lite audit --images` on its images, whose hashes it records")
    model = model or record["model"]["model"]
    weights = weights if weights is not None else record["model"].get("weights")
    for label, recorded, folder in (("base model", record["model"].get("base_files") or {}, base_dir(model)),
                                    ("suspect weights", record["model"].get("weight_files") or {}, weights)):
        found = file_hashes(folder)
        changed = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
        if changed:
            raise ValueError(f"the {label} at {folder} are not the audited ones: {len(changed)} file(s) differ from "
                             f"the record (e.g. {changed[0]!r})")
    key = record["key"] | {"commitment": "not checked in this replay (the recorded audit: "
                                         f"{record['key'].get('commitment', 'not recorded')})"}
    template = resolve_template(key["template"], tuple(key["template_size"]))
    fields = {f: v for f, v in record["config"].items() if f != "methods"}
    fields.setdefault("stop_after", fields.get("decoys", 9999) + 1)  # a record older than the sequential rule: fixed K
    config = replace(AuditConfig(**fields), methods=tuple(m for m in record["config"]["methods"] if m in REPLAYABLE))
    queries = record["queries"]
    pipe = load_suspect(model, weights, device=device, config=record["model"].get("config"))
    probed = probe.probe_model(pipe, [q["caption"] for q in queries], key["trigger"], key["placement"], n=len(queries),
                         seed=config.probe_seed, num_inference_steps=config.num_inference_steps,
                         guidance_scale=config.guidance_scale, resolution=record["environment"].get("resolution"),
                         progress=progress)
    if probed.seeds != [q["seed"] for q in queries] or probed.trigger_prompts != [q["trigger_prompt"] for q in queries]:
        raise ValueError("the record's queries are not the ones its settings give: it was edited or made otherwise")
    verdicts, evidence = evaluate(probed, template, config, salt=key["key_sha256"], progress=progress)
    notes = [f"replay of a recorded audit: {', '.join(config.methods)} rerun on {device}"]
    return AuditResult(verdicts, evidence, probed, config, key, record["model"], None, notes,
                       environment(pipe) | {"resolution": probed.trigger_images[0].width})
