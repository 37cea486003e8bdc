"""The method interface and registry: one registered class per method, one shared build path.

A method trains (or edits) some parameters of a pipeline in place; :meth:`UnlearnMethod.build`
snapshots them first, turns the change into a :class:`~unlearn.patch.Patch` and always restores
the weights afterwards, so building never leaves a half-changed model behind (an interrupt
included) and a patch only takes effect through :class:`~unlearn.patch.PatchStack`.
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from ..denoiser import Denoiser, vocabulary_words
from ..patch import PARAMETER_GROUPS, Patch, PatchError, PatchMetadata, fingerprint, pipeline_components, project_version, select_parameters

_REGISTRY: dict[str, type["UnlearnMethod"]] = {}


def register_method(cls: type["UnlearnMethod"]) -> type["UnlearnMethod"]:
    """Class decorator adding a method to the registry; names must be unique."""
    name = cls.name
    if not name or name in _REGISTRY:
        raise ValueError(f"Cannot register method {name!r}: {'it is already registered' if name else 'it has no name'}.")
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type["UnlearnMethod"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PatchError(f"Got {name!r} for method. Known methods: {sorted(_REGISTRY)}.") from None


def registered_methods() -> dict[str, type["UnlearnMethod"]]:
    return dict(_REGISTRY)


class UnlearnMethod(abc.ABC):
    """Base class: subclasses set ``name`` and implement :meth:`edit`."""

    name: ClassVar[str] = ""
    #: whether several concepts are removed in one edit (their patches are one file)
    multi_concept: ClassVar[bool] = False

    def __init__(self, config):
        if getattr(config, "name", None) != self.name:
            raise PatchError(f"Got a {type(config).__name__} for method {self.name!r}; pass its own config.")
        self.config = config

    @property
    def parameter_group(self) -> str:
        return self.config.parameter_group

    @abc.abstractmethod
    def edit(self, den: Denoiser, concepts: Sequence, params: Mapping[str, nn.Parameter], *, progress: bool) -> None:
        """Change ``params`` in place so that ``concepts`` are removed."""

    def build(self, pipe, concepts: Sequence, *, seed: int = 0, progress: bool = True) -> Patch:
        """Run the method on ``pipe`` for ``concepts`` and return the change as a patch.

        The pipeline's weights are the same before and after this call.
        """
        if not concepts:
            raise PatchError(f"Method {self.name!r} was given no concept.")
        if len(concepts) > 1 and not self.multi_concept:
            raise PatchError(f"Method {self.name!r} removes one concept per patch; got {len(concepts)}.")
        components = pipeline_components(pipe)
        params = select_parameters(components, self.parameter_group)
        touched = sorted({k.split("/", 1)[0] for k in params})
        fingerprints = {c: fingerprint(components[c]) for c in touched}
        before = {k: p.detach().clone() for k, p in params.items()}
        grad_state = {n: p.requires_grad for c in components.values() for n, p in c.named_parameters(prefix=str(id(c)))}
        modes = {c: m.training for c, m in components.items()}
        torch.manual_seed(seed)
        start = time.perf_counter()
        try:
            for m in components.values():
                m.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            self.edit(Denoiser(pipe, seed=seed), concepts, params, progress=progress)
            metadata = PatchMetadata(
                method=self.name,
                options=self.config.model_dump(mode="json"),
                concepts=tuple(c.id for c in concepts),
                concept_hashes=tuple(c.spec_hash() for c in concepts),
                base_fingerprints=fingerprints,
                version=project_version(),
                build_seconds=round(time.perf_counter() - start, 3),
            )
            return Patch.from_weights(before, params, metadata)
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(before[k])
            for c in components.values():
                for n, p in c.named_parameters(prefix=str(id(c))):
                    p.requires_grad_(grad_state[n])
            for c, m in components.items():
                m.train(modes[c])
                m.zero_grad(set_to_none=True)


def target_prompts(concept) -> list[str]:
    """The target's canonical text followed by its other phrasings."""
    return [concept.target.text, *concept.target.phrasings]


def preserve_prompts(concepts: Sequence) -> list[str]:
    """The concepts' preserve prompts, less any that names a target of these same concepts (an
    edit that erases a concept cannot also hold a prompt asking for it fixed)."""
    targets = [t.lower() for concept in concepts for t in target_prompts(concept)]
    return [p for concept in concepts for p in concept.preserve if not any(re.search(rf"\b{re.escape(t)}\b", p.lower()) for t in targets)]


def random_prompts(den: Denoiser, concepts: Sequence, n: int, *, seed: int) -> list[str]:
    """``n`` prompts of 1-5 random vocabulary words, none of them a word of the concepts' targets."""
    if n <= 0:
        return []
    banned = {w for concept in concepts for p in target_prompts(concept) for w in re.findall(r"[a-z]+", p.lower())}
    words = [w for w in vocabulary_words(den.tokenizer) if w not in banned]
    if not words:
        return []
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=gen).tolist()
    return [" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=gen).tolist()) for k in lengths]


def context_pairs(den: Denoiser, concept, n: int, *, seed: int) -> list[tuple[str, str]]:
    """``n`` (target caption, anchor caption) pairs: a phrasing of the target and the anchor in
    the same context of random vocabulary words, split before and after at a random point."""
    return [(t, a) for t, a, _ in context_triples(den, concept, n, seed=seed)]


def context_triples(den: Denoiser, concept, n: int, *, seed: int) -> list[tuple[str, str, str]]:
    """:func:`context_pairs` with the context that follows the phrase: (target, anchor, after)."""
    phrasings = target_prompts(concept)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, ctx in enumerate(random_prompts(den, [concept], n, seed=seed)):
        words = ctx.split()
        cut = int(torch.randint(0, len(words) + 1, (1,), generator=gen))
        before, after = " ".join(words[:cut]), " ".join(words[cut:])
        phrase = phrasings[i % len(phrasings)]
        out.append((" ".join(filter(None, [before, phrase, after])), " ".join(filter(None, [before, concept.anchor, after])), after))
    return out


def aligned_pairs(den: Denoiser, target: str, anchor: str, after: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings of ``target`` and the anchor embeddings they are mapped onto.

    ``target`` and ``anchor`` are the same prompt with the concept's phrase in one and the
    anchor's in the other, followed by the same context ``after`` (empty for a bare phrasing).
    The words both share before the phrase encode identically (the encoder is causal) and are
    left out. The target phrase's words are mapped onto the anchor phrase's last word, which
    carries the whole anchor, so the concept's word is erased wherever it stands. The context
    after the phrase and the end-of-text token are mapped onto the anchor's, word for word. The
    padding that follows (which a causal encoder also fills with the phrase's meaning) is mapped
    onto the anchor's padding at the *same position*, or onto its end-of-text token where the
    anchor's words still run: a padding encoding carries its position too, and a shift by the
    length difference would ask one linear map to move the same positions by different amounts
    for phrasings of different lengths (measured on ConceptWorld: the edit then moved a style's
    phrasings only about a third of the way onto the anchor; aligned by position, about 70%).
    """
    emb = den.encode([target, anchor])
    t_pos, a_pos = aligned_positions(den, target, anchor, after, emb.shape[1])
    return emb[0, t_pos], emb[1, a_pos]


def aligned_positions(den: Denoiser, target: str, anchor: str, after: str = "", length: int | None = None) -> tuple[list[int], list[int]]:
    """The token positions of :func:`aligned_pairs`: ``(target positions, anchor positions)``."""
    length = length or den.tokenizer.model_max_length
    t_ids, a_ids = (den.tokenizer(p, add_special_tokens=False).input_ids for p in (target, anchor))
    suffix = len(den.tokenizer(after, add_special_tokens=False).input_ids) if after else 0
    prefix = 0
    while prefix < min(len(t_ids), len(a_ids)) - suffix and t_ids[prefix] == a_ids[prefix]:
        prefix += 1
    # positions (BOS at 0): the target phrase is [start, end_t), the anchor's ends at end_a; the
    # context and EOS follow (suffix + 1 tokens), then padding
    end_t, end_a = 1 + len(t_ids) - suffix, 1 + len(a_ids) - suffix
    start = min(1 + prefix, end_t - 1)
    pairs = [(p, end_a - 1) for p in range(start, end_t)]
    for p in range(end_t, length):
        q = p - end_t + end_a  # context and EOS: the same offset after the phrase
        pairs.append((p, q if q <= end_a + suffix else max(p, end_a + suffix)))  # padding: the same position
    t_pos, a_pos = zip(*[(p, q) for p, q in pairs if q < length])
    return list(t_pos), list(a_pos)


def typo_variants(phrase: str, words: set[str] = frozenset()) -> list[str]:
    """Misspellings of ``phrase``: each of its words of at least four letters with one letter
    dropped or two neighbouring letters swapped, one change per variant. A variant that spells
    one of ``words`` (the tokenizer's other vocabulary words) is left out: it names something else."""
    out: list[str] = []
    tokens = phrase.split()
    for i, w in enumerate(tokens):
        if len(w) < 4 or not w.isalpha():
            continue
        edits = {w[:k] + w[k + 1 :] for k in range(len(w))} | {w[:k] + w[k + 1] + w[k] + w[k + 2 :] for k in range(len(w) - 1)}
        out += [" ".join([*tokens[:i], e, *tokens[i + 1 :]]) for e in sorted(edits - {w}) if e.lower() not in words]
    return list(dict.fromkeys(out))


def target_typo_variants(den: Denoiser, concept) -> list[str]:
    """:func:`typo_variants` of the concept's canonical text, less those that spell another word
    of the tokenizer's vocabulary (the words of the concept's own phrasings are not counted)."""
    words = set(vocabulary_words(den.tokenizer)) - {w for p in target_prompts(concept) for w in p.lower().split()}
    return typo_variants(concept.target.text, words)


class TextSpace:
    """A penalty on how much fine-tuned cross-attention key/value projections change their
    outputs over the rest of the text space: the concepts' preserve prompts and ``n`` random
    vocabulary prompts, every position. This is the preservation term of closed-form editors
    (UCE, Gandikota et al., WACV 2024) used as a regulariser of gradient steps, so that the edit
    goes into the directions only the target's tokens use. ``None`` from :meth:`build` when no
    fine-tuned parameter reads the text."""

    def __init__(self, gram: torch.Tensor, base: dict[str, torch.Tensor]):
        self.gram, self.base = gram, base

    @classmethod
    @torch.no_grad()
    def build(cls, den: Denoiser, concepts: Sequence, params: Mapping[str, nn.Parameter], n: int) -> "TextSpace | None":
        kv = re.compile(PARAMETER_GROUPS["cross_attn_kv"][1])
        base = {k: p.detach().clone() for k, p in params.items() if kv.search(k)}
        prompts = preserve_prompts(concepts) + random_prompts(den, concepts, n, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=den.generator)))
        if not base or not prompts:
            return None
        rows = den.encode_many(prompts).flatten(0, 1)
        return cls(rows.T @ rows / len(rows), base)

    def penalty(self, params: Mapping[str, nn.Parameter]) -> torch.Tensor:
        """Sum over the projections of the mean ``||(W - W0) c||^2`` over the text-space rows ``c``."""
        deltas = (params[k] - w0 for k, w0 in self.base.items())
        return sum(torch.sum((d @ self.gram) * d) for d in deltas)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
