"""CI-sized efficacy: each method removes one ConceptWorld concept, judged by the judge.

The full measurement (every method on an instance, a style and an object, 64 samples per
prompt, paraphrases and a misspelling) is ``bench/efficacy.py``; here each method gets one
concept and fewer samples, with the same bars.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from efficacy import CATEGORY_SETTINGS, concept_block, main, parse_setting, policy_text  # noqa: E402

from policies import load_policy_text  # noqa: E402
from unlearn import PatchCache, apply_patches, build_patches, load_policy_pipelines  # noqa: E402
from serve.traced import trace_pipeline  # noqa: E402
from unlearn.evaluation import evaluate_policy  # noqa: E402

SAMPLES = 24
CASES = [
    ("ablation", "zorblax", False),
    ("forget_me_not", "zorblax", False),  # an instance: forgetting leaves the prior, which rarely draws it
    ("closed_form", "star", False),
    ("text_encoder", "zorblax", True),  # learnt on images, judged on the video model too
]
# Clips per prompt on the video model, 8 frames each, every frame judged: one frame is 2.08
# points of 48, so one wrong frame cannot fail a preserve prompt's 5-point bar alone. The unrelated prompts are measured on the
# image model here; on the video model they are bench/efficacy.py's (6 prompts x 2 x 6 clips
# took 3.5 of the suite's 18 minutes).
VIDEO_CLIPS = 6


@pytest.mark.parametrize("method, concept, video", CASES, ids=["ablation-zorblax", "forget_me_not-zorblax", "closed_form-star", "text_encoder-zorblax"])
def test_method_removes_its_concept_and_keeps_neighbours(method, concept, video, tmp_path):
    policy = load_policy_text(policy_text(f"ci-{method.replace('_', '-')}", [concept], method, video), "<ci>")
    models = load_policy_pipelines(policy)
    built = build_patches(policy, models, PatchCache(tmp_path), progress=False)
    stacks = apply_patches(models, built)
    for pipe in models.values():  # stock kernels: the traced samples are the eager ones, bit for bit
        trace_pipeline(pipe, conv_kernels="onednn")
    report = evaluate_policy(policy, models, stacks, built, samples=SAMPLES, seed=0, video_clips=VIDEO_CLIPS, unrelated_models=["text_to_image"])
    assert set(report["unrelated"]) == {"text_to_image"}
    assert set(report["concepts"][concept]["models"]) == ({"text_to_image", "text_to_video"} if video else {"text_to_image"})
    for key, res in report["concepts"][concept]["models"].items():
        assert res["base_target_min"] >= 0.90, (key, res["prompts"])
        assert res["erased_max"] <= 0.10, (key, res["prompts"])
        assert res["preserve_max_drop"] <= 0.05, (key, res["preserve"])
        if method == "ablation":
            assert res["anchor_on_target"] >= 0.80, (key, res["prompts"]["target"])
    for key, u in report["unrelated"].items():
        assert u["max_drop"] <= 0.02, (key, u["prompts"])


def test_bench_setting_override_is_checked_and_used(monkeypatch):
    key, value = parse_setting("ablation/style={name: ablation, steps: 600, preserve_weight: 5.0}")
    assert key == ("ablation", "style")
    monkeypatch.setitem(CATEGORY_SETTINGS, key, value)
    assert "steps: 600, preserve_weight: 5.0}" in concept_block("stripes", "{name: ablation, steps: 100}")
    assert "steps: 100}" in concept_block("star", "{name: ablation, steps: 100}")  # an object keeps the default
    for bad, says in [
        ("ablation={name: ablation}", "METHOD/CATEGORY="),
        ("ablate/style={name: ablate}", "unknown method 'ablate'"),
        ("ablation/styles={name: ablation}", "unknown category 'styles'"),
        ("ablation/style={name: closed_form, steps: 3}", "starts with name: ablation"),
        ("ablation/style={name: ablation, steps: [3}", "not valid YAML"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_setting(bad)


def test_bench_refuses_an_unknown_concept_before_building(tmp_path, capsys):
    for flag in ("--concepts", "--multi-concepts"):
        with pytest.raises(SystemExit) as exc:
            main([flag, "star,pentagon", "--out", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "unknown concept(s) pentagon: choose from zorblax, stripes, star" in err, err
    assert not (tmp_path / "efficacy.json").exists()


def test_every_bench_setting_is_a_valid_policy_for_its_concepts():
    """A typo in a shipped setting would only show up minutes into a bench run; each method's
    settings must load, for every concept, with the category's own settings where it has them."""
    from efficacy import CONCEPTS, METHOD_SETTINGS

    for method in METHOD_SETTINGS:
        for cid in CONCEPTS:
            policy = load_policy_text(policy_text(f"check-{method.replace('_', '-')}", [cid], method, video=False), f"<{method} {cid}>")
            cfg = policy.spec.concepts[0].method
            assert cfg.name == method
            if method == "forget_me_not":  # objects also re-steer the text encoder's attention; the rest do not
                assert (cfg.encoder_attention_weight > 0) == (CONCEPTS[cid][0] == "object"), (cid, cfg)
