"""Per-request detection: prompt screening, triggered embeddings, concept-restoring embeddings.

- *prompt screening*: a policy's ``blocked_terms`` in the prompt, by exact phrase, by
  misspelling (edit distance) and by synonym (a vocabulary word whose text-encoder output is
  close to the term's; the synonym sets are computed once, when the guard is built);
- *triggered*: a user embedding's token together with one of the concept's ``triggers``
  (same matching) -- the serving-time side of backdoor censorship (Wu et al., 2023,
  "Backdooring Textual Inversion for Concept Censorship");
- *restoring*: an embedding whose conditioning -- the cross-attention values the patched UNet
  computes from it -- is close to the conditioning the *base* model computed for a removed
  concept, and closer to it than to the concept's anchor: the signature of concept inversion
  (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods"). Where the policy asks for
  a probe and a classifier is at hand, a short generation with the embedding decides instead:
  restoring when the classifier finds the concept in at least ``probe_threshold`` of the images
  (one generation serves every probed concept). The probe is the reliable test: on ConceptWorld
  the similarity signature alone does not tell attack embeddings from benign ones.

Embedding scans are cached by content hash, so a request pays for a scan once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from unlearn.denoiser import vocabulary_words
from unlearn.patch import cross_attention_layers

from .embeddings import TextualInversion, encode_prompt

ACTION_RANK = {"allow": 0, "flag": 1, "censor": 2, "block": 3}
_WORD = re.compile(r"[a-z0-9']+")


@dataclasses.dataclass(frozen=True)
class Reason:
    kind: str  # "blocked_term" | "trigger" | "restoring"
    concept: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    action: str
    reasons: tuple[Reason, ...] = ()

    @property
    def concepts(self) -> list[str]:
        return sorted({r.concept for r in self.reasons})

    def to_dict(self) -> dict:
        return {"action": self.action, "reasons": [dataclasses.asdict(r) for r in self.reasons]}


def edit_distance(a: str, b: str, cap: int = 3) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance, stopping early past ``cap``."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > cap:
            return cap + 1
        prev2, prev = prev, cur
    return prev[-1]


SIGNATURE_VERSION = "1"  # bump when _text_signature changes
MAX_SYNONYMS = 12  # a term closer than the threshold to more words than this has no usable synonyms


class TermMatcher:
    """Finds a set of terms in prompts: exact phrases, misspellings, and synonyms."""

    def __init__(self, terms: Sequence[str], synonyms: dict[str, set[str]], max_edit: int):
        self.terms = [tuple(_WORD.findall(t.lower())) for t in terms]
        self.synonyms = synonyms  # single-word term -> words with a close text-encoder output
        self.max_edit = max_edit

    def _word_hit(self, term: str, word: str) -> str | None:
        if word == term:
            return "exact"
        if word in self.synonyms.get(term, ()):
            return f"synonym of {term!r}"
        if self.max_edit and len(term) >= 5 and edit_distance(word, term, self.max_edit) <= self.max_edit:
            return f"misspelling of {term!r}"
        return None

    def find(self, words: Sequence[str]) -> list[str]:
        hits = []
        for term in self.terms:
            n = len(term)
            for i in range(len(words) - n + 1):
                kinds = [self._word_hit(t, w) for t, w in zip(term, words[i : i + n])]
                if all(kinds):
                    how = next((k for k in kinds if k != "exact"), "exact")
                    hits.append(f"{' '.join(words[i:i + n])!r} ({how})" if how != "exact" else repr(" ".join(term)))
                    break
        return hits


class Guard:
    """Screens requests for the concepts of a policy whose ``guard`` is enabled.

    ``pipe`` is the pipeline as served (patches in force) and ``stack`` its
    :class:`~unlearn.patch.PatchStack`; the base model's conditioning for each concept is
    computed once here, with the patches lifted for the duration.
    """

    def __init__(self, policy, pipe, stack=None, *, probe: Callable | None = None, cache_dir: str | Path | None = None):
        self.pipe = pipe
        self.concepts = [c for c in policy.spec.concepts if c.guard is not None and c.guard.enabled]
        self.probe = probe
        self._scans: dict[str, tuple[Reason, ...]] = {}
        self._lock = threading.Lock()
        self.vocab_words = self._vocabulary_words()
        self.matchers = {}
        self.undistinguished: dict[str, int] = {}  # term -> words it is not told apart from
        with torch.no_grad():
            word_sigs = self._cached_word_signatures(cache_dir) if self.concepts else None
            # centre on the vocabulary's mean: what all words share says nothing about meaning
            self._centre = word_sigs.mean(0) if word_sigs is not None and len(word_sigs) else None
            if self._centre is not None:
                word_sigs = torch.nn.functional.normalize(word_sigs - self._centre, dim=-1)
            for c in self.concepts:
                terms = list(dict.fromkeys([*c.guard.triggers, *c.guard.blocked_terms]))
                syn = self._synonyms(terms, word_sigs, c.guard.synonym_similarity)
                self.matchers[c.id] = (
                    TermMatcher(c.guard.triggers, syn, c.guard.max_edit_distance),
                    TermMatcher(c.guard.blocked_terms, syn, c.guard.max_edit_distance),
                )
            self.base_signatures = self._base_signatures(stack)

    # ---- text-encoder similarity -------------------------------------------------------------
    def _vocabulary_words(self) -> list[str]:
        return vocabulary_words(self.pipe.tokenizer, min_chars=3)

    def _cached_word_signatures(self, cache_dir: str | Path | None) -> torch.Tensor:
        """The vocabulary's signatures, kept in ``cache_dir`` (keyed by the base text encoder's
        fingerprint and the word list) so that a replica restart does not recompute them."""
        if cache_dir is None:
            return self._word_signatures(self.vocab_words)
        from safetensors.torch import load_file, save_file

        from unlearn.patch import fingerprint

        h = hashlib.sha256(f"{SIGNATURE_VERSION}|{fingerprint(self.pipe.text_encoder)}|".encode())
        h.update("\n".join(self.vocab_words).encode())
        path = Path(cache_dir) / "guard" / f"words-{h.hexdigest()[:32]}.safetensors"
        try:
            sigs = load_file(str(path))["signatures"]
            if sigs.shape[0] == len(self.vocab_words):
                return sigs
        except Exception:  # absent or unreadable: recompute and rewrite
            pass
        sigs = self._word_signatures(self.vocab_words)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"signatures": sigs.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return sigs

    def _word_signatures(self, words: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(words), 256):
            out.append(self._text_signature(words[i : i + 256]))
        return torch.cat(out) if out else torch.zeros(0)

    def _text_signature(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean text-encoder output over each text's content tokens and EOS (not normalised)."""
        tok = self.pipe.tokenizer
        ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        h = self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0].float().cpu()
        eos = (ids == tok.eos_token_id).int().argmax(1)
        mask = (torch.arange(ids.shape[1])[None] >= 1) & (torch.arange(ids.shape[1])[None] <= eos[:, None])
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def _synonyms(self, terms: Sequence[str], word_sigs, threshold: float) -> dict[str, set[str]]:
        single = [t.lower() for t in terms if len(_WORD.findall(t.lower())) == 1]
        if not single or word_sigs is None or not len(word_sigs):
            return {}
        sims = torch.nn.functional.normalize(self._text_signature(single) - self._centre, dim=-1) @ word_sigs.T
        out: dict[str, set[str]] = {}
        for i, t in enumerate(single):
            close = {self.vocab_words[j] for j in torch.nonzero(sims[i] >= threshold).flatten().tolist()} - {t}
            if len(close) > MAX_SYNONYMS:
                # the encoder does not tell this term apart from much of its vocabulary (a word it
                # never learnt): its "synonyms" would be noise, so it is matched by spelling only
                self.undistinguished[t] = len(close)
                continue
            out[t] = close
        return out

    # ---- conditioning signatures (restoring) --------------------------------------------------
    def _value_layers(self) -> list[torch.nn.Module]:
        return [m.to_v for m in cross_attention_layers(self.pipe.unet).values()]

    def _conditioning(self, prompt_embeds: torch.Tensor, length: int) -> torch.Tensor:
        """Cross-attention values over the content tokens and EOS, all layers, unit norm."""
        h = prompt_embeds[0, 1 : length + 1]
        parts = [layer(h.to(layer.weight.dtype)).float().mean(0) for layer in self._value_layers()]
        return torch.nn.functional.normalize(torch.cat(parts).cpu(), dim=0)

    def _prompt_conditioning(self, prompt: str, embeddings: Sequence[TextualInversion] = ()) -> torch.Tensor:
        from .embeddings import _placeholder_ids

        ids, _ = _placeholder_ids(self.pipe.tokenizer, prompt, embeddings)
        length = int((ids[0] == self.pipe.tokenizer.eos_token_id).int().argmax())
        return self._conditioning(encode_prompt(self.pipe, prompt, embeddings), length)

    def _base_signatures(self, stack) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # concepts decided by a probe need no signature: computing theirs would only slow start-up
        wanted = [c for c in self.concepts if c.guard.detect_restoring and not (self.probe and c.guard.probe_samples)]
        if not wanted:
            return {}
        applied = list(stack.applied) if stack is not None else []
        if stack is not None:
            stack.remove_all()
        try:
            return {c.id: (self._prompt_conditioning(c.target.text), self._prompt_conditioning(c.anchor)) for c in wanted}
        finally:
            if stack is not None:
                stack.apply_all(applied)

    # ---- checks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def scan_embedding(self, ti: TextualInversion) -> tuple[Reason, ...]:
        """Reasons this embedding restores a removed concept (cached by content hash)."""
        key = hashlib.sha256(ti.token.encode() + ti.vectors.numpy().tobytes()).hexdigest()
        with self._lock:
            if key in self._scans:
                return self._scans[key]
        reasons = []
        probed = [c for c in self.concepts if c.guard.detect_restoring and c.guard.probe_samples] if self.probe else []
        if probed:
            # one probe generation for every concept that asks for it, judged per concept
            rates = self.probe(ti, probed)
            for c in probed:
                if rates[c.id] >= c.guard.probe_threshold:
                    reasons.append(Reason("restoring", c.id, f"embedding {ti.token!r} draws {c.target.text!r} in {rates[c.id]:.0%} of a probe generation"))
        probed_ids = {c.id for c in probed}
        unprobed = [c for c in self.concepts if c.id in self.base_signatures and c.id not in probed_ids]
        if unprobed:
            sig = self._prompt_conditioning(ti.token, [ti])
            for c in unprobed:
                target, anchor = self.base_signatures[c.id]
                s_t, s_a = float(sig @ target), float(sig @ anchor)
                if s_t >= c.guard.restoring_similarity and s_t > s_a:
                    reasons.append(Reason("restoring", c.id, f"embedding {ti.token!r} conditions like {c.target.text!r} (similarity {s_t:.2f} vs anchor {s_a:.2f})"))
        with self._lock:
            self._scans[key] = tuple(reasons)
        return tuple(reasons)

    def check(self, prompt: str, embeddings: Sequence[TextualInversion] = ()) -> Verdict:
        words = _WORD.findall(prompt.lower())
        reasons: list[Reason] = []
        present = [e for e in embeddings if e.token in prompt]
        for c in self.concepts:
            trig, blocked = self.matchers[c.id]
            for hit in blocked.find(words):
                reasons.append(Reason("blocked_term", c.id, f"prompt contains {hit}"))
            if present:
                for hit in trig.find(words):
                    reasons.append(Reason("trigger", c.id, f"embedding {present[0].token!r} used with trigger {hit}"))
        for e in embeddings:
            reasons.extend(self.scan_embedding(e))
        if not reasons:
            return Verdict("allow")
        actions = {c.id: c.guard.action for c in self.concepts}
        action = max((actions[r.concept] for r in reasons), key=ACTION_RANK.__getitem__)
        return Verdict(action, tuple(reasons))
