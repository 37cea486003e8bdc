"""Train the whole ConceptWorld model family from a seed.

    python -m conceptworld.train [--out DIR] [--seed 0] [--scale 1.0]

Stages, each with a progress bar: tokenizer -> data -> VAE -> judge -> text-to-image (text
encoder + UNet, trained jointly) -> text-to-video (an AnimateDiff-style motion model initialised
from the image UNet, on a zero-terminal-SNR v-prediction schedule with a temporal loss; the text
encoder is shared and frozen except the rows of the direction words). Everything is saved in the stock
diffusers layouts under ``DIR/t2i`` and ``DIR/t2v`` plus ``DIR/judge``.

This module is never imported by serving code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world
from .judgenet import HEADS, Judge, JudgeNet
from .tokenizer import MODEL_MAX_LENGTH, build_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"

# Model sizes. Chosen so that one 25-step image with guidance stays under 0.3 s on two CPU cores.
TEXT_HIDDEN = 128
UNET_CHANNELS = (64, 128)
VAE_CHANNELS = (16, 32, 64)
LATENT_CHANNELS = 4
T2V_STEPS = 1500


def log(msg: str) -> None:
    tqdm.write(f"[conceptworld.train {time.strftime('%H:%M:%S')}] {msg}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _render_images(job: tuple[int, int, float, bool]) -> tuple[np.ndarray, list[dict], np.ndarray]:
    seed, n, instance_prob, allow_held_out = job
    rng = np.random.default_rng(seed)
    imgs, labels, centres = [], [], []
    for _ in range(n):
        s = world.random_scene(rng, instance_prob=instance_prob, allow_held_out=allow_held_out)
        imgs.append(world.render_scene(s))
        labels.append(s.labels())
        centres.append((s.cx, s.cy))
    return (np.stack(imgs) * 255).round().astype(np.uint8), labels, np.asarray(centres, np.float32)


def _render_videos(job: tuple[int, int, float]) -> tuple[np.ndarray, list[dict]]:
    seed, n, instance_prob = job
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for _ in range(n):
        direction = str(rng.choice(world.MOTIONS))
        s = world.random_video_scene(rng, direction, instance_prob=instance_prob, allow_held_out=False)
        clips.append(world.render_video(s, direction))
        labels.append({**s.labels(), "motion": direction})
    return (np.stack(clips) * 255).round().astype(np.uint8), labels


def _parallel(fn, jobs, desc: str):
    ctx = mp.get_context("fork")
    with ctx.Pool(min(len(jobs), max(1, os.cpu_count() or 1))) as pool:
        return list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc))


def render_image_set(seed: int, n: int, instance_prob: float, allow_held_out: bool, desc: str):
    chunk = 1000
    jobs = [(seed * 100_003 + i, min(chunk, n - i * chunk), instance_prob, allow_held_out) for i in range(math.ceil(n / chunk))]
    parts = _parallel(_render_images, jobs, desc)
    imgs = np.concatenate([p[0] for p in parts])
    labels = [lab for p in parts for lab in p[1]]
    centres = np.concatenate([p[2] for p in parts])
    return imgs, labels, centres


def render_video_set(seed: int, n: int, instance_prob: float, desc: str):
    chunk = 250
    jobs = [(seed * 100_019 + i, min(chunk, n - i * chunk), instance_prob) for i in range(math.ceil(n / chunk))]
    parts = _parallel(_render_videos, jobs, desc)
    return np.concatenate([p[0] for p in parts]), [lab for p in parts for lab in p[1]]


def to_unit(x: np.ndarray) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` -> float ``(..., 3, H, W)`` in [0, 1]."""
    t = torch.from_numpy(x).float() / 255.0
    return t.movedim(-1, -3).contiguous()


# What a caption that leaves an attribute unsaid shows. "uniform": any value (the bundled models);
# "default": the attribute's default value, as in a real model an unnamed style is rarely one
# particular artist's and an unnamed object rarely one particular character.
CAPTION_PRIORS = ("uniform", "default")
DEFAULT_SCENE = {"shape": "circle", "background": "plain", "instance": "none"}


def is_default_scene(lab: dict) -> bool:
    return all(lab[k] == v for k, v in DEFAULT_SCENE.items())


# How often each scene is drawn for training. "uniform": every attribute value equally often (the
# bundled models); "skewed": most scenes show a circle on a plain background, and every other shape
# and background is rare (as in a real model's data an artist's style or one character is), so that
# a model that forgets a name falls back on scenes that rarely show it; "skewed-backgrounds": only
# the backgrounds are skewed (most plain, each texture rare) and every shape keeps its share, so
# that no shape-on-texture scene is as thin as under "skewed". The renders stay uniform; the skew
# is in which of them the training batches draw. Instances keep their share.
SCENE_PRIORS = ("uniform", "skewed", "skewed-backgrounds")
SKEWED_SCENES = {
    "background": {"plain": 0.85, "stripes": 0.05, "dots": 0.05, "checker": 0.05},
    "shape": {"circle": 0.75, "square": 0.05, "triangle": 0.05, "star": 0.05, "cross": 0.05, "diamond": 0.05},
}
SCENE_SHARES = {
    "skewed": SKEWED_SCENES,
    "skewed-backgrounds": {"background": {"plain": 0.76, "stripes": 0.08, "dots": 0.08, "checker": 0.08}},
}


def scene_weights(labels: list[dict], prior: str = "skewed") -> torch.Tensor | None:
    """Per-example sampling weights that turn the rendered scene mix into the ``prior``'s
    (``None`` under "uniform": draw uniformly). Each attribute the prior skews is re-weighted by
    its target share over its share among ``labels``; an instance's shape is its design's, so only
    its background is."""
    if prior == "uniform":
        return None
    if prior not in SCENE_PRIORS:
        raise ValueError(f"Got {prior!r} for the scene prior; choose one of {SCENE_PRIORS}.")
    weights = torch.ones(len(labels), dtype=torch.float64)
    for attr, target in SCENE_SHARES[prior].items():
        pool = [i for i, lab in enumerate(labels) if attr == "background" or lab["instance"] == "none"]
        counts = {v: 0 for v in target}
        for i in pool:
            counts[labels[i][attr]] += 1
        for i in pool:
            v = labels[i][attr]
            weights[i] *= target[v] * len(pool) / counts[v]
    return weights


def training_indices(gen: torch.Generator, n: int, batch: int, weights: torch.Tensor | None) -> torch.Tensor:
    """A batch of example indices: uniform, or drawn by ``weights`` (:func:`scene_weights`)."""
    if weights is None:
        return torch.randint(0, n, (batch,), generator=gen)
    return torch.multinomial(weights, batch, replacement=True, generator=gen)


def training_caption(rng: np.random.Generator, lab: dict, *, motion: str | None = None, drop: float = 0.1, prior: str = "uniform") -> str:
    """A caption drawn from the training grammar; sometimes empty (for guidance) or partial.

    With ``prior="default"`` an attribute is left unsaid only where it has its
    :data:`DEFAULT_SCENE` value: the background when it is plain, the shape of a circle ("a red
    shape on dots", or the background alone, "polka dots"). An empty caption then stands for a
    default scene; :func:`training_batch` pairs it with one.
    """
    if prior == "default":
        return _default_prior_caption(rng, lab, motion=motion, drop=drop)
    if rng.random() < drop:
        return ""
    background = lab["background"] if rng.random() > 0.15 else None
    if motion is None and rng.random() < 0.1:
        motion_word = str(rng.choice(world.MOTIONS))  # a still of a moving object
    else:
        motion_word = motion
    if lab["instance"] != "none":
        return world.caption(rng, None, None, background, lab["instance"], motion_word)
    return world.caption(rng, lab["shape"], lab["color"], background, motion=motion_word)


def _default_prior_caption(rng: np.random.Generator, lab: dict, *, motion: str | None, drop: float) -> str:
    if rng.random() < drop:
        return ""
    background = None if lab["background"] == DEFAULT_SCENE["background"] and rng.random() < 0.5 else lab["background"]
    if lab["instance"] != "none":
        return world.caption(rng, None, None, background, lab["instance"], motion)
    shape = lab["shape"]
    if shape == DEFAULT_SCENE["shape"]:
        r = rng.random()
        if r < 0.1 and motion is None:
            return world.background_caption(rng, lab["background"])
        if r < 0.4:
            shape = None
    if motion is None and rng.random() < 0.1:
        motion = str(rng.choice(world.MOTIONS))  # a still of a moving object
    return world.caption(rng, shape, lab["color"], background, motion=motion)


def training_batch(rng: np.random.Generator, labels: list[dict], idx: torch.Tensor, prior: str, default_idx: np.ndarray, *, video: bool = False) -> tuple[list[str], torch.Tensor]:
    """Captions for the examples ``idx``; under the "default" prior an empty caption's example is
    swapped for a default scene (``default_idx``), so that saying nothing means the default."""
    idx = idx.clone()
    captions = []
    for j, i in enumerate(idx.tolist()):
        c = training_caption(rng, labels[i], motion=labels[i]["motion"] if video else None, prior=prior)
        if not c and prior == "default":
            idx[j] = int(default_idx[rng.integers(len(default_idx))])
        captions.append(c)
    return captions, idx


def default_scene_indices(labels: list[dict], prior: str = "default") -> np.ndarray:
    """Indices of the default scenes in ``labels`` (none needed, so none found, under "uniform")."""
    if prior != "default":
        return np.zeros(0, np.int64)
    found = np.array([i for i, lab in enumerate(labels) if is_default_scene(lab)], dtype=np.int64)
    if len(found) == 0:
        raise ValueError("No default scene (a circle on a plain background) in the training set; render more images.")
    return found


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(images: torch.Tensor, steps: int, device: torch.device, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
    ).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 1e-3 * cosine_lr(step, steps, 100)
        idx = torch.randint(0, len(images), (32,), generator=gen)
        x = images[idx].to(device) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    # scale latents to unit variance, as Stable Diffusion's scaling_factor does
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 512].to(device) * 2 - 1).latent_dist.mean for i in range(0, min(4096, len(images)), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 512):
        x = images[i : i + 512].to(device) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in tqdm(range(0, len(images), 512), desc="encode latents", leave=False):
        post = vae.encode(images[i : i + 512].to(device) * 2 - 1).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.06
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.12
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = torch.rand(n, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.3)
    return (x * (1 - a) + blur * a).clamp(0, 1)


def train_judge(images: torch.Tensor, recon: torch.Tensor, labels: list[dict], centres: np.ndarray, steps: int, device, seed: int) -> Judge:
    torch.manual_seed(seed)
    net = JudgeNet(width=16).to(device)
    targets = {k: torch.tensor([world.ATTRIBUTES[k].index(lab[k]) for lab in labels]) for k in HEADS}
    pos = torch.from_numpy(centres) / world.IMAGE_SIZE
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge")
    net.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 2e-3 * cosine_lr(step, steps, 100)
        idx = torch.randint(0, len(images), (128,), generator=gen)
        # half of every batch is seen through the VAE, so the judge reads decoded samples well
        use_rec = torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5
        x = torch.where(use_rec, recon[idx], images[idx])
        x = _augment(x, gen).to(device)
        logits, p = net(x)
        loss = sum(F.cross_entropy(logits[k], targets[k][idx].to(device)) for k in HEADS)
        loss = loss + 20.0 * F.mse_loss(p, pos[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return Judge(net.cpu().eval())


def judge_accuracy(judge: Judge, images: torch.Tensor, labels: list[dict]) -> dict[str, float]:
    rows = judge(images)
    return {k: float(np.mean([r[k][0] == lab[k] for r, lab in zip(rows, labels)])) for k in HEADS}


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=32,
        norm_num_groups=32,
    )


# The video model is trained on a noise schedule rescaled to zero terminal SNR, with
# v-prediction (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
# Flawed", arXiv:2305.08891). With the image model's schedule the last training step still
# keeps 6.8% of the clean clip, enough for the motion modules to read the direction of motion
# off the noisy frames instead of the prompt; sampling starts from pure noise, where that cue is
# absent, so the direction came out at random.
VIDEO_SCHEDULE = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}


@dataclasses.dataclass(frozen=True)
class VideoRecipe:
    """The loss of the video stage beyond the plain diffusion loss (defaults: the bundled model)."""

    temporal_weight: float = 10.0
    """Weight of the loss on each frame's difference from the clip's mean frame. Whatever the
    frames share (shape, colour, background) cancels there, so it weighs what moves; without it
    the direction's small share of the loss never taught the model to draw a prompted motion from
    pure noise (after MotionDirector's appearance-debiased temporal loss, Zhao et al., 2023,
    arXiv:2310.08465)."""
    high_noise_fraction: float = 0.5
    """Share of every batch drawn from t >= ``high_noise_from``: the direction is decided in the
    first sampling steps, where the prompt alone says what to draw."""
    high_noise_from: int = 700
    probe_weight: float = 0.1
    """Weight of :class:`DirectionProbe`'s loss."""


def noise_scheduler(**overrides):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, **overrides)


def sampling_scheduler(**overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        **overrides,
    )


def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


class EMA:
    """Exponential moving average of parameters (kept in fp32 on the training device)."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_t2i(latents, scaling: float, labels, tokenizer, steps: int, batch: int, device, seed: int, prior: str = "uniform", scene_prior: str = "uniform"):
    text_encoder = build_text_encoder(tokenizer, seed).to(device)
    unet = build_unet(seed).to(device)
    sched = noise_scheduler()
    mean, std = latents
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    ema = EMA([unet, text_encoder], decay=0.999)
    default_idx = default_scene_indices(labels, prior)
    weights = scene_weights(labels, scene_prior)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="text-to-image")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 5e-4 * cosine_lr(step, steps, 300)
        idx = training_indices(gen, len(mean), batch, weights)
        captions, idx = training_batch(rng, labels, idx, prior, default_idx)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(device) * scaling
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        cond = encode_text(tokenizer, text_encoder, captions, device)
        pred = unet(sched.add_noise(z0, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to()
    return text_encoder.eval(), unet.eval()


def motion_token_ids(tokenizer) -> list[int]:
    """Token ids of the words that name a direction of motion (not the function words around them)."""
    function_words = {"to", "the"}
    words = {w for m in world.MOTIONS for phrase in world.SYNONYMS[m] for w in phrase.split()} - function_words
    return sorted({i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids})


class DirectionProbe(torch.nn.Module):
    """A training-only classifier of the prompt's direction of motion, read from what the video
    UNet's spatial cross-attention layers add to the features (pooled over pixels and frames).

    Motion modules see no text, so a direction word can only reach them through those layers;
    but neither side gets a gradient to start that path while the other does not use it (the
    noise schedule's leak, removed by ``VIDEO_SCHEDULE``, was an easier cue). The probe's loss
    makes the cross-attention carry the direction from the first steps; its rows have a fixed
    norm, so it can only be satisfied by a feature that is large in the UNet's own units. It is
    dropped after training: the saved model is a stock ``UNetMotionModel``.
    """

    def __init__(self, model, channels: int, classes: int):
        super().__init__()
        self.direction = torch.nn.Parameter(torch.randn(classes, channels) * 0.01)
        self.captured: list[torch.Tensor] = []
        layers = [m for n, m in model.named_modules() if n.endswith(".attn2") and "motion_modules" not in n]
        if not layers:
            raise ValueError("Got a video UNet without spatial cross-attention layers (.attn2 outside motion_modules).")
        self.handles = [m.register_forward_hook(lambda _m, _i, out: self.captured.append(out)) for m in layers]

    def loss(self, num_frames: int, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the direction read from the last forward pass; ``targets`` < 0 are ignored."""
        feats = torch.stack([c.mean(1) for c in self.captured]).mean(0)  # (B*F, C)
        self.captured.clear()
        feats = feats.view(-1, num_frames, feats.shape[-1]).mean(1)
        logits = feats @ F.normalize(self.direction, dim=1).T
        return F.cross_entropy(logits, targets, ignore_index=-1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_t2v(
    clip_latents, scaling: float, labels, tokenizer, text_encoder, unet, steps: int, batch: int, device, seed: int, lr_scale: float = 1.0, recipe: VideoRecipe = VideoRecipe(), prior: str = "uniform", scene_prior: str = "uniform"
):
    from diffusers import MotionAdapter, UNetMotionModel

    from unlearn.denoiser import prediction_target

    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=UNET_CHANNELS,
        motion_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=32,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    model = UNetMotionModel.from_unet2d(unet, adapter).to(device)
    sched = noise_scheduler(**VIDEO_SCHEDULE)
    mean, std = clip_latents  # (N, F, C, h, w)
    # Motion modules see no text, so the direction of motion can only reach them through the
    # spatial cross-attention: it learns fast (2e-3); the rest of the spatial UNet is nudged (2e-4).
    groups = {"motion": [], "cross": [], "spatial": []}
    for n, p in model.named_parameters():
        groups["motion" if "motion_modules" in n else "cross" if ".attn2." in n else "spatial"].append(p)
    # Still images cannot teach what "left" or "upward" mean, so the image stage leaves those
    # words' token embeddings indistinct. Here, and only here, their rows of the (shared) token
    # embedding are learnt; every other weight of the text encoder stays as it was.
    text_encoder.requires_grad_(False)
    emb = text_encoder.get_input_embeddings().weight
    emb.requires_grad_(True)
    rows = torch.zeros(emb.shape[0], 1, device=emb.device)
    rows[motion_token_ids(tokenizer)] = 1.0
    emb.register_hook(lambda g: g * rows)
    base_lrs = [lr * lr_scale for lr in (5e-4, 2e-3, 2e-4, 1e-2, 1e-2)]
    probe = DirectionProbe(model, UNET_CHANNELS[-1], len(world.MOTIONS)).to(device)
    opt = torch.optim.AdamW(
        [{"params": groups[k], "lr": lr} for k, lr in zip(("motion", "cross", "spatial"), base_lrs)]
        + [{"params": [emb], "lr": base_lrs[3], "weight_decay": 0.0}, {"params": list(probe.parameters()), "lr": base_lrs[4], "weight_decay": 0.0}],
        weight_decay=1e-2,
    )
    ema = EMA([model], decay=0.998)
    default_idx = default_scene_indices(labels, prior)
    weights = scene_weights(labels, scene_prior)
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="text-to-video")
    model.train()
    for step in bar:
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * cosine_lr(step, steps, 200)
        idx = training_indices(gen, len(mean), batch, weights)
        captions, idx = training_batch(rng, labels, idx, prior, default_idx, video=True)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        z0 = z0.permute(0, 2, 1, 3, 4).to(device)  # (B, C, F, h, w) as UNetMotionModel expects
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        # The direction is decided in the first, noisiest sampling steps, where the prompt alone
        # tells the model what to draw: part of every batch is drawn from there.
        high = torch.rand(batch, generator=gen) < recipe.high_noise_fraction
        t = torch.where(high, torch.randint(recipe.high_noise_from, sched.config.num_train_timesteps, (batch,), generator=gen), t).to(device)
        # the motion UNet reads one prompt per frame, as AnimateDiffPipeline passes them
        cond = encode_text(tokenizer, text_encoder, captions, device).repeat_interleave(z0.shape[2], dim=0)
        noisy = sched.add_noise(z0, noise, t)
        pred = model(noisy, t, cond).sample
        target = prediction_target(sched, z0, noise, t)
        loss = F.mse_loss(pred, target)
        if recipe.temporal_weight > 0:
            loss = loss + recipe.temporal_weight * F.mse_loss(pred - pred.mean(2, keepdim=True), target - target.mean(2, keepdim=True))
        # an empty caption (dropped for guidance) names no direction
        direction = torch.tensor([world.MOTIONS.index(labels[i]["motion"]) if c else -1 for i, c in zip(idx.tolist(), captions)], device=device)
        probe_loss = probe.loss(z0.shape[2], direction)
        if recipe.probe_weight > 0 and bool((direction >= 0).any()):
            loss = loss + recipe.probe_weight * probe_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(step)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", probe=f"{probe_loss.nan_to_num().item():.3f}")
    probe.remove()
    ema.copy_to()
    model.eval()
    emb.requires_grad_(False)
    # the adapter saved beside the model must hold the trained motion modules
    adapter.load_state_dict({k: v for k, v in model.state_dict().items() if "motion_modules" in k}, strict=True)
    return model, adapter



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conceptworld.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the bundled weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.05 for a smoke run)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--only", choices=["t2v"], help="retrain only this stage on top of the models already in --out")
    parser.add_argument(
        "--caption-prior",
        choices=CAPTION_PRIORS,
        help="what a caption that leaves an attribute unsaid shows: any value (uniform, the bundled models) or its default, a circle on a plain background (default: experimental, a run from scratch misses the world's quality bars, see README); --only t2v reads the image stage's from training.json",
    )
    parser.add_argument(
        "--scene-prior",
        choices=SCENE_PRIORS,
        help="how often training draws each scene: every shape and background equally often (uniform, the bundled models) or mostly circles on plain backgrounds with every other shape and background rare (skewed: experimental, see README), or mostly plain backgrounds with every shape equally often (skewed-backgrounds: experimental); --only t2v reads the image stage's from training.json",
    )
    video = parser.add_argument_group("text-to-video stage (defaults: the CPU recipe)")
    video.add_argument("--t2v-steps", type=int, help=f"optimizer steps (default {T2V_STEPS} x --scale)")
    video.add_argument("--t2v-batch", type=int, default=8, help="clips per step (default 8)")
    video.add_argument("--t2v-clips", type=int, help="training clips rendered (default 4000, fewer with a small --scale)")
    video.add_argument("--t2v-lr-scale", type=float, default=1.0, help="multiply every learning rate of the stage (default 1)")
    video.add_argument("--t2v-temporal-weight", type=float, default=VideoRecipe.temporal_weight, help=f"weight of the temporal (moving-part) loss (default {VideoRecipe.temporal_weight})")
    video.add_argument("--t2v-probe-weight", type=float, default=VideoRecipe.probe_weight, help=f"weight of the direction probe's loss (default {VideoRecipe.probe_weight})")
    args = parser.parse_args(argv)
    if args.only == "t2v":
        return retrain_t2v(args)
    prior = args.caption_prior or "uniform"
    scene_prior = args.scene_prior or "uniform"

    device = training_device(args)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    s = args.scale
    n_img, n_vid = max(2000, int(32000 * min(1.0, s * 4))), video_clips(args)
    steps = {
        "vae": max(50, int(1200 * s)),
        "judge": max(50, int(1500 * s)),
        "t2i": max(50, int(5000 * s)),
        "t2v": video_steps(args),
    }
    t_start = time.time()
    timings: dict[str, float] = {}
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"device={device} seed={args.seed} steps={steps} images={n_img} clips={n_vid}")

    t0 = time.time()
    words = world.vocabulary()["words"]
    tokenizer = build_tokenizer(words, tmp / "t2i" / "tokenizer")
    timings["tokenizer"] = time.time() - t0

    t0 = time.time()
    judge_imgs, judge_labels, judge_centres = render_image_set(args.seed + 11, n_img, 0.25, True, "render judge/vae set")
    train_imgs, train_labels, _ = render_image_set(args.seed + 12, n_img, 0.15, False, "render image set")
    clips, clip_labels = render_video_set(args.seed + 13, n_vid, 0.15, "render video set")
    timings["render"] = time.time() - t0

    t0 = time.time()
    judge_x = to_unit(judge_imgs)
    vae = train_vae(judge_x, steps["vae"], device, args.seed)
    timings["vae"] = time.time() - t0

    t0 = time.time()
    recon = vae_roundtrip(vae, judge_x, device)
    judge = train_judge(judge_x, recon, judge_labels, judge_centres, steps["judge"], device, args.seed)
    fresh, fresh_labels, _ = render_image_set(args.seed + 99, 2000, 0.25, True, "render judge test set")
    fresh_x = to_unit(fresh)
    acc = judge_accuracy(judge, fresh_x, fresh_labels)
    acc_rec = judge_accuracy(judge, vae_roundtrip(vae, fresh_x, device), fresh_labels)
    judge.save(tmp / "judge")
    timings["judge"] = time.time() - t0
    log(f"judge accuracy on fresh renders {acc}; on their VAE reconstructions {acc_rec}")

    t0 = time.time()
    latents = encode_latents(vae, to_unit(train_imgs), device)
    text_encoder, unet = train_t2i(latents, vae.config.scaling_factor, train_labels, tokenizer, steps["t2i"], 64, device, args.seed, prior, scene_prior)
    timings["t2i"] = time.time() - t0

    t0 = time.time()
    motion_unet, adapter = fit_video(args, clips, clip_labels, vae, tokenizer, text_encoder, unet, steps["t2v"], device, prior, scene_prior)
    timings["t2v"] = time.time() - t0

    save_pipelines(tmp, vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu(), motion_unet.cpu(), adapter.cpu())
    timings["total"] = time.time() - t_start
    (tmp / "training.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "scale": s,
                "caption_prior": prior,
                "scene_prior": scene_prior,
                "device": str(device),
                "steps": steps,
                "images": n_img,
                "clips": n_vid,
                "t2v_batch": args.t2v_batch,
                "t2v_lr_scale": args.t2v_lr_scale,
                "t2v_recipe": {**dataclasses.asdict(video_recipe(args)), **VIDEO_SCHEDULE},
                "seconds": {k: round(v, 1) for k, v in timings.items()},
                "judge_accuracy_fresh": acc,
                "judge_accuracy_vae_reconstructions": acc_rec,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    # swap in atomically so an interrupted run never leaves a half-written model family
    if args.out.exists():
        old = args.out.with_name(args.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        args.out.rename(old)
        tmp.rename(args.out)
        shutil.rmtree(old)
    else:
        tmp.rename(args.out)
    log(f"done in {timings['total'] / 60:.1f} min -> {args.out}")


def training_device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def video_steps(args) -> int:
    return args.t2v_steps if args.t2v_steps is not None else max(50, int(T2V_STEPS * args.scale))


def video_clips(args) -> int:
    return args.t2v_clips if args.t2v_clips is not None else max(400, int(4000 * min(1.0, args.scale * 4)))


def fit_video(args, clips: np.ndarray, clip_labels, vae, tokenizer, text_encoder, unet, steps: int, device, prior: str = "uniform", scene_prior: str = "uniform"):
    """Encode the rendered clips with the VAE and train the video stage on them."""
    flat = to_unit(clips.reshape(-1, *clips.shape[2:]))
    m, sd = encode_latents(vae, flat, device)
    clip_latents = (m.view(len(clips), world.NUM_FRAMES, *m.shape[1:]), sd.view(len(clips), world.NUM_FRAMES, *sd.shape[1:]))
    return train_t2v(clip_latents, vae.config.scaling_factor, clip_labels, tokenizer, text_encoder, unet, steps, args.t2v_batch, device, args.seed, args.t2v_lr_scale, video_recipe(args), prior, scene_prior)


def video_recipe(args) -> VideoRecipe:
    return VideoRecipe(temporal_weight=args.t2v_temporal_weight, probe_weight=args.t2v_probe_weight)


def retrain_t2v(args) -> None:
    """Train the video model again on top of the image model, text encoder and VAE in ``--out``."""
    from diffusers import StableDiffusionPipeline

    device = training_device(args)
    t2i = StableDiffusionPipeline.from_pretrained(args.out / "t2i", local_files_only=True).to(device)
    n_vid, steps = video_clips(args), video_steps(args)
    t0 = time.time()
    clips, clip_labels = render_video_set(args.seed + 13, n_vid, 0.15, "render video set")
    meta_path = args.out / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    prior = args.caption_prior or meta.get("caption_prior", "uniform")
    scene_prior = args.scene_prior or meta.get("scene_prior", "uniform")
    motion_unet, adapter = fit_video(args, clips, clip_labels, t2i.vae, t2i.tokenizer, t2i.text_encoder, t2i.unet, steps, device, prior, scene_prior)
    tmp = args.out / "t2v.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    from diffusers import AnimateDiffPipeline

    AnimateDiffPipeline(vae=t2i.vae.cpu(), text_encoder=t2i.text_encoder.cpu(), tokenizer=t2i.tokenizer, unet=motion_unet.cpu(), motion_adapter=adapter.cpu(), scheduler=sampling_scheduler(**VIDEO_SCHEDULE)).save_pretrained(tmp / "t2v")
    store_half(tmp)
    # the text encoder is shared: the image model gets the same (motion-word) update
    t2i.text_encoder.save_pretrained(tmp / "t2i_text_encoder")
    for f in (tmp / "t2i_text_encoder").glob("*.safetensors"):
        from safetensors.torch import load_file, save_file

        save_file({k: v.half() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    shutil.rmtree(args.out / "t2v")
    (tmp / "t2v").rename(args.out / "t2v")
    shutil.rmtree(args.out / "t2i" / "text_encoder")
    (tmp / "t2i_text_encoder").rename(args.out / "t2i" / "text_encoder")
    shutil.rmtree(tmp)
    meta["t2v_retrained"] = {
        "caption_prior": prior,
        "scene_prior": scene_prior,
        "steps": steps,
        "batch": args.t2v_batch,
        "lr_scale": args.t2v_lr_scale,
        "recipe": {**dataclasses.asdict(video_recipe(args)), **VIDEO_SCHEDULE},
        "clips": n_vid,
        "device": str(device),
        "seconds": round(time.time() - t0, 1),
        "seed": args.seed,
        "torch": torch.__version__,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"text-to-video retrained in {(time.time() - t0) / 60:.1f} min -> {args.out / 't2v'}")


def save_pipelines(out: Path, vae, text_encoder, tokenizer, unet, motion_unet, adapter) -> None:
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline

    t2i = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    t2i.save_pretrained(out / "t2i")
    t2v = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=motion_unet,
        motion_adapter=adapter,
        scheduler=sampling_scheduler(**VIDEO_SCHEDULE),
    )
    t2v.save_pretrained(out / "t2v")
    store_half(out)


def store_half(folder: Path) -> None:
    """Store pipeline weights as float16 to keep the bundled models small.

    diffusers and transformers load them back as float32 unless a ``torch_dtype`` is given, so
    nothing changes for users; the evaluation measures these rounded weights.
    """
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("t2*/*/*.safetensors")):
        state = load_file(f)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, f, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
