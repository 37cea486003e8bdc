"""Efficacy of every unlearning method on ConceptWorld, judged by its judge.

    python bench/efficacy.py [--samples 64] [--out runs/efficacy] [--methods ablation,...]

For each method, one policy per concept removes an instance (zorblax -> a green circle), two
styles (stripes, dots -> a plain background) and an object (star -> a circle); ``closed_form``
also runs one edit that removes five concepts at once. Prints a table and writes ``efficacy.json``.

Bars (from the engine issue), per concept:
  erased     target found in <= 10% of samples of its prompt, two paraphrases and a misspelling
             (from >= 90% before);
  anchor     (ablation) the anchor shows in >= 80% of target-prompt samples;
  preserved  every preserve prompt loses <= 5 points of judge accuracy; unrelated prompts <= 2;
  video      the text_encoder patch, learnt on images, applied to the video model: target in
             <= 10% of frames, preserved video prompts lose <= 5 points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies import load_policy_text  # noqa: E402

# Settings for the ConceptWorld models (tiny, trained from scratch at lr 5e-4): the papers'
# SD defaults (lr 2e-6) would not move them. Each is what the demo policy uses.
METHOD_SETTINGS = {
    "ablation": "{name: ablation, parameters: cross_attn_kv, steps: 100, learning_rate: 0.001, batch_size: 8, anchor_images: 64, regularization_weight: 1.0, text_space_weight: 0.0005}",
    "forget_me_not": "{name: forget_me_not, parameters: embedding, following_tokens: true, attention_loss: mass, steps: 400, learning_rate: 0.02, reference_images: 10, typo_variants: true}",
    "text_encoder": "{name: text_encoder, steps: 100, learning_rate: 0.0003, images: 8}",
    "closed_form": "{name: closed_form, preserve_weight: 0.5, erase_weight: 16.0, preserve_vocabulary: 512, typo_variants: true}",
}

CONCEPTS = {
    "zorblax": ("instance", "zorblax", ["the zorblax", "a picture of zorblax"], "a green circle", ["a green circle", "quibbit", "a green square", "mordak"]),
    "stripes": ("style", "stripes", ["a striped background", "stripy background", "diagonal lines"], "a plain background", ["a red square on dots", "a blue circle on a checkerboard", "a yellow cross on a plain background"]),
    "star": ("object", "a star", ["a pentagram", "a starfish shape"], "a circle", ["a diamond", "a red cross", "a green circle"]),
    "mordak": ("instance", "mordak", ["the mordak"], "a blue square", ["a blue square", "zorblax", "a blue diamond"]),
    "dots": ("style", "dots", ["polka dots", "a dotted background", "spotted background"], "a plain background", ["a red square on stripes", "an orange star on a checkerboard"]),
    # further concepts of each category, for ``--concepts`` and ``--multi-concepts``
    "checker": ("style", "a checkerboard", ["checks", "a checkered background", "chequered background"], "a plain background", ["a red square on dots", "a blue circle on stripes", "a yellow cross on a plain background"]),
    "cross": ("object", "a cross", ["a plus sign", "a plus shape"], "a circle", ["a square", "a red triangle", "a green circle"]),
    "diamond": ("object", "a diamond", ["a rhombus", "a lozenge"], "a circle", ["a square", "a red star", "a green circle"]),
    "triangle": ("object", "a triangle", ["a pyramid", "a wedge"], "a circle", ["a diamond", "a red square", "a green circle"]),
    "quibbit": ("instance", "quibbit", ["the quibbit", "a picture of quibbit"], "a purple triangle", ["a purple triangle", "mordak", "a purple diamond"]),
}
# the concepts of the five-concept closed_form edit (the default of ``--multi-concepts``)
MULTI_CONCEPTS = ("zorblax", "stripes", "star", "mordak", "dots")


# Per-category choices a policy author makes: a style is named inside longer captions ("a red
# square on stripes"), so its ablation trains on context prompts too (measured: without them the
# style's paraphrases keep it in 95% of samples; on an instance they cost unrelated prompts).
# ``--setting`` replaces one of these for a run (the skewed-backgrounds candidate world's retune,
# README, is ``--setting "ablation/style={..., steps: 600, preserve_weight: 5.0, text_space_weight: 0.0002}"``).
# text_encoder likewise: stripes survived in 39% of image samples with the target phrasings alone,
# 12.5% with context prompts and 200 steps, 0% with 400. For objects it also pulls the target's
# encoding onto the anchor's and holds the preserve prompts and 256 vocabulary prompts harder, so
# the video model (never trained against) reads the anchor too and keeps its neighbours (star, 16
# clips: the circle in 54% of frames without the encoding term, 98% with it; the vocabulary term
# kept "an orange triangle on dots", which preserve weight 10 alone broke), and trains on the
# target's misspellings (without them "a str" kept the star in 11% of image samples), for 300
# steps: with 100 the shared first word's encoding ("a", in every prompt) had moved by a third
# and an unrelated video prompt lost 7 points; with 300 it is back within 9% and nothing is lost.
# On dots the same settings held the text space too hard: 27% of images and 38% of frames kept
# the dots (and 25% / 88% with only the 256 vocabulary prompts added to the style settings);
# styles hold their listed preserve prompts at weight 3 (with 1, "an orange star on a
# checkerboard" lost 5.5 points on video; with 3 its encoding drifts half as far and it loses 3.9).
# forget_me_not minimises the attention mass on the concept's tokens and the positions after
# them, tuning only the concept words' input embeddings (and those of the canonical text's
# misspellings), so no prompt without them can change: at 64 samples zorblax (lr 0.01) 0% and
# dots 6%, nothing else moved; stripes 38% and star 88% left. The cross-attention keys and values
# with the same loss erased stripes on the skewed-scene world but cost a dots preserve prompt 91
# points there (README). On an object it also re-steers the text encoder's attention
# (encoder_attention_weight) so the positions after the star stop copying it: 64 samples, the
# star in 19% at most (88% without), nothing else moved; weights 3, 8, 20 and 50 give the same,
# the share of stars the model draws for an unnamed shape. On stripes the same left 34%, and the
# dots' 6% comes from the plain settings, so styles keep them.
CATEGORY_SETTINGS = {
    ("ablation", "style"): "{name: ablation, parameters: cross_attn_kv, steps: 200, learning_rate: 0.001, batch_size: 8, anchor_images: 64, regularization_weight: 1.0, context_prompts: 512, preserve_weight: 1.0}",
    ("text_encoder", "style"): "{name: text_encoder, steps: 400, learning_rate: 0.0003, images: 8, context_prompts: 512, preserve_weight: 3.0}",
    ("text_encoder", "object"): "{name: text_encoder, steps: 300, learning_rate: 0.0003, images: 8, encoding_weight: 1.0, preserve_weight: 10.0, preserve_vocabulary: 256, typo_variants: true}",
    ("forget_me_not", "object"): "{name: forget_me_not, parameters: embedding, following_tokens: true, attention_loss: mass, steps: 400, learning_rate: 0.05, reference_images: 10, typo_variants: true, encoder_attention_weight: 20.0}",
    ("forget_me_not", "instance"): "{name: forget_me_not, parameters: embedding, following_tokens: true, attention_loss: mass, steps: 400, learning_rate: 0.01, reference_images: 10, typo_variants: true}",
}


CATEGORIES = ("object", "style", "instance", "nsfw", "other")


def parse_setting(item: str) -> tuple[tuple[str, str], str]:
    """``"ablation/style={name: ablation, steps: 600}"`` -> ``(("ablation", "style"), "{name: ablation, steps: 600}")``,
    checked: a known method and category, and a YAML mapping whose ``name`` is that method."""
    import yaml

    key, sep, value = item.partition("=")
    method, slash, category = key.strip().partition("/")
    if not sep or not slash:
        raise ValueError(f"--setting {item!r}: write it as METHOD/CATEGORY={{name: METHOD, ...}}, e.g. \"ablation/style={{name: ablation, steps: 600}}\".")
    if method not in METHOD_SETTINGS:
        raise ValueError(f"--setting {item!r}: unknown method {method!r}; use one of {', '.join(METHOD_SETTINGS)}.")
    if category not in CATEGORIES:
        raise ValueError(f"--setting {item!r}: unknown category {category!r}; use one of {', '.join(CATEGORIES)}.")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ValueError(f"--setting {item!r}: the settings are not valid YAML ({exc.__class__.__name__}); write a flow mapping such as {{name: {method}, steps: 600}}.") from None
    if not isinstance(parsed, dict) or parsed.get("name") != method:
        raise ValueError(f"--setting {item!r}: the settings must be a mapping that starts with name: {method}, e.g. {{name: {method}, steps: 600}}.")
    value = value.strip()
    if not value.startswith(f"{{name: {method},"):
        raise ValueError(f"--setting {item!r}: start the mapping with \"{{name: {method}, \" (the bench matches settings to a method by it).")
    return (method, category), value


def concept_block(cid: str, method: str, scope: str = "both") -> str:
    category, text, phrasings, anchor, preserve = CONCEPTS[cid]
    method = next((m for (name, cat), m in CATEGORY_SETTINGS.items() if cat == category and f"name: {name}," in method), method)
    return (
        f"    - id: {cid}\n      category: {category}\n      scope: {scope}\n"
        f"      target: {{text: {json.dumps(text)}, phrasings: {json.dumps(phrasings)}}}\n"
        f"      anchor: {json.dumps(anchor)}\n      preserve: {json.dumps(preserve)}\n      method: {method}\n"
    )


def policy_text(name: str, concept_ids: list[str], method: str, video: bool) -> str:
    models = "    text_to_image: {builtin: conceptworld}\n" + ("    text_to_video: {builtin: conceptworld}\n" if video else "")
    scope = "both" if video else "image"
    blocks = "".join(concept_block(c, METHOD_SETTINGS[method], scope) for c in concept_ids)
    return (
        f"apiVersion: conceptguard.dev/v1\nkind: ConceptPolicy\nmetadata: {{name: {name}, version: 1.0.0, owner: bench}}\n"
        f"spec:\n  models:\n{models}  concepts:\n{blocks}"
    )


def judge_bars(report: dict, method: str) -> dict:
    out = {}
    for cid, entry in report["concepts"].items():
        for key, res in entry["models"].items():
            row = {
                "before_min": res["base_target_min"],
                "erased_max": res["erased_max"],
                "anchor": res["anchor_on_target"],
                "preserve_max_drop": res["preserve_max_drop"],
                "met_erased": res["erased_max"] <= 0.10 and res["base_target_min"] >= 0.90,
                "met_preserve": res["preserve_max_drop"] <= 0.05,
            }
            if method == "ablation":
                row["met_anchor"] = res["anchor_on_target"] >= 0.80
            out[f"{cid}/{key}"] = row
    for key, u in report["unrelated"].items():
        out[f"unrelated/{key}"] = {"max_drop": u["max_drop"], "met": u["max_drop"] <= 0.02}
    return out


def run(method: str, concept_ids: list[str], video: bool, samples: int, out: Path, seed: int, label: str, video_clips: int | None = None) -> dict:
    from serve.traced import trace_pipeline
    from unlearn import PatchCache, apply_patches, build_patches, load_policy_pipelines, require_all_applied
    from unlearn.evaluation import evaluate_policy

    policy = load_policy_text(policy_text(f"bench-{label.replace('_', '-')}", concept_ids, method, video), f"<bench {label}>")
    models = load_policy_pipelines(policy)
    t0 = time.perf_counter()
    built = build_patches(policy, models, PatchCache(out / "cache"), seed=seed, progress=False)
    build_s = time.perf_counter() - t0
    stacks = apply_patches(models, built)
    require_all_applied(policy, models, stacks)
    for pipe in models.values():  # traced denoisers with the stock kernels: the eager samples, bit for bit, sooner
        trace_pipeline(pipe, conv_kernels="onednn")
    report = evaluate_policy(policy, models, stacks, built, samples=samples, seed=seed, out_dir=out / label, video_clips=video_clips)
    return {"method": method, "build_seconds": round(build_s, 2), "bars": judge_bars(report, method), "report": f"{label}/report.json"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/efficacy"))
    parser.add_argument("--methods", default=",".join(METHOD_SETTINGS))
    parser.add_argument("--concepts", default="zorblax,stripes,star,dots")
    parser.add_argument("--skip-multi", action="store_true", help="skip the five-concept closed_form edit")
    parser.add_argument("--multi-concepts", default=",".join(MULTI_CONCEPTS), help="the concepts closed_form removes in one edit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video-clips", type=int, default=8, help="clips per prompt on the video model (8 frames each, all judged)")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="METHOD/CATEGORY={name: METHOD, ...}",
        help="replace the method settings used for one concept category in this run (repeatable)",
    )
    args = parser.parse_args(argv)
    for item in args.setting:
        try:
            key, value = parse_setting(item)
        except ValueError as exc:
            parser.error(str(exc))
        CATEGORY_SETTINGS[key] = value
    concept_ids = args.concepts.split(",")
    multi_ids = args.multi_concepts.split(",")
    unknown = sorted(set(concept_ids + multi_ids) - set(CONCEPTS))
    if unknown:
        parser.error(f"unknown concept(s) {', '.join(unknown)}: choose from {', '.join(CONCEPTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "efficacy.json"
    # runs of other methods already in the file are kept: a run can be split by --methods
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    for method in args.methods.split(","):
        video = method == "text_encoder"
        for cid in concept_ids:  # one concept per edit; closed_form also removes five at once below
            label = f"{method}-{cid}"
            results[label] = run(method, [cid], video, args.samples, args.out, args.seed, label, args.video_clips)
            print_table(label, results[label])
            save()
    if "closed_form" in args.methods.split(",") and not args.skip_multi:
        results["closed_form_5"] = run("closed_form", multi_ids, False, args.samples, args.out, args.seed, "closed_form_5")
        print_table("closed_form x5", results["closed_form_5"])
        save()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "report"} for k, v in results.items()}))
    return results


def print_table(title: str, result: dict) -> None:
    print(f"\n== {title} (build {result['build_seconds']} s)")
    print(f"{'concept/model':32s} {'before':>7s} {'after':>7s} {'anchor':>7s} {'pres.drop':>9s}  met")
    for k, row in result["bars"].items():
        if k.startswith("unrelated"):
            print(f"{k:32s} {'':7s} {'':7s} {'':7s} {row['max_drop']:9.3f}  {'yes' if row['met'] else 'NO'}")
            continue
        met = all(v for kk, v in row.items() if kk.startswith("met_"))
        print(f"{k:32s} {row['before_min']:7.2f} {row['erased_max']:7.2f} {row['anchor']:7.2f} {row['preserve_max_drop']:9.3f}  {'yes' if met else 'NO'}")


if __name__ == "__main__":
    main()
