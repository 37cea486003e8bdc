"""Forget-Me-Not attention re-steering.

Zhang et al., "Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models"
(arXiv:2303.17591). While the model denoises reference images of the concept, the
cross-attention probabilities that every cross-attention layer puts on the concept's tokens are
collected and their norm is minimised; there is no denoising loss. The full UNet is tuned by
default, cross-attention only (or only its key/value projections, the text side) as an option.
``following_tokens`` also re-steers the end-of-text and padding positions after the concept's
words, which a causal text encoder fills with the concept's meaning. ``text_space_weight`` adds
:class:`~unlearn.methods.base.TextSpace`, a penalty on how much the tuned key/value projections
change their outputs for the rest of the text space; ``preserve_weight`` holds the attention
maps themselves: every cross-attention layer's probabilities for the preserve prompts and
``preserve_vocabulary`` random prompts stay close (total variation) to the base model's on the
same noisy latents. ``typo_variants`` also re-steers the canonical text's misspellings (their
word pieces, never a whole vocabulary word's token). ``parameters="embedding"`` tunes only the input embeddings of the concept's own
words, so no prompt without them changes. ``attention_loss="mass"`` minimises the total probability on the re-steered
positions instead of their maps' norm. ``encoder_attention_weight`` (with ``parameters="embedding"``) also
re-steers the text encoder's own attention: the mass that every position after the concept's
tokens puts on them, the path by which a causal encoder copies the concept forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..denoiser import Denoiser, vocabulary_words
from ..patch import cross_attention_layers
from .base import TextSpace, UnlearnMethod, preserve_prompts, progress_bar, random_prompts, register_method, target_prompts, target_typo_variants

# Words that carry no concept: their tokens are never the ones re-steered.
_FUNCTION_WORDS = {"a", "an", "the", "of", "on", "in", "with", "and", "picture", "image", "photo", "drawing", "background", "shape", "object", "thing", "style"}


def attention_probabilities(attn, hidden_states, encoder_hidden_states=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A diffusers ``Attention`` layer's probabilities ``(batch*heads, pixels, tokens)`` and values."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    return attn.get_attention_scores(query, key, None), value


def attention_output(attn, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The layer's output for given probabilities (of :func:`attention_probabilities`)."""
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    return attn.to_out[1](attn.to_out[0](out))


class _AttentionProbe:
    """An attention processor for ``attn2`` layers that records the attention probabilities."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        probs, value = attention_probabilities(attn, hidden_states, encoder_hidden_states)
        self.sink.append(probs.view(hidden_states.shape[0], attn.heads, *probs.shape[1:]))
        return attention_output(attn, probs, value)


def concept_token_ids(tok, words: set[str], misspellings: Sequence[str] = ()) -> set[int]:
    """The token ids of the concept's ``words`` and the word pieces of its ``misspellings``; a
    piece that is a whole vocabulary word (the "a" of "a sta") stays out: other prompts use it."""
    ids = {i for w in words for i in tok(w, add_special_tokens=False).input_ids}
    if misspellings:
        whole = {tok.convert_tokens_to_ids(f"{w}</w>") for w in vocabulary_words(tok, min_chars=1)}
        ids |= {i for m in misspellings for w in m.split() for i in tok(w, add_special_tokens=False).input_ids} - whole
    return ids


def concept_token_mask(den: Denoiser, prompts: Sequence[str], concept_words: set[str], *, following: bool = False, token_ids: set[int] | None = None) -> torch.Tensor:
    """``(len(prompts), seq)`` booleans: the positions holding tokens of the concept's words (or
    the given ``token_ids``), and with ``following`` every position after the first of them that
    is end-of-text or padding."""
    tok = den.tokenizer
    concept_ids = token_ids if token_ids is not None else concept_token_ids(tok, concept_words)
    ids = den.token_ids(prompts).cpu()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for cid in concept_ids:
        mask |= ids == cid
    end_ids = torch.tensor([i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None], dtype=ids.dtype)
    if following and len(end_ids):
        mask |= (mask.cumsum(1) > 0) & torch.isin(ids, end_ids)
    return mask


_PRESERVE_BATCH = 4


@contextmanager
def _weights(params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]):
    """Run with ``params`` set to ``values`` (no grad), then put the tuned values back."""
    tuned = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tuned[k])


def attention_loss(probs: torch.Tensor, form: str) -> torch.Tensor:
    """The re-steering loss of the masked positions' probabilities ``(..., pixels, masked)``:
    ``"norm"``, the mean over pixels of their squared probabilities summed (the paper's norm of
    the attention maps), or ``"mass"``, the mean of their summed probability squared."""
    if form == "mass":
        return probs.sum(-1).pow(2).mean()
    return probs.pow(2).sum(-1).mean()


def _restrict_to_rows(params: Mapping[str, nn.Parameter], token_ids: set[int]) -> list:
    """Gradient hooks that keep a token-embedding matrix's update to the rows of ``token_ids``
    (the ``embedding`` group: every other word, end-of-text and padding included, stays as it was)."""
    hooks = []
    ids = sorted(token_ids)
    for key, p in params.items():
        if key.endswith("token_embedding.weight"):
            keep = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
            keep[ids] = 1
            hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
    return hooks


class _EagerAttention:
    """Runs a transformers text encoder with its attention maps reported (the eager attention
    kernels, which compute the same outputs), and puts its own kernels back on :meth:`restore`."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.before = getattr(text_encoder.config, "_attn_implementation", None)
        if not hasattr(text_encoder, "set_attn_implementation"):
            from ..patch import PatchError

            raise PatchError(f"encoder_attention_weight needs a transformers text encoder that can report its attention maps; {type(text_encoder).__name__} cannot. Set encoder_attention_weight: 0.")
        text_encoder.set_attn_implementation("eager")

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = self.text_encoder(ids, output_attentions=True)
        if not out.attentions:
            from ..patch import PatchError

            raise PatchError(f"{type(self.text_encoder).__name__} reported no attention maps, which encoder_attention_weight re-steers. Set encoder_attention_weight: 0.")
        return out[0], out.attentions

    def restore(self) -> None:
        if self.before is not None:
            self.text_encoder.set_attn_implementation(self.before)


def concept_words(concept) -> set[str]:
    words = {w for p in target_prompts(concept) for w in p.lower().replace(",", " ").split()}
    return words - _FUNCTION_WORDS - set(concept.anchor.lower().split())


@register_method
class ForgetMeNot(UnlearnMethod):
    name = "forget_me_not"

    def edit(self, den: Denoiser, concepts: Sequence, params: Mapping[str, nn.Parameter], *, progress: bool) -> None:
        (concept,) = concepts
        cfg = self.config
        prompts = target_prompts(concept)
        typos = target_typo_variants(den, concept) if cfg.typo_variants else []
        prompts += typos
        ids = concept_token_ids(den.tokenizer, concept_words(concept), typos)
        refs = den.sample_latents(concept.target.text, cfg.reference_images)
        masks = concept_token_mask(den, prompts, set(), following=cfg.following_tokens, token_ids=ids).to(den.device)
        own = concept_token_mask(den, prompts, set(), token_ids=ids).to(den.device)
        later = (own.cumsum(1) > 0) & ~own  # every position after the concept's first token, other than its own
        if not masks.any():
            from ..patch import PatchError

            raise PatchError(f"Concept {concept.id!r}: none of its target words is a token of this model's tokenizer, so there is no attention to re-steer.")
        space = TextSpace.build(den, concepts, params, cfg.preserve_vocabulary) if cfg.text_space_weight > 0 else None
        held = preserve_prompts(concepts) + random_prompts(den, concepts, cfg.preserve_vocabulary, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=den.generator))) if cfg.preserve_weight > 0 else []
        with torch.no_grad():
            held_ctx = den.encode_many(held) if held else None
        base = {k: p.detach().clone() for k, p in params.items()} if held else {}
        hooks = _restrict_to_rows(params, ids)
        probes: list[torch.Tensor] = []
        unet = den.unet
        saved = dict(unet.attn_processors)
        cross = cross_attention_layers(unet)
        unet.set_attn_processor({name: (_AttentionProbe(probes) if name.removesuffix(".processor") in cross else proc) for name, proc in saved.items()})
        opt = torch.optim.Adam(list(params.values()), lr=cfg.learning_rate)
        bar = progress_bar(cfg.steps, f"forget_me_not {concept.id}", progress)
        encoder = None
        try:
            if cfg.encoder_attention_weight > 0:  # inside the try: a refusal still puts the UNet's processors back
                encoder = _EagerAttention(den.text_encoder)
            for _ in range(cfg.steps):
                i = int(torch.randint(0, len(refs), (1,), generator=den.generator))
                j = int(torch.randint(0, len(prompts), (1,), generator=den.generator))
                x_t, _, t = den.noised(refs[i : i + 1])
                if held_ctx is not None:  # the base model's maps first: swapping weights after a forward would break its graph
                    k = torch.randint(0, len(held), (_PRESERVE_BATCH,), generator=den.generator)
                    xs, ts, ctx = x_t.expand(len(k), *x_t.shape[1:]), t.expand(len(k)), held_ctx[k.to(held_ctx.device)]
                    with torch.no_grad(), _weights(params, base):
                        probes.clear()
                        den.predict(xs, ts, ctx)
                        goal = list(probes)
                probes.clear()
                if encoder is None:
                    cond = den.encode([prompts[j]])
                else:
                    cond, maps = encoder(den.token_ids([prompts[j]]))
                den.predict(x_t, t, cond)
                m = masks[j]
                # attention on the concept's tokens, every layer, head and pixel
                loss = torch.stack([attention_loss(p[..., m], cfg.attention_loss) for p in probes]).mean()
                if encoder is not None and later[j].any():
                    # and, inside the text encoder, the later positions' attention on them
                    enc = torch.stack([attention_loss(a[0][:, later[j]][..., own[j]], cfg.attention_loss) for a in maps]).mean()
                    loss = loss + cfg.encoder_attention_weight * enc
                if space is not None:
                    loss = loss + cfg.text_space_weight * space.penalty(params)
                if held_ctx is not None:
                    probes.clear()
                    den.predict(xs, ts, ctx)
                    # total-variation distance of every layer's attention from the base model's
                    drift = torch.stack([(p - g).abs().sum(-1).mean() for p, g in zip(probes, goal)]).mean()
                    loss = loss + cfg.preserve_weight * drift
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(attn=f"{loss.item():.4f}")
        finally:
            for h in hooks:
                h.remove()
            if encoder is not None:
                encoder.restore()
            unet.set_attn_processor(saved)
            bar.close()
