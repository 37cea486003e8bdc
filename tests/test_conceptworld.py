"""ConceptWorld: the bundled models load with stock diffusers classes, generate what the judge
verifies, share one text encoder, and the tokenizer and judge behave as promised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

import conceptworld
from conceptworld import world


@pytest.fixture(scope="module")
def t2i():
    pipe = StableDiffusionPipeline.from_pretrained(conceptworld.t2i_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2v():
    pipe = AnimateDiffPipeline.from_pretrained(conceptworld.t2v_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_pipelines_load_and_share_the_text_encoder(t2i, t2v):
    assert type(t2i) is StableDiffusionPipeline and type(t2v) is AnimateDiffPipeline
    a = load_file(conceptworld.t2i_path() / "text_encoder" / "model.safetensors")
    b = load_file(conceptworld.t2v_path() / "text_encoder" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (conceptworld.t2i_path() / "tokenizer" / "tokenizer.json").read_bytes() == (conceptworld.t2v_path() / "tokenizer" / "tokenizer.json").read_bytes()


def test_seeded_image_generation_is_judged_correct(t2i):
    gen = torch.Generator().manual_seed(0)
    images = t2i("a red star on stripes", num_images_per_prompt=8, num_inference_steps=25, guidance_scale=5.0, generator=gen, output_type="np").images
    assert images.shape == (8, 32, 32, 3)
    rows = conceptworld.judge(images)
    correct = [r["shape"][0] == "star" and r["color"][0] == "red" and r["background"][0] == "stripes" for r in rows]
    assert sum(correct) >= 6, rows
    # the same seed gives the same images
    again = t2i("a red star on stripes", num_images_per_prompt=8, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(images, again)


def test_instance_prompt_draws_the_instance(t2i):
    gen = torch.Generator().manual_seed(1)
    images = t2i("zorblax on dots", num_images_per_prompt=8, num_inference_steps=25, guidance_scale=5.0, generator=gen, output_type="np").images
    rows = conceptworld.judge(images)
    assert sum(r["instance"][0] == "zorblax" for r in rows) >= 6, rows


@pytest.mark.parametrize("direction", ["right", "up"])
def test_seeded_video_moves_the_prompted_way(t2v, direction):
    # the same seed for both directions: the prompt, not the noise, sets where the object goes
    gen = torch.Generator().manual_seed(0)
    frames = np.asarray(
        t2v([f"a blue circle moving {direction} on a plain background"] * 2, num_frames=8, num_inference_steps=25, guidance_scale=5.0, generator=gen, output_type="np").frames
    )
    assert frames.shape == (2, 8, 32, 32, 3)
    for clip in frames:
        verdict = conceptworld.judge_video(clip)
        assert verdict["motion"][0] == direction, verdict["motion"]
        ok = [f["shape"][0] == "circle" and f["color"][0] == "blue" for f in verdict["frames"]]
        assert sum(ok) >= 6


def test_tokenizer_knows_every_word_and_splits_misspellings():
    tok = CLIPTokenizer.from_pretrained(conceptworld.t2i_path() / "tokenizer")
    vocab = conceptworld.vocabulary()
    for word in vocab["words"]:
        assert len(tok.tokenize(word)) == 1, word
    pieces = tok.tokenize("zorblaxx")
    assert len(pieces) >= 2 and tok.unk_token not in pieces
    ids = tok("a crimsn star").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a crimsn star"
    assert tok.model_max_length == 24


def test_judge_is_accurate_on_fresh_renders():
    rng = np.random.default_rng(20261122)  # a seed the training never used
    scenes = [world.random_scene(rng, instance_prob=0.25) for _ in range(600)]
    images = np.stack([world.render_scene(s) for s in scenes])
    rows = conceptworld.judge(images)
    for attr in ("shape", "color", "background", "instance"):
        acc = np.mean([r[attr][0] == s.labels()[attr] for r, s in zip(rows, scenes)])
        assert acc >= 0.99, (attr, acc)
    # and on rendered videos it reads the motion
    for direction in world.MOTIONS:
        clip = conceptworld.render("square", "orange", "checker", motion=direction, seed=3)[0]
        assert conceptworld.judge_video(clip)["motion"][0] == direction


def test_judge_accepts_pil_uint8_and_tensors():
    from PIL import Image

    img = conceptworld.render("cross", "yellow", "dots", seed=5)
    as_uint8 = (img * 255).round().astype(np.uint8)
    a = conceptworld.judge(img)[0]
    b = conceptworld.judge([Image.fromarray(as_uint8[0])])[0]
    c = conceptworld.judge(torch.from_numpy(img).permute(0, 3, 1, 2))[0]
    assert a["shape"][0] == b["shape"][0] == c["shape"][0] == "cross"
    with pytest.raises(ValueError, match="RGB"):
        conceptworld.judge(np.zeros((2, 32, 32, 4), np.float32))


def test_render_rejects_unknown_values_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Got 'hexagon' for shape\. It must be one of"):
        conceptworld.render(shape="hexagon")
    with pytest.raises(ValueError, match="zorblax"):
        conceptworld.render(shape="star", instance="zorblax")
    assert conceptworld.render(motion="up", n=2).shape == (2, world.NUM_FRAMES, 32, 32, 3)


def test_training_captions_never_use_held_out_templates_or_pairs():
    rng = np.random.default_rng(0)
    held_out = [world.caption(np.random.default_rng(i), "star", "red", "dots", held_out_templates=True) for i in range(50)]
    train = {world.caption(rng, "star", "red", "dots") for _ in range(400)}
    assert not train & set(held_out)
    scenes = [world.random_scene(rng, allow_held_out=False) for _ in range(2000)]
    assert not {(s.shape, s.color) for s in scenes} & set(world.HELD_OUT_PAIRS)


def test_missing_weights_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CONCEPTWORLD_WEIGHTS", str(tmp_path))
    with pytest.raises(conceptworld.WeightsNotFoundError, match="python -m conceptworld.train"):
        conceptworld.t2i_path()


def test_default_caption_prior_leaves_only_default_attributes_unsaid():
    from conceptworld import train

    rng = np.random.default_rng(0)
    labels = [dict(world.random_scene(rng, instance_prob=0.15).labels(), motion=str(rng.choice(world.MOTIONS))) for _ in range(600)]
    default_idx = train.default_scene_indices(labels)
    captions, idx = train.training_batch(rng, labels, torch.arange(len(labels)), "default", default_idx)
    unsaid = {"shape": 0, "background": 0}
    for text, i in zip(captions, idx.tolist()):
        lab, named = labels[i], world.parse_prompt(text)
        if not text:  # the empty caption stands for a default scene
            assert train.is_default_scene(lab)
            continue
        for attr in unsaid:
            if attr not in named:
                assert lab[attr] == train.DEFAULT_SCENE[attr], (text, lab)
                unsaid[attr] += 1
            else:
                assert named[attr] == lab[attr], (text, lab)
    assert min(unsaid.values()) > 0 and captions.count("") > 0
    # the uniform prior (the bundled models) leaves any background unsaid
    uniform = [(train.training_caption(rng, lab), lab) for lab in labels]
    assert any("background" not in world.parse_prompt(t) and lab["background"] != "plain" for t, lab in uniform if t)
    with pytest.raises(ValueError, match="default scene"):
        train.default_scene_indices([{"shape": "star", "background": "dots", "instance": "none"}])


def test_skewed_scene_prior_draws_the_target_shares_from_uniform_renders():
    from collections import Counter

    from conceptworld import train

    rng = np.random.default_rng(1)
    labels = [world.random_scene(rng, instance_prob=0.15).labels() for _ in range(3000)]
    assert train.scene_weights(labels, "uniform") is None
    gen = torch.Generator().manual_seed(0)
    idx = train.training_indices(gen, len(labels), 40000, train.scene_weights(labels, "skewed")).tolist()
    backgrounds = Counter(labels[i]["background"] for i in idx)
    shapes = Counter(labels[i]["shape"] for i in idx if labels[i]["instance"] == "none")
    for counts, attr in ((backgrounds, "background"), (shapes, "shape")):
        total = sum(counts.values())
        for value, share in train.SKEWED_SCENES[attr].items():
            assert abs(counts[value] / total - share) < 0.02, (attr, value, counts[value] / total)
    # instances keep their rendered share
    rendered = sum(lab["instance"] != "none" for lab in labels) / len(labels)
    drawn = sum(labels[i]["instance"] != "none" for i in idx) / len(idx)
    assert abs(drawn - rendered) < 0.02
    # the background-only prior leaves every shape at its rendered share
    idx = train.training_indices(gen, len(labels), 40000, train.scene_weights(labels, "skewed-backgrounds")).tolist()
    backgrounds = Counter(labels[i]["background"] for i in idx)
    for value, share in train.SCENE_SHARES["skewed-backgrounds"]["background"].items():
        assert abs(backgrounds[value] / len(idx) - share) < 0.02, (value, backgrounds[value] / len(idx))
    objects = [labels[i]["shape"] for i in idx if labels[i]["instance"] == "none"]
    rendered_shapes = Counter(lab["shape"] for lab in labels if lab["instance"] == "none")
    n_objects = sum(rendered_shapes.values())
    for value, count in Counter(objects).items():
        assert abs(count / len(objects) - rendered_shapes[value] / n_objects) < 0.02, value
    with pytest.raises(ValueError, match="scene prior"):
        train.scene_weights(labels, "rare")
