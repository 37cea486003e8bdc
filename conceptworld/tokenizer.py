"""A real CLIP tokenizer for ConceptWorld, built from a generated vocabulary and BPE merges.

The merges are learnt by running byte-pair encoding over the world's vocabulary (each word
once), so every vocabulary word becomes a single token while an unseen or misspelt word falls
apart into sub-word pieces, exactly as with the tokenizers of real text-to-image models.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

MODEL_MAX_LENGTH = 24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (as used by CLIP and GPT-2)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding over ``words`` until each word is one symbol; returns merges by rank."""
    table = bytes_to_unicode()
    segmented = []
    for w in sorted(set(words)):
        chars = [table[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        segmented.append(chars)
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in segmented:
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            return merges
        # the most frequent pair; ties broken alphabetically so the result is deterministic
        best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for i, symbols in enumerate(segmented):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            segmented[i] = out


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    table = bytes_to_unicode()
    base = [table[b] for b in range(256)]
    tokens = base + [t + "</w>" for t in base] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def build_tokenizer(words: list[str], out_dir: str | Path):
    """Write a ``CLIPTokenizer`` for ``words`` to ``out_dir`` (diffusers ``tokenizer/`` layout)."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
    tok.save_pretrained(out)
    return tok
