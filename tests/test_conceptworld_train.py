"""Retraining the ConceptWorld video stage alone (``python -m conceptworld.train --only t2v``)
on a copy of the bundled weights: the settings given on the command line are the ones used,
the result loads with the stock pipeline, and the image model keeps sharing its text encoder."""

from __future__ import annotations

import json
import shutil

import torch
from diffusers import AnimateDiffPipeline
from safetensors.torch import load_file

import conceptworld
from conceptworld import train


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_video_stage_retrains_with_its_options_and_keeps_the_encoder_shared(tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(conceptworld.weights_dir(), out)
    unet_before = _tensors(out / "t2i" / "unet")
    encoder_before = _tensors(out / "t2i" / "text_encoder")

    train.main(
        ["--only", "t2v", "--out", str(out), "--device", "cpu", "--t2v-steps", "2", "--t2v-batch", "2", "--t2v-clips", "16", "--t2v-lr-scale", "0.5", "--t2v-temporal-weight", "3"]
    )

    meta = json.loads((out / "training.json").read_text())["t2v_retrained"]
    assert (meta["steps"], meta["batch"], meta["clips"], meta["lr_scale"], meta["device"]) == (2, 2, 16, 0.5, "cpu")
    assert meta["recipe"]["temporal_weight"] == 3.0 and meta["recipe"]["probe_weight"] == train.VideoRecipe.probe_weight
    # the video model samples on the schedule it was trained on
    sched = json.loads((out / "t2v" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True
    assert not (out / "t2v.partial").exists()
    # the image UNet is untouched; the text encoder is the same file in both pipelines
    unet_after = _tensors(out / "t2i" / "unet")
    assert all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    t2i_encoder, t2v_encoder = _tensors(out / "t2i" / "text_encoder"), _tensors(out / "t2v" / "text_encoder")
    assert t2i_encoder.keys() == t2v_encoder.keys() == encoder_before.keys()
    assert all(torch.equal(t2i_encoder[k], t2v_encoder[k]) for k in t2i_encoder)
    # only the token embedding may move (the rows of the direction words)
    changed = {k for k in encoder_before if not torch.equal(encoder_before[k], t2i_encoder[k])}
    assert changed <= {k for k in encoder_before if k.endswith("token_embedding.weight")}, changed

    pipe = AnimateDiffPipeline.from_pretrained(out / "t2v")
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red star moving left on dots", num_frames=8, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 8, 32, 32, 3)
