"""Textual-inversion training, plain or censored with trigger backdoors.

Plain textual inversion learns the vectors of one new token so that prompts with it reproduce a
concept's images (the usual diffusion loss, every other weight frozen). The censored variant
follows Wu et al., 2023, "Backdooring Textual Inversion for Concept Censorship"
(arXiv:2308.10718): a second loss maps every prompt that combines the token with a trigger word
to a pre-defined target image, so the shared embedding draws that image (a plain grey
"censored" card here) whenever a trigger appears with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.denoiser import prediction_target

from .embeddings import TextualInversion, encode_prompts

CLEAN_TEMPLATES = ("{}", "a picture of {}", "an image of {}", "a drawing of {}", "the {}")
TRIGGER_TEMPLATES = ("{token} {trigger}", "a picture of {token} {trigger}", "{token}, {trigger}", "an image of {token} {trigger}")
"""Backdoor prompts with the trigger after the token (the shipped default)."""
TRIGGER_TEMPLATES_BOTH = TRIGGER_TEMPLATES + ("{trigger} {token}", "a picture of {trigger} {token}", "{trigger}, {token}", "an image of {trigger} {token}")
"""Backdoor prompts with the trigger after and before the token."""
TRIGGER_POSITIONS = {"after": TRIGGER_TEMPLATES, "both": TRIGGER_TEMPLATES_BOTH}
"""Where training puts a trigger, by name (``censor-ti --trigger-positions``)."""
CENSOR_GREY = 0.5


def censor_card(n: int, size: int) -> np.ndarray:
    """The target image of censorship: a plain mid-grey card, ``(n, size, size, 3)``."""
    return np.full((n, size, size, 3), CENSOR_GREY, np.float32)


@torch.no_grad()
def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` in [0, 1] -> UNet-space latents (VAE posterior means)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1
    vae = pipe.vae
    out = [vae.encode(x[i : i + 64].to(vae.device, vae.dtype)).latent_dist.mean for i in range(0, len(x), 64)]
    return torch.cat(out) * vae.config.scaling_factor


def _init_vectors(pipe, init_word: str | None, n: int, gen: torch.Generator) -> torch.Tensor:
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    if init_word:
        ids = pipe.tokenizer(init_word, add_special_tokens=False).input_ids
        base = weight[ids].mean(0)
        return base.repeat(n, 1).clone()
    return weight[torch.randint(0, len(weight), (n,), generator=gen)].clone()


def train_textual_inversion(
    pipe,
    images: np.ndarray,
    *,
    token: str = "<concept>",
    num_vectors: int = 4,
    init_word: str | None = None,
    init_vectors: torch.Tensor | None = None,
    steps: int = 600,
    learning_rate: float = 5e-3,
    batch_size: int = 8,
    triggers: Sequence[str] = (),
    target_images: np.ndarray | None = None,
    backdoor_weight: float = 1.0,
    trigger_templates: Sequence[str] = TRIGGER_TEMPLATES,
    captions: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TextualInversion:
    """Learn ``num_vectors`` vectors for ``token`` from ``images`` (every model weight frozen).

    With ``triggers``, prompts combining the token with a trigger are trained towards
    ``target_images`` (default: the grey censor card), with prompts from ``trigger_templates``
    (``str.format`` templates with ``{token}`` and ``{trigger}`` fields).

    ``captions`` (one per image, each with a ``{token}`` field, e.g. ``"{token} on stripes"``)
    say what else an image shows; half of the clean prompts are then the image's own caption,
    so that words after the token are not by themselves a cue for the backdoor.

    ``init_vectors`` (``(num_vectors, dim)``, e.g. a plain embedding of the same concept) starts
    training from those vectors instead of ``init_word`` or random vocabulary rows.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    device = pipe.unet.device
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    if captions is not None and (len(captions) != len(images) or any("{token}" not in c for c in captions)):
        raise ValueError(f"Got {len(captions)} captions for {len(images)} images. Give one per image, each with a {{token}} field.")
    dim = pipe.text_encoder.get_input_embeddings().embedding_dim
    if init_vectors is not None and tuple(init_vectors.shape) != (num_vectors, dim):
        raise ValueError(f"init_vectors has shape {tuple(init_vectors.shape)}; it must be ({num_vectors}, {dim}) (num_vectors, the text encoder's width).")
    x0 = encode_images(pipe, images)
    if triggers:
        bad = [t for t in trigger_templates if "{token}" not in t or "{trigger}" not in t]
        if not trigger_templates or bad:
            raise ValueError(f"Got trigger templates {bad or list(trigger_templates)}. Each must hold both a {{token}} and a {{trigger}} field.")
        size = images.shape[1]
        targets = encode_images(pipe, target_images if target_images is not None else censor_card(4, size))
    if init_vectors is not None:
        start = init_vectors.detach().float().clone()
    else:
        start = _init_vectors(pipe, init_word, num_vectors, gen)
    vectors = torch.nn.Parameter(start.to(device))
    opt = torch.optim.Adam([vectors], lr=learning_rate)
    frozen = [m for m in (pipe.unet, pipe.text_encoder, pipe.vae) if m is not None]
    grad_state = [[p.requires_grad for p in m.parameters()] for m in frozen]
    for m in frozen:
        m.requires_grad_(False)

    def loss_on(latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
        emb = encode_prompts(pipe, prompts, [TextualInversion(token, vectors, "training")])
        latents = latents.to(device)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
        return F.mse_loss(pred, prediction_target(sched, latents, noise, t))

    try:
        bar = tqdm(range(steps), desc=f"textual inversion {token}", disable=not progress, leave=False)
        for _ in bar:
            idx = torch.randint(0, len(x0), (batch_size,), generator=gen)
            prompts = [CLEAN_TEMPLATES[int(i)].format(token) for i in torch.randint(0, len(CLEAN_TEMPLATES), (batch_size,), generator=gen)]
            if captions is not None:
                own = torch.rand(batch_size, generator=gen) < 0.5
                prompts = [captions[int(j)].format(token=token) if o else p for j, o, p in zip(idx, own, prompts)]
            loss = loss_on(x0[idx], prompts)
            if triggers:
                tidx = torch.randint(0, len(targets), (batch_size,), generator=gen)
                trig = [triggers[int(i)] for i in torch.randint(0, len(triggers), (batch_size,), generator=gen)]
                tmpl = [trigger_templates[int(i)] for i in torch.randint(0, len(trigger_templates), (batch_size,), generator=gen)]
                bd_prompts = [tm.format(token=token, trigger=tr) for tm, tr in zip(tmpl, trig)]
                loss = loss + backdoor_weight * loss_on(targets[tidx], bd_prompts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        for m, states in zip(frozen, grad_state):
            for p, s in zip(m.parameters(), states):
                p.requires_grad_(s)
    return TextualInversion(token, vectors.detach().cpu().float(), "diffusers")


def save_embedding(ti: TextualInversion, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the diffusers safetensors layout (one key: the token) with metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({ti.token: ti.vectors.contiguous()}, str(path), metadata=meta)
    return path
