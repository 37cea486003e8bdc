"""From a policy to patched pipelines: plan the builds, fetch or build each patch, apply them.

The plan is model-agnostic: it reads diffusers component names only. Per model in a concept's
scope it builds one patch, except that

- a ``text_encoder`` patch is built once, on the first model of its scope, and applied to every
  model of the scope whose text encoder has the same weights (an image model and a video model
  sharing an encoder share the patch);
- all ``closed_form`` concepts with the same options are removed in one edit per model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping

from .cache import PatchCache, cache_key
from .methods import get_method
from .patch import Patch, PatchError, PatchStack, fingerprint, pipeline_components, project_version, select_parameters

logger = logging.getLogger(__name__)

MODEL_KEYS = ("text_to_image", "text_to_video")
SCOPE_MODELS = {"image": ("text_to_image",), "video": ("text_to_video",), "both": MODEL_KEYS}


def load_pipeline(key: str, source, device: str | None = None):
    """Load one model of a policy: the bundled ConceptWorld model or a diffusers folder/hub id."""
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[source.dtype]
    if source.builtin == "conceptworld":
        import conceptworld

        pipe = conceptworld.load_t2i(torch_dtype=dtype) if key == "text_to_image" else conceptworld.load_t2v(torch_dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(source.source, revision=source.revision, torch_dtype=dtype)
    if device:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_policy_pipelines(policy, device: str | None = None) -> dict:
    return {key: load_pipeline(key, src, device) for key, src in policy.spec.models.present().items()}


@dataclasses.dataclass
class BuildJob:
    method: str
    config: object
    concepts: list
    model: str  # the model the patch is built on
    applies_to: list[str]  # the models it is applied to


def plan(policy, models: Mapping[str, object], fps: "_Fingerprints | None" = None) -> list[BuildJob]:
    """The builds a policy needs, in policy order, for the loaded ``models``."""
    fps = fps or _Fingerprints()
    jobs: list[BuildJob] = []
    grouped: dict[tuple, BuildJob] = {}
    for concept in policy.spec.concepts:
        scope = [m for m in SCOPE_MODELS[concept.scope] if m in models]
        if not scope:
            continue
        cfg = concept.method
        if cfg.name == "text_encoder":
            first = scope[0]
            same = [m for m in scope if m == first or _same_text_encoder(models[first], models[m], fps)]
            jobs.append(BuildJob(cfg.name, cfg, [concept], first, same))
            for m in scope:
                if m not in same:
                    jobs.append(BuildJob(cfg.name, cfg, [concept], m, [m]))
        elif cfg.name == "closed_form":
            for m in scope:
                key = (m, cfg.model_dump_json())
                if key in grouped:
                    grouped[key].concepts.append(concept)
                else:
                    grouped[key] = BuildJob(cfg.name, cfg, [concept], m, [m])
                    jobs.append(grouped[key])
        else:
            for m in scope:
                jobs.append(BuildJob(cfg.name, cfg, [concept], m, [m]))
    return jobs


class _Fingerprints:
    """Fingerprints of components, computed once per planning/building call (the models do not
    change during one: method builds restore the weights they train)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[object, str]] = {}

    def __call__(self, module) -> str:
        hit = self._seen.get(id(module))
        if hit is None or hit[0] is not module:
            hit = (module, fingerprint(module))
            self._seen[id(module)] = hit
        return hit[1]


def _same_text_encoder(a, b, fps: _Fingerprints) -> bool:
    return fps(a.text_encoder) == fps(b.text_encoder)


def job_key(job: BuildJob, pipe, seed: int, fps: "_Fingerprints | None" = None) -> str:
    fps = fps or _Fingerprints()
    components = pipeline_components(pipe)
    touched = sorted({k.split("/", 1)[0] for k in select_parameters(components, job.config.parameter_group)})
    return cache_key(
        {
            "method": job.method,
            "options": job.config.model_dump(mode="json"),
            "concepts": [c.spec_hash() for c in job.concepts],
            "base": {c: fps(components[c]) for c in touched},
            "version": project_version(),
            "seed": seed,
        }
    )


@dataclasses.dataclass
class BuiltPatch:
    job: BuildJob
    patch: Patch
    built: bool  # False when it came from the cache
    seconds: float


def build_patches(
    policy,
    models: Mapping[str, object],
    cache: PatchCache,
    *,
    seed: int = 0,
    progress: bool = True,
    on_job: Callable[[BuildJob, int, int], None] | None = None,
    builder: Callable[[BuildJob], object] | None = None,
) -> list[BuiltPatch]:
    """Fetch every patch of ``policy`` from ``cache``, building the missing ones (once across
    processes sharing the cache).

    ``builder(job)`` may return another pipeline to build a job on (one with the same weights
    in the components the job touches); it is only called on a cache miss.
    """
    out = []
    fps = _Fingerprints()
    jobs = plan(policy, models, fps)
    for i, job in enumerate(jobs):
        if on_job:
            on_job(job, i, len(jobs))
        pipe = models[job.model]
        key = job_key(job, pipe, seed, fps)
        method = get_method(job.method)(job.config)

        def build(job=job, pipe=pipe, method=method) -> Patch:
            target = builder(job) if builder else pipe
            if target is not pipe and job_key(job, target, seed, fps) != key:
                raise PatchError(f"The pipeline chosen to build {job.method} for {[c.id for c in job.concepts]} has other base weights than {job.model}.")
            return method.build(target, job.concepts, seed=seed, progress=progress)

        t0 = time.perf_counter()
        patch, built = cache.get_or_build(key, build)
        out.append(BuiltPatch(job, patch, built, time.perf_counter() - t0))
    return out


def apply_patches(models: Mapping[str, object], built: list[BuiltPatch]) -> dict[str, PatchStack]:
    """Apply the patches in policy order to every model they are for; all or nothing."""
    stacks = {key: PatchStack(pipeline_components(pipe)) for key, pipe in models.items()}
    try:
        for b in built:
            for key in b.job.applies_to:
                stacks[key].apply(b.patch)
    except Exception:
        for stack in stacks.values():
            stack.remove_all()
        raise
    return stacks


def require_all_applied(policy, models: Mapping[str, object], stacks: Mapping[str, PatchStack]) -> None:
    """Fail closed: every concept in scope of every loaded model must have a patch in force."""
    for concept in policy.spec.concepts:
        for key in SCOPE_MODELS[concept.scope]:
            if key in models and not any(concept.id in p.metadata.concepts for p in stacks[key].applied):
                raise PatchError(f"Concept {concept.id!r} has no patch applied to {key}; refusing to serve it.")
