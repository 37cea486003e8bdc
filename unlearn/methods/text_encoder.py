"""Few-shot text-encoder unlearning.

Liu and Tan, "Unlearning Concepts from Text-to-Video Diffusion Models" (arXiv:2407.14209),
2024: only the text encoder of a text-to-image model is tuned, from a few generated images, and
the tuned encoder is plugged into every text-to-video model that shares it (SD-1.x and
AnimateDiff share CLIP; SD-2 and ModelScope/Zeroscope share OpenCLIP).

Here the encoder is trained so that, on a few generated images of the target and of the anchor,
the UNet conditioned on the *tuned* encoding of the target predicts what the frozen model
predicts for the anchor; the encodings of the preserve prompts are held at their original
values. With ``context_prompts`` the target also appears inside random contexts of the
vocabulary, each paired with the same context around the anchor (encoded before any weight
moves), so longer prompts naming the concept are re-mapped too. The UNet never changes, so the patch only touches ``text_encoder`` and applies to the
image and video pipelines alike.

The UNet-side loss only asks that the *image* UNet read the tuned target encoding as the anchor;
a video UNet may read the same encoding otherwise. ``encoding_weight`` adds a term on the text
side: the tuned encoding of each target phrasing (and context caption) is pulled onto the frozen
encoding of the anchor, position by position (aligned as the closed-form edit aligns them), so
every denoiser sharing the encoder reads the anchor. ``preserve_vocabulary`` holds random
vocabulary prompts at their original encodings besides the listed preserve prompts, and
``typo_variants`` trains on the canonical text's one-letter misspellings as extra phrasings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import Denoiser
from .base import UnlearnMethod, aligned_positions, context_triples, progress_bar, random_prompts, register_method, target_prompts, target_typo_variants


@register_method
class TextEncoderUnlearning(UnlearnMethod):
    name = "text_encoder"

    def edit(self, den: Denoiser, concepts: Sequence, params: Mapping[str, nn.Parameter], *, progress: bool) -> None:
        (concept,) = concepts
        cfg = self.config
        targets = target_prompts(concept)
        if cfg.typo_variants:  # misspellings of the canonical text, trained on like phrasings
            targets = targets + target_typo_variants(den, concept)
        half = max(1, cfg.images // 2)
        x0 = torch.cat([den.sample_latents(concept.target.text, half), den.sample_latents(concept.anchor, cfg.images - half or 1)])
        # drawn only when used, so settings without these terms keep their random stream
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=den.generator)) if cfg.context_prompts or cfg.preserve_vocabulary else 0
        triples = context_triples(den, concept, cfg.context_prompts, seed=seed) if cfg.context_prompts else []
        pairs = [(t, a) for t, a, _ in triples]
        held = list(concept.preserve) + random_prompts(den, [concept], cfg.preserve_vocabulary, seed=seed + 1)
        with torch.no_grad():
            anchor_emb = den.encode([concept.anchor])
            held_goal = den.encode_many(held) if held else None
            context_goal = den.encode_many([a for _, a in pairs]) if pairs else None
            # (target, anchor, context after) items of the encoding term, with their aligned positions and goals
            items = [(t, concept.anchor, "") for t in targets] + triples if cfg.encoding_weight else []
            aligned = [aligned_positions(den, t, a, after) for t, a, after in items]
            item_goal = den.encode_many([a for _, a, _ in items]) if items else None
        opt = torch.optim.Adam(list(params.values()), lr=cfg.learning_rate)
        bar = progress_bar(cfg.steps, f"text_encoder {concept.id}", progress)
        batch = 4
        for _ in range(cfg.steps):
            idx = torch.randint(0, len(x0), (batch,), generator=den.generator)
            x_t, _, t = den.noised(x0[idx])
            with torch.no_grad():
                goal = den.predict(x_t, t, anchor_emb.expand(batch, -1, -1))
            chosen = [targets[int(i)] for i in torch.randint(0, len(targets), (batch,), generator=den.generator)]
            loss = F.mse_loss(den.predict(x_t, t, den.encode(chosen)), goal)
            if context_goal is not None:
                k = torch.randint(0, len(pairs), (batch,), generator=den.generator)
                with torch.no_grad():
                    ctx_goal = den.predict(x_t, t, context_goal[k])
                loss = loss + F.mse_loss(den.predict(x_t, t, den.encode([pairs[int(i)][0] for i in k])), ctx_goal)
            if item_goal is not None:
                k = torch.randint(0, len(items), (batch,), generator=den.generator).tolist()
                enc = den.encode([items[i][0] for i in k])
                got = torch.cat([enc[j, aligned[i][0]] for j, i in enumerate(k)])
                want = torch.cat([item_goal[i, aligned[i][1]] for i in k])
                loss = loss + cfg.encoding_weight * F.mse_loss(got, want)
            if held_goal is not None:
                k = torch.randperm(len(held), generator=den.generator)[:64] if len(held) > 64 else torch.arange(len(held))
                loss = loss + cfg.preserve_weight * F.mse_loss(den.encode([held[int(i)] for i in k]), held_goal[k])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
