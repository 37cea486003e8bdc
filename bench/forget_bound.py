"""The best an attention-suppressing eraser can do on ConceptWorld: a bound for forget_me_not.

    python bench/forget_bound.py [--samples 64] [--out runs/forget_bound.json]

Forget-Me-Not (Zhang et al., 2023, arXiv:2303.17591) tunes the model so that cross-attention
puts no probability on the concept's tokens. Its ideal outcome can be computed without training:
every cross-attention layer of the *base* model samples with those positions' probabilities set
to zero and the rest renormalised, which is what a key projection that drives their scores to
minus infinity gives (the ``cross_attn_kv`` variant at zero loss; values, which the loss does
not reach, unchanged).

Masks as ``forget_me_not`` builds them for the bench's concepts (``bench/efficacy.py``): the
concept's own tokens (the paper), and with ``following_tokens`` also the end-of-text and padding
positions after them (a causal text encoder writes the concept into those). A key change that
silences a prompt's padding may silence the empty prompt's padding too (classifier-free
guidance's unconditional branch), so the second mask is measured at both ends: the empty prompt
untouched, and the empty prompt kept on its start token alone. Each of the efficacy bench's
erased prompts (target, two held-out paraphrases, the misspelling) is sampled with the same
seeds as there and judged.

Where the mask covers every position from the concept's first token on (a prompt that ends with
the concept: "dots", "a star"), the positions left are those before the concept, and a causal
encoder gives them the same encodings as in every other prompt that begins the same way ("a",
the start token), so no patch that keeps those prompts can change what they contribute: the
lower of the two ends is then the bound (``strict_bound``). A bound above the 10% bar means
attention re-steering cannot meet the bar on that prompt. On prompts with words after the
concept ("an image of zorblax, blank background") those words carry it too and are not masked,
so the figure there is no bound (a real patch's key change reaches them as well); the
misspelling's sub-word pieces are no token of the concept, so no mask touches it. Both are
printed as they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.methods.forget_me_not import attention_output, attention_probabilities  # noqa: E402


def _efficacy():
    spec = importlib.util.spec_from_file_location("bench_efficacy", ROOT / "bench" / "efficacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SuppressedAttention:
    """A cross-attention processor that zeroes the probabilities of the masked token positions
    for the conditional half of a classifier-free-guidance batch and renormalises the rest."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (tokens,) booleans, or None: plain attention
        self.empty_prompt_too = False  # also keep the unconditional half on its start token alone

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        probs, value = attention_probabilities(attn, hidden_states, encoder_hidden_states)
        if self.mask is not None and self.mask.any():
            probs = probs.view(batch, attn.heads, *probs.shape[1:]).clone()
            halves = [(slice(batch // 2, batch), self.mask)]
            if self.empty_prompt_too:
                halves.append((slice(0, batch // 2), torch.arange(len(self.mask)) > 0))
            for rows, mask in halves:
                part = probs[rows]
                part[..., mask] = 0
                probs[rows] = part / part.sum(-1, keepdim=True)
            probs = probs.flatten(0, 1)
        return attention_output(attn, probs, value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--concepts", default="zorblax,stripes,star,dots")
    parser.add_argument("--seed", type=int, default=0, help="the efficacy bench's seed (same samples)")
    parser.add_argument("--out", type=Path, default=Path("runs/forget_bound.json"))
    args = parser.parse_args(argv)

    from policies import load_policy_text
    from unlearn.denoiser import Denoiser
    from unlearn.engine import load_policy_pipelines
    from unlearn.evaluation import concept_attributes, judge_hits, misspell, paraphrases
    from unlearn.methods.forget_me_not import concept_token_mask, concept_words
    from unlearn.patch import cross_attention_layers

    eff = _efficacy()
    ids = args.concepts.split(",")
    policy = load_policy_text(eff.policy_text("forget-bound", ids, "forget_me_not", False), "<forget bound>")
    pipe = load_policy_pipelines(policy)["text_to_image"]
    pipe.set_progress_bar_config(disable=True)
    den = Denoiser(pipe)
    proc = SuppressedAttention()
    cross = cross_attention_layers(pipe.unet)
    pipe.unet.set_attn_processor({n: (proc if n.removesuffix(".processor") in cross else p) for n, p in pipe.unet.attn_processors.items()})

    results: dict = {"samples": args.samples, "concepts": {}}
    for concept in policy.spec.concepts:
        # one concept per policy in the efficacy bench: its prompts are numbered from concept index 0
        signature, _ = concept_attributes(concept)
        prompts = {"target": concept.target.text}
        prompts.update({f"paraphrase_{i + 1}": p for i, p in enumerate(paraphrases(concept, 2, args.seed))})
        prompts["misspelling"] = misspell(concept.target.text)
        words = concept_words(concept)
        rows = {}
        for j, (label, prompt) in enumerate(prompts.items()):
            row = {"prompt": prompt}
            for name, mask, empty in (("base", None, False), ("own_tokens", False, False), ("following_tokens", True, False), ("following_and_empty", True, True)):
                proc.mask = None if mask is None else concept_token_mask(den, [prompt], words, following=mask)[0].cpu()
                proc.empty_prompt_too = empty
                gen = torch.Generator().manual_seed(args.seed + j)
                images = pipe(prompt, num_images_per_prompt=args.samples, num_inference_steps=25, guidance_scale=5.0, generator=gen, output_type="np").images
                row[name] = judge_hits(images, signature)
            proc.mask, proc.empty_prompt_too = None, False
            following = concept_token_mask(den, [prompt], words, following=True)[0]
            row["strict"] = bool(following.any()) and bool(following[int(following.nonzero()[0]) :].all())
            rows[label] = row
            print(f"{concept.id:8s} {label:13s} {prompt!r:40s} base {row['base']:.2f}  own {row['own_tokens']:.2f}  following {row['following_tokens']:.2f}  +empty {row['following_and_empty']:.2f}{'  (strict)' if row['strict'] else ''}", flush=True)
        # a strict bound where the mask covers every position from the concept's first token on:
        # what is left are the positions before it, whose encodings (causal encoder) are those of
        # every other prompt with the same beginning, so no patch that keeps those prompts can move them
        strict = {label: r["strict"] for label, r in rows.items()}
        bounds = [min(r["following_tokens"], r["following_and_empty"]) for label, r in rows.items() if strict[label]]
        bound = max(bounds) if bounds else None
        results["concepts"][concept.id] = {
            "category": concept.category,
            "prompts": rows,
            "strict_bound": bound,
            "bar": 0.10,
            "reachable": None if bound is None else bound <= 0.10,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({cid: {k: v for k, v in r.items() if k != "prompts"} for cid, r in results["concepts"].items()}, indent=2))
    return results


if __name__ == "__main__":
    main()
