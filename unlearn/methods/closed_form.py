"""Closed-form multi-concept edit of the cross-attention key/value projections.

After Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024: for every
cross-attention key and value matrix ``W`` a regularised least-squares problem is solved in one
step, with no gradient steps,

    W' = argmin  e * sum_i ||W' c_i - W a_i||^2  +  p * sum_j ||W' c_j - W c_j||^2  +  ||W' - W||_F^2

where ``c_i`` are the token embeddings of the concepts' target prompts, ``a_i`` the aligned
embeddings of their anchors, and ``c_j`` the embeddings of the preserve prompts. The solution is
``W' = (e * sum W a_i c_i^T + p * sum W c_j c_j^T + W) (e * sum c_i c_i^T + p * sum c_j c_j^T + I)^-1``.
Many concepts are erased in one edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..denoiser import Denoiser
from .base import UnlearnMethod, aligned_pairs, context_triples, preserve_prompts, progress_bar, random_prompts, register_method, target_prompts, target_typo_variants


@register_method
class ClosedForm(UnlearnMethod):
    name = "closed_form"
    multi_concept = True

    def edit(self, den: Denoiser, concepts: Sequence, params: Mapping[str, nn.Parameter], *, progress: bool) -> None:
        cfg = self.config
        with torch.no_grad():
            erase_c, erase_a = [], []
            for concept in concepts:
                phrasings = target_prompts(concept)
                pairs = [(prompt, concept.anchor, "") for prompt in phrasings]
                if cfg.typo_variants:
                    # misspellings of the canonical text, each erased like a phrasing (measured on
                    # ConceptWorld: those of every phrasing as well broke other prompts; weighing them
                    # less left the misspelling as it was)
                    pairs += [(prompt, concept.anchor, "") for prompt in target_typo_variants(den, concept)]
                if cfg.context_prompts:
                    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=den.generator))
                    pairs += context_triples(den, concept, cfg.context_prompts, seed=seed)
                for target, anchor, after in pairs:
                    c, a = aligned_pairs(den, target, anchor, after)
                    erase_c.append(c)
                    erase_a.append(a)
            c_e = torch.cat(erase_c).double()  # (n, d)
            a_e = torch.cat(erase_a).double()
            # a preserve prompt that names a concept this same edit erases cannot be held fixed
            preserve = preserve_prompts(concepts)
            preserve += random_prompts(den, concepts, cfg.preserve_vocabulary, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=den.generator)))
            if preserve:
                # every position, padding included: all of them feed the cross-attention
                c_p = den.encode(preserve).flatten(0, 1).double()
            else:
                c_p = c_e.new_zeros((0, c_e.shape[1]))
            d = c_e.shape[1]
            eye = torch.eye(d, dtype=torch.float64, device=c_e.device)
            rhs_in = cfg.erase_weight * c_e.T @ c_e + cfg.preserve_weight * c_p.T @ c_p + eye
            inv = torch.linalg.inv(rhs_in)
            bar = progress_bar(len(params), "closed_form", progress)
            for p in params.values():
                w = p.detach().double()
                lhs = cfg.erase_weight * (w @ a_e.T) @ c_e + cfg.preserve_weight * (w @ c_p.T) @ c_p + w
                p.copy_((lhs @ inv).to(p.dtype))
                bar.update(1)
            bar.close()
