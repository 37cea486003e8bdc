"""Concept ablation.

Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models", ICCV 2023
(arXiv:2303.13516). The model's distribution for the *target* prompt is pulled onto the
distribution of an *anchor* prompt:

- model-based (default): ``|| eps(x_t, c_target, t) - sg(eps_frozen(x_t, c_anchor, t)) ||^2``,
  with ``x_t`` noised from images the frozen model generated for the anchor prompt;
- noise-based: the ordinary diffusion loss on (target prompt, anchor image) pairs.

An optional regulariser (the ordinary diffusion loss on anchor prompts and anchor images)
keeps the anchor itself intact. The parameter group is cross-attention key/value by default.

The paper trains on many captions that contain the concept, each paired with the same caption
with the anchor in its place. ``context_prompts`` does that without a caption generator: a
target phrasing and the anchor are placed in the same random context of the model's vocabulary
words (the model-based goal is the frozen prediction for the anchor caption).

``text_space_weight`` adds :class:`~unlearn.methods.base.TextSpace`, a penalty on how much
the fine-tuned key/value projections change their outputs for the rest of the text space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import Denoiser
from .base import TextSpace, UnlearnMethod, context_pairs, preserve_prompts, progress_bar, register_method, target_prompts


@register_method
class Ablation(UnlearnMethod):
    name = "ablation"

    def edit(self, den: Denoiser, concepts: Sequence, params: Mapping[str, nn.Parameter], *, progress: bool) -> None:
        (concept,) = concepts
        cfg = self.config
        pairs = [(t, concept.anchor) for t in target_prompts(concept)]
        if cfg.context_prompts:
            pairs += context_pairs(den, concept, cfg.context_prompts, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=den.generator)))
        anchor = concept.anchor
        anchor_x0 = den.sample_latents(anchor, cfg.anchor_images)
        n_pairs = cfg.steps * cfg.batch_size
        # Draw every (x_t, t, prompt pair) of the run up front and compute the frozen model's
        # anchor prediction for it now, before any weight moves: no frozen copy of the UNet needed.
        gen = den.generator
        idx = torch.randint(0, len(anchor_x0), (n_pairs,), generator=gen)
        prompt_idx = torch.randint(0, len(pairs), (n_pairs,), generator=gen)
        x0 = anchor_x0[idx]
        x_t, target, t = den.noised(x0)
        if cfg.variant == "model":
            with torch.no_grad():
                goal = torch.cat(
                    [den.predict(x_t[i : i + 64], t[i : i + 64], den.encode([pairs[int(k)][1] for k in prompt_idx[i : i + 64]])) for i in range(0, n_pairs, 64)]
                )
        else:
            goal = target
        keep = self._preserve_targets(den, concept, anchor_x0, n_pairs) if cfg.preserve_weight > 0 else None
        space = TextSpace.build(den, concepts, params, cfg.preserve_vocabulary) if cfg.text_space_weight > 0 else None
        opt = torch.optim.Adam(list(params.values()), lr=cfg.learning_rate)
        bar = progress_bar(cfg.steps, f"ablation {concept.id}", progress)
        for step in range(cfg.steps):
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            emb = den.encode([pairs[int(i)][0] for i in prompt_idx[sl]])
            loss = F.mse_loss(den.predict(x_t[sl], t[sl], emb), goal[sl])
            if cfg.regularization_weight > 0:
                rx, rtarget, rt = den.noised(anchor_x0[torch.randint(0, len(anchor_x0), (cfg.batch_size,), generator=gen)])
                remb = den.encode([anchor] * cfg.batch_size)
                loss = loss + cfg.regularization_weight * F.mse_loss(den.predict(rx, rt, remb), rtarget)
            if keep is not None:
                px_t, p_t, p_prompts, p_goal = keep
                loss = loss + cfg.preserve_weight * F.mse_loss(den.predict(px_t[sl], p_t[sl], den.encode(p_prompts[sl])), p_goal[sl])
            if space is not None:
                loss = loss + cfg.text_space_weight * space.penalty(params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()

    @staticmethod
    @torch.no_grad()
    def _preserve_targets(den: Denoiser, concept, anchor_x0: torch.Tensor, n: int):
        """``n`` (x_t, t, preserve prompt, frozen prediction) draws for the loss that keeps the
        concept's preserve prompts answered as the base model answers them (prompts naming the
        target itself are left out: they are meant to change)."""
        prompts = preserve_prompts([concept])
        if not prompts:
            return None
        gen = den.generator
        x_t, _, t = den.noised(anchor_x0[torch.randint(0, len(anchor_x0), (n,), generator=gen)])
        chosen = [prompts[int(i)] for i in torch.randint(0, len(prompts), (n,), generator=gen)]
        goal = torch.cat([den.predict(x_t[i : i + 64], t[i : i + 64], den.encode(chosen[i : i + 64])) for i in range(0, n, 64)])
        return x_t, t, chosen, goal
