"""A patched model: the core of a model replica, independent of Ray so it can be tested alone.

It loads one base pipeline of a policy (text-to-image or text-to-video), takes the policy's
patches from the shared cache (building the missing ones once per cluster: builders of the same
patch wait on one lock), applies and verifies them (base fingerprints, tensor checks, and a
probe that the patched model answers the target prompt differently from the base), and only
then reports ready. A new policy is built off the request path and swapped in atomically; if
anything fails, the old policy keeps serving.
"""

from __future__ import annotations

import base64
import copy
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from policies import Policy, load_policy_text
from unlearn import PatchCache, PatchError, PatchStack, apply_patches, build_patches, pipeline_components, require_all_applied
from unlearn.engine import SCOPE_MODELS, load_pipeline

from .traced import trace_pipeline

logger = logging.getLogger("conceptguard.serve")

KINDS = ("text_to_image", "text_to_video")
PROBE_STEPS = 20  # denoising steps of a guard probe generation


class NotReadyError(RuntimeError):
    """The replica has no verified policy in force; it must not serve."""


@dataclass
class PatchInfo:
    patch_id: str
    method: str
    concepts: list[str]
    source: str  # "built" or "cache"
    seconds: float


@dataclass
class ActivePolicy:
    policy: Policy
    stack: PatchStack
    patches: list[PatchInfo]
    applied_at: float
    build_seconds: float
    apply_seconds: float
    guard: object = None  # guard.detect.Guard for the concepts with a guard section

    def describe(self) -> dict:
        return {
            "name": self.policy.metadata.name,
            "version": self.policy.metadata.version,
            "fingerprint": self.policy.fingerprint()[:16],
            "concepts": [c.id for c in self.policy.spec.concepts],
            "patches": [p.__dict__ for p in self.patches],
            "applied_at": self.applied_at,
            "build_seconds": round(self.build_seconds, 3),
            "apply_seconds": round(self.apply_seconds, 3),
        }


@dataclass
class Stats:
    """Counters a replica reports to the metrics endpoint."""

    generations: int = 0
    generation_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


class PatchedModel:
    def __init__(
        self,
        kind: str,
        policy_yaml: str,
        *,
        source_name: str = "<policy>",
        cache_dir: str | None = None,
        device: str | None = None,
        seed: int = 0,
        trace_denoiser: bool | None = None,
    ):
        """``trace_denoiser``: replay the denoiser through TorchScript traces (:mod:`serve.traced`:
        same outputs, faster on a CPU); ``None`` means yes when the pipeline runs on a CPU."""
        if kind not in KINDS:
            raise ValueError(f"Got {kind!r} for kind. It must be one of {KINDS}.")
        self.kind = kind
        self.device = device
        self.seed = seed
        self.cache = PatchCache(cache_dir)
        self.lock = threading.RLock()
        self.stats = Stats()
        self.active: ActivePolicy | None = None
        self.last_error: str | None = None
        policy = load_policy_text(policy_yaml, source_name)
        source = policy.spec.models.present().get(kind)
        if source is None:
            raise PatchError(f"Policy {policy.metadata.name!r} has no spec.models.{kind}; this replica has nothing to serve.")
        self.source = source
        self.pipe = load_pipeline(kind, source, device)
        self.active = self._prepare(policy, self.pipe)
        if trace_denoiser is None:
            trace_denoiser = self.pipe.device.type == "cpu"
        self.tracer = trace_pipeline(self.pipe) if trace_denoiser else None

    # ---- building and applying ------------------------------------------------------------------
    def _builder(self, policy: Policy, pipe):
        """Text-encoder patches are learnt on the policy's image model, as the method prescribes,
        even in a video replica; the image model is loaded only on a cache miss. Every other
        job is built on ``pipe`` (which holds the base weights)."""
        loaded: dict = {}

        def pick(job):
            if job.method == "text_encoder" and self.kind == "text_to_video" and "text_to_image" in policy.spec.models.present():
                if "pipe" not in loaded:
                    loaded["pipe"] = load_pipeline("text_to_image", policy.spec.models.text_to_image, self.device)
                return loaded["pipe"]
            return pipe

        return pick

    def _prepare(self, policy: Policy, pipe) -> ActivePolicy:
        """Build/fetch, apply and verify every patch ``policy`` requires on the unpatched ``pipe``."""
        built = build_patches(policy, {self.kind: pipe}, self.cache, seed=self.seed, progress=False, builder=self._builder(policy, pipe))
        return self._apply_built(policy, built)

    def _concepts_in_scope(self, policy: Policy) -> list:
        return [c for c in policy.spec.concepts if self.kind in SCOPE_MODELS[c.scope]]

    @torch.no_grad()
    def _probe_inputs(self, policy: Policy, pipe) -> dict[str, torch.Tensor]:
        """The base model's noise prediction for each concept's target, at a fixed noisy input."""
        from unlearn.denoiser import Denoiser

        den = Denoiser(pipe, seed=1234)
        shape = (1, pipe.unet.config.in_channels, *( (2,) if den.is_video else ()), pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1234)).to(den.device, pipe.unet.dtype)
        t = torch.tensor([500], device=den.device)
        self._probe_x = (x, t)
        return {c.id: den.predict(x, t, den.encode([c.target.text])) for c in self._concepts_in_scope(policy)}

    @torch.no_grad()
    def _probe(self, policy: Policy, pipe, baseline: dict[str, torch.Tensor]) -> None:
        """Fail closed unless the patched model answers every target differently from the base."""
        from unlearn.denoiser import Denoiser

        den = Denoiser(pipe, seed=1234)
        x, t = self._probe_x
        for c in self._concepts_in_scope(policy):
            out = den.predict(x, t, den.encode([c.target.text]))
            if not torch.isfinite(out).all():
                raise PatchError(f"Probe failed for concept {c.id!r}: the patched model produces non-finite values.")
            if torch.equal(out, baseline[c.id]):
                raise PatchError(f"Probe failed for concept {c.id!r}: the patched model answers its target exactly as the base model does.")

    def update_policy(self, policy_yaml: str, source_name: str = "<policy update>") -> dict:
        """Build the new policy's patches off the request path, then swap atomically.

        On any error the old policy stays in force and the error is raised.
        """
        policy = load_policy_text(policy_yaml, source_name)  # an invalid policy never replaces a valid one
        new_source = policy.spec.models.present().get(self.kind)
        if new_source is None or new_source != self.source:
            raise PatchError(f"Policy {policy.metadata.name!r} v{policy.metadata.version} changes spec.models.{self.kind}; a new base model needs a new deployment.")
        # Patches are built on a copy holding the base weights, so requests keep running meanwhile.
        with self.lock:
            builder = copy.deepcopy(self.pipe)
            if self.active is not None:
                comps = pipeline_components(builder)
                for key, original in self.active.stack.originals().items():
                    component, name = key.split("/", 1)
                    dict(comps[component].named_parameters())[name].data.copy_(original)
        models = {self.kind: builder}
        built = build_patches(policy, models, self.cache, seed=self.seed, progress=False, builder=self._builder(policy, builder))
        del builder, models
        with self.lock:  # waits for the generation in flight, then swaps in milliseconds
            old = self.active
            old_patches = list(old.stack.applied) if old else []
            if old is not None:
                old.stack.remove_all()
            try:
                self.active = self._apply_built(policy, built)
            except Exception as e:
                self.last_error = f"policy {policy.metadata.name} v{policy.metadata.version} rejected: {e}"
                if old is not None:
                    old.stack.apply_all(old_patches)
                    self.active = old
                raise
            self.last_error = None
            return self.active.describe()

    def _apply_built(self, policy: Policy, built) -> ActivePolicy:
        t0 = time.perf_counter()
        baseline = self._probe_inputs(policy, self.pipe)
        guard = self._make_guard(policy)  # reads the base model's conditioning: before any patch
        models = {self.kind: self.pipe}
        stacks = apply_patches(models, built)
        try:
            require_all_applied(policy, models, stacks)
            self._probe(policy, self.pipe, baseline)
        except Exception:
            stacks[self.kind].remove_all()
            raise
        infos = [PatchInfo(b.patch.patch_id, b.job.method, [c.id for c in b.job.concepts], "built" if b.built else "cache", round(b.seconds, 3)) for b in built]
        return ActivePolicy(policy, stacks[self.kind], infos, time.time(), sum(b.seconds for b in built), time.perf_counter() - t0, guard)

    def _make_guard(self, policy: Policy):
        """The guard of ``policy``, built while ``self.pipe`` still holds its base weights."""
        from guard.detect import Guard

        if not any(c.guard is not None and c.guard.enabled for c in policy.spec.concepts):
            return None
        probe = self._judge_probe if (self.kind == "text_to_image" and self.source.builtin == "conceptworld") else None
        return Guard(policy, self.pipe, probe=probe, cache_dir=self.cache.root)

    def _judge_probe(self, ti, concepts) -> dict[str, float]:
        """Images of the embedding's token alone, judged by ConceptWorld's judge: per concept, the
        share of images that show it."""
        from guard.embeddings import encode_prompt
        from unlearn.evaluation import concept_attributes, judge_rate, judge_rows

        n = max(c.guard.probe_samples for c in concepts)
        emb = encode_prompt(self.pipe, ti.token, [ti]).repeat(n, 1, 1)
        neg = encode_prompt(self.pipe, "").repeat(n, 1, 1)
        images = self.pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=PROBE_STEPS, generator=torch.Generator().manual_seed(0), output_type="np").images
        rows = judge_rows(images)
        return {c.id: judge_rate(rows[: c.guard.probe_samples], concept_attributes(c)[0]) for c in concepts}

    @property
    def guard(self):
        return self.active.guard if self.active else None

    # ---- serving ----------------------------------------------------------------------------------
    def info(self) -> dict:
        return {
            "kind": self.kind,
            "ready": self.active is not None,
            "policy": self.active.describe() if self.active else None,
            "last_error": self.last_error,
            "generations": self.stats.generations,
            "generation_seconds": round(self.stats.generation_seconds, 4),
            "denoiser": {"traced": self.tracer is not None, **({"calls": dict(self.tracer.calls), "traces": self.tracer.traces, "conv_kernels": sorted(set(self.tracer.kernels.values()))} if self.tracer else {})},
        }

    def _embeddings(self, request: dict) -> list:
        """The request's textual-inversion embeddings, loaded safely (raises EmbeddingRejected)."""
        from guard.embeddings import load_embedding

        out = []
        for i, e in enumerate(request.get("embeddings") or []):
            out.append(load_embedding(base64.b64decode(e["data"]), self.pipe.tokenizer, self.pipe.text_encoder, token=e.get("token"), name=e.get("name") or f"embeddings[{i}]"))
        return out

    def scan(self, embedding: dict, prompt: str | None = None) -> dict:
        """Offline review of one embedding: load it safely and run the guard on it."""
        from guard.detect import Verdict
        from guard.embeddings import EmbeddingRejected

        try:
            (ti,) = self._embeddings({"embeddings": [embedding]})
        except EmbeddingRejected as e:
            return {"accepted": False, "reason": str(e)}
        with self.lock:
            verdict = self.guard.check(prompt or ti.token, [ti]) if self.guard else Verdict("allow")
        return {"accepted": True, "token": ti.token, "format": ti.source_format, "vectors": ti.num_vectors, "verdict": verdict.to_dict()}

    def generate(self, requests: list[dict]) -> list[dict]:
        """Run a batch of compatible requests (same steps, guidance, size, frames) in one call.

        Each request: prompt, negative_prompt, n, steps, guidance, seed, width, height,
        optional embeddings (+ num_frames for video). Every request is screened by the guard
        first: a blocked one gets its reasons, a censored one the censor card; the others are
        generated together, each with its own embeddings (never shared with the others).
        """
        from guard.detect import Verdict
        from guard.embeddings import EmbeddingRejected, encode_prompt
        from guard.ti import censor_card

        if not requests:
            return []
        first = requests[0]
        results: list[dict] = [{"arrays": [], "guard": Verdict("allow").to_dict()} for _ in requests]
        with self.lock:
            if self.active is None:
                raise NotReadyError(self.last_error or "no policy in force")
            name, version = self.active.policy.metadata.name, self.active.policy.metadata.version
            todo = []
            for i, r in enumerate(requests):
                t0 = time.perf_counter()
                try:
                    embeddings = self._embeddings(r)
                except EmbeddingRejected as e:
                    results[i].update(error=str(e), status=400)
                    continue
                verdict = self.guard.check(r["prompt"], embeddings) if self.guard else Verdict("allow")
                results[i]["guard"] = verdict.to_dict()
                results[i]["guard_seconds"] = time.perf_counter() - t0
                if verdict.action == "block":
                    results[i].update(error="blocked by policy: " + "; ".join(x.detail for x in verdict.reasons), status=403)
                elif verdict.action == "censor":
                    size = r["width"] or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
                    card = censor_card(r["n"] * (r.get("num_frames") or 1), size)
                    results[i]["arrays"] = list(card.reshape(r["n"], -1, size, size, 3)) if self.kind == "text_to_video" else list(card)
                else:
                    todo.append((i, embeddings))
            t0 = time.perf_counter()
            if todo:
                pos, neg, generators, owners = [], [], [], []
                for i, embeddings in todo:
                    r = requests[i]
                    p = encode_prompt(self.pipe, r["prompt"], embeddings)
                    q = encode_prompt(self.pipe, r.get("negative_prompt") or "", embeddings)
                    for k in range(r["n"]):
                        pos.append(p)
                        neg.append(q)
                        generators.append(torch.Generator().manual_seed(r["seed"] + k))
                        owners.append(i)
                kwargs = dict(
                    prompt_embeds=torch.cat(pos),
                    negative_prompt_embeds=torch.cat(neg),
                    num_inference_steps=first["steps"],
                    guidance_scale=first["guidance"],
                    generator=generators,
                    width=first["width"],
                    height=first["height"],
                    output_type="np",
                )
                if self.kind == "text_to_video":
                    out = np.asarray(self.pipe(num_frames=first["num_frames"], **kwargs).frames)
                else:
                    out = self.pipe(**kwargs).images
                for owner, arr in zip(owners, out):
                    results[owner]["arrays"].append(arr)
            dt = time.perf_counter() - t0
        self.stats.generations += 1
        self.stats.generation_seconds += dt
        self.stats.batch_sizes.append(len(requests))
        for res in results:
            res.update(policy=name, policy_version=version, generation_seconds=dt, batch_size=len(requests))
        return results
