"""What every unlearning method needs from a diffusers pipeline, in one place.

Works for image pipelines (``StableDiffusionPipeline``-like: latents ``(B, C, H, W)``) and
video pipelines (``AnimateDiffPipeline``-like: latents ``(B, C, F, H, W)``, one prompt
embedding per frame) through the same calls, by diffusers component names only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def vocabulary_words(tokenizer, min_chars: int = 3) -> list[str]:
    """The whole alphabetic words of a CLIP-style BPE vocabulary (tokens ending in ``</w>``), sorted."""
    words = set()
    for tok in tokenizer.get_vocab():
        if tok.endswith("</w>") and tok[:-4].isalpha() and len(tok) - 4 >= min_chars:
            words.add(tok[:-4])
    return sorted(words)


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a UNet trained under ``scheduler``'s ``prediction_type`` predicts for ``add_noise(x0, noise, t)``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"Got {kind!r} for the scheduler's prediction_type. It must be 'epsilon', 'v_prediction' or 'sample'.")


class Denoiser:
    def __init__(self, pipe, *, seed: int = 0, num_frames: int = 8):
        missing = [n for n in ("tokenizer", "text_encoder", "unet", "scheduler") if getattr(pipe, n, None) is None]
        if missing:
            raise TypeError(f"Got a {type(pipe).__name__} without {missing}. Unlearning needs a Stable Diffusion-style pipeline with a UNet and a CLIP text encoder.")
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.device = self.unet.device
        self.is_video = hasattr(pipe, "motion_adapter") or "Motion" in type(self.unet).__name__ or "3D" in type(self.unet).__name__
        self.num_frames = num_frames
        self.train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.generator = torch.Generator().manual_seed(seed)

    # ---- text ------------------------------------------------------------------------------
    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def encode(self, prompts: Sequence[str], text_encoder=None) -> torch.Tensor:
        """Prompt embeddings as the pipeline computes them (last hidden state)."""
        te = text_encoder or self.text_encoder
        return te(self.token_ids(prompts))[0]

    def encode_many(self, prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
        """:meth:`encode` over many prompts, ``chunk`` at a time."""
        return torch.cat([self.encode(prompts[i : i + chunk]) for i in range(0, len(prompts), chunk)])

    # ---- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(self, prompt: str, n: int, *, steps: int = 25, guidance: float = 5.0, batch: int = 32) -> torch.Tensor:
        """``n`` samples of ``prompt`` from the current model, as UNet-space latents (on CPU)."""
        out = []
        for start in range(0, n, batch):
            k = min(batch, n - start)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            gen = torch.Generator(device="cpu").manual_seed(seed)
            kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="latent")
            if self.is_video:
                res = self.pipe([prompt] * k, num_frames=self.num_frames, **kwargs)
                out.append(res.frames.cpu())
            else:
                res = self.pipe(prompt, num_images_per_prompt=k, **kwargs)
                out.append(res.images.cpu())
        return torch.cat(out)

    # ---- the diffusion objective --------------------------------------------------------------
    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, t)`` for clean latents ``x0``, with uniformly drawn timesteps.

        ``target`` is what the UNet is trained to predict for ``x_t``: the noise for
        epsilon-prediction models (SD 1.x, SD 2 base), the velocity for v-prediction ones
        (SD 2 768-v, zero-terminal-SNR video models), read from the scheduler's config."""
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator).to(self.device)
        x0 = x0.to(self.device)
        return self.train_scheduler.add_noise(x0, noise, t), prediction_target(self.train_scheduler, x0, noise, t), t

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (of the noise or the velocity, as it was trained); video UNets read one embedding per frame."""
        if self.is_video:
            embeddings = embeddings.repeat_interleave(x_t.shape[2], dim=0)
        return self.unet(x_t, t, encoder_hidden_states=embeddings).sample
