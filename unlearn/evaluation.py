"""Measure a policy's patches: base versus patched samples for every concept, judged on
ConceptWorld, with PNG grids a reviewer can look at.

For each concept and model in scope:

- *erased*: the share of samples of the target prompt, two paraphrases and one misspelling in
  which the judge still finds the concept (the attributes by which target and anchor differ);
- *anchor*: the share of target-prompt samples that show the anchor instead;
- *preserved*: for each preserve prompt, the judge accuracy (all attributes the prompt names
  found) on the base and on the patched model;
- *unrelated*: the same for a fixed set of prompts that name none of the policy's concepts.

Only the bundled ConceptWorld models have a judge; other models get the grids alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

UNRELATED_PROMPTS = (
    "a red square on a plain background",
    "an orange triangle on dots",
    "a blue diamond on a checkerboard",
    "a yellow circle on dots",
    "mordak on a checkerboard",
    "a purple cross on a plain background",
)


def misspell(text: str) -> str:
    """A deterministic misspelling: the longest word loses its second-to-last letter."""
    words = text.split()
    i = max(range(len(words)), key=lambda k: len(words[k]))
    w = words[i]
    if len(w) >= 4:
        words[i] = w[:-2] + w[-1]
    return " ".join(words)


def concept_attributes(concept) -> tuple[dict, dict]:
    """(signature, anchor): the attributes that say the target is there, and those that say
    the anchor is. Read from the prompts with ConceptWorld's vocabulary."""
    from conceptworld.world import parse_prompt

    target = parse_prompt(concept.target.text)
    anchor = parse_prompt(concept.anchor)
    signature = {k: v for k, v in target.items() if anchor.get(k) != v}
    anchor_sig = dict(anchor)
    for k in signature:
        if k == "instance" and k not in anchor_sig:
            anchor_sig["instance"] = "none"
    return signature, anchor_sig


def names_removed(prompt: str, concepts: Sequence) -> str | None:
    """The id of a policy concept that ``prompt`` asks for, if any: such a prompt is expected to
    change, so it measures neither preservation nor collateral damage."""
    from conceptworld.world import parse_prompt

    attrs = parse_prompt(prompt)
    for concept in concepts:
        signature, _ = concept_attributes(concept)
        if signature and all(attrs.get(k) == v for k, v in signature.items()):
            return concept.id
    return None


def paraphrases(concept, n: int = 2, seed: int = 0) -> list[str]:
    """Prompts for the concept written with the world's held-out caption templates."""
    from conceptworld import world

    attrs = world.parse_prompt(concept.target.text)
    rng = np.random.default_rng(seed)
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < 50:
        tries += 1
        text = world.caption(
            rng,
            attrs.get("shape") if "instance" not in attrs else None,
            attrs.get("color") if "instance" not in attrs else None,
            attrs.get("background") or str(rng.choice(world.BACKGROUNDS)),
            attrs.get("instance", "none"),
            held_out_templates=True,
        )
        if text not in out and text != concept.target.text:
            out.append(text)
    return out


def judge_rows(images: np.ndarray) -> list[dict]:
    """The judge's reading of each image (attribute -> (value, confidence))."""
    import conceptworld

    return conceptworld.judge(images)


def judge_rate(rows: Sequence[Mapping], attrs: Mapping[str, str]) -> float:
    """Share of judged images (``judge_rows``) that show every attribute of ``attrs``."""
    if not attrs or not rows:
        return float("nan")
    return float(np.mean([all(r[k][0] == v for k, v in attrs.items() if k in r) for r in rows]))


def judge_hits(images: np.ndarray, attrs: Mapping[str, str]) -> float:
    """Share of images in which the judge finds every attribute of ``attrs``."""
    if not attrs:
        return float("nan")
    return judge_rate(judge_rows(images), attrs)


def _images(pipe, prompt: str, n: int, seed: int, steps: int, guidance: float) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    if hasattr(pipe, "motion_adapter"):
        frames = np.asarray(pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").frames)
        return frames.reshape(-1, *frames.shape[2:])  # judge every frame
    return pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").images


def evaluate_policy(
    policy,
    models: Mapping[str, object],
    stacks: Mapping[str, object],
    built: Sequence,
    *,
    samples: int = 64,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    out_dir: Path | None = None,
    judged: bool = True,
    video_clips: int | None = None,
    unrelated_models: Sequence[str] | None = None,
) -> dict:
    """Compare base and patched samples. ``stacks`` hold the applied patches; they are removed
    and re-applied around the base samples, so the models end patched as they started.

    ``samples`` images per prompt; a video model generates ``video_clips`` clips per prompt
    instead (default: ``samples``) and every frame is judged. ``unrelated_models``: the models
    on which the unrelated prompts are measured (default: every model)."""
    from .engine import SCOPE_MODELS

    concepts = list(policy.spec.concepts)
    report: dict = {"policy": policy.metadata.name, "version": policy.metadata.version, "samples": samples, "video_clips": video_clips or samples, "concepts": {}, "unrelated": {}}

    def sample_both(key: str, prompt: str, s: int) -> tuple[np.ndarray, np.ndarray]:
        pipe, stack = models[key], stacks[key]
        n = (video_clips or samples) if hasattr(pipe, "motion_adapter") else samples
        applied = list(stack.applied)
        stack.remove_all()
        base = _images(pipe, prompt, n, s, steps, guidance)
        stack.apply_all(applied)
        return base, _images(pipe, prompt, n, s, steps, guidance)

    grids: list[tuple[str, np.ndarray, np.ndarray]] = []
    for ci, concept in enumerate(concepts):
        signature, anchor_sig = concept_attributes(concept) if judged else ({}, {})
        prompts = {"target": concept.target.text}
        for i, p in enumerate(paraphrases(concept, 2, seed + ci) if judged else concept.target.phrasings[:2]):
            prompts[f"paraphrase_{i + 1}"] = p
        prompts["misspelling"] = misspell(concept.target.text)
        entry: dict = {"signature": signature, "anchor_attributes": anchor_sig, "method": concept.method.name, "models": {}}
        for key in SCOPE_MODELS[concept.scope]:
            if key not in models:
                continue
            res: dict = {"prompts": {}, "preserve": {}}
            for j, (label, prompt) in enumerate(prompts.items()):
                base, patched = sample_both(key, prompt, seed + 1000 * ci + j)
                row = {"prompt": prompt}
                if judged:
                    row.update(
                        base_target=judge_hits(base, signature),
                        patched_target=judge_hits(patched, signature),
                        patched_anchor=judge_hits(patched, anchor_sig),
                    )
                res["prompts"][label] = row
                grids.append((f"{concept.id}/{key}/{label}", base, patched))
            for j, prompt in enumerate(concept.preserve):
                removed = names_removed(prompt, concepts) if judged else None
                if removed:
                    res.setdefault("preserve_skipped", {})[prompt] = f"names the removed concept {removed!r}"
                    continue
                base, patched = sample_both(key, prompt, seed + 1000 * ci + 100 + j)
                if judged:
                    from conceptworld.world import parse_prompt

                    attrs = parse_prompt(prompt)
                    res["preserve"][prompt] = {"base": judge_hits(base, attrs), "patched": judge_hits(patched, attrs)}
                grids.append((f"{concept.id}/{key}/preserve", base, patched))
            if judged:
                rows = res["prompts"].values()
                res["erased_max"] = max(r["patched_target"] for r in rows)
                # "before" is read on the prompts the base model answers by design; a misspelling
                # counts for "after" (it must not bring the concept back) and is reported as is
                res["base_target_min"] = min(r["base_target"] for k, r in res["prompts"].items() if k != "misspelling")
                res["base_misspelling"] = res["prompts"]["misspelling"]["base_target"]
                res["anchor_on_target"] = res["prompts"]["target"]["patched_anchor"]
                drops = [v["base"] - v["patched"] for v in res["preserve"].values()]
                res["preserve_max_drop"] = max(drops) if drops else 0.0
            entry["models"][key] = res
        report["concepts"][concept.id] = entry
    if judged:
        from conceptworld.world import parse_prompt

        for key in models if unrelated_models is None else [k for k in models if k in unrelated_models]:
            drops = {}
            for j, prompt in enumerate(UNRELATED_PROMPTS):
                if names_removed(prompt, concepts):
                    continue
                base, patched = sample_both(key, prompt, seed + 50_000 + j)
                attrs = parse_prompt(prompt)
                drops[prompt] = {"base": judge_hits(base, attrs), "patched": judge_hits(patched, attrs)}
            report["unrelated"][key] = {"prompts": drops, "max_drop": max(v["base"] - v["patched"] for v in drops.values())}
    report["patches"] = [
        {"patch_id": b.patch.patch_id, "method": b.job.method, "concepts": [c.id for c in b.job.concepts], "built_on": b.job.model, "applied_to": b.job.applies_to, "built": b.built, "seconds": round(b.seconds, 2)}
        for b in built
    ]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        write_grids(grids, out_dir)
    return report


def write_grids(grids: Sequence[tuple[str, np.ndarray, np.ndarray]], out_dir: Path, cols: int = 8) -> None:
    """One PNG per concept and model: rows of base samples above rows of patched samples."""
    from PIL import Image

    by_file: dict[str, list[np.ndarray]] = {}
    for label, base, patched in grids:
        name = "_".join(label.split("/")[:2]) + ".png"
        k = min(cols, len(base))
        sep = np.ones((2, k * base.shape[2], 3), np.float32)
        by_file.setdefault(name, []).extend([np.concatenate(list(base[:k]), 1), np.concatenate(list(patched[:k]), 1), sep])
    for name, rows in by_file.items():
        img = (np.concatenate(rows, 0) * 255).round().astype(np.uint8)
        Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(out_dir / name)
