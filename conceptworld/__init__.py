"""ConceptWorld: the bundled text-to-image and text-to-video model family and its judge.

The models are small diffusion models trained by ``python -m conceptworld.train`` over a
synthetic world in which every concept is known (see :mod:`conceptworld.world`). They are saved
in the stock diffusers layouts, so ``StableDiffusionPipeline.from_pretrained(t2i_path())`` and
``AnimateDiffPipeline.from_pretrained(t2v_path())`` load them with no project code, and the text
encoder and tokenizer of both are the same weights.

Public API::

    t2i_path(), t2v_path()          folders in the diffusers layout
    load_t2i(), load_t2v()          stock diffusers pipelines
    judge(images)                   per image: {attribute: (value, confidence)}
    judge_video(frames)             per-frame attributes plus the motion direction
    render(...)                     ground-truth images or videos for given attributes
    vocabulary()                    attributes, values, synonyms, instance names, words
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from . import world
from .world import vocabulary

__all__ = [
    "WeightsNotFoundError",
    "judge",
    "judge_video",
    "load_t2i",
    "load_t2v",
    "render",
    "t2i_path",
    "t2v_path",
    "vocabulary",
    "weights_dir",
]

_ENV = "CONCEPTWORLD_WEIGHTS"


class WeightsNotFoundError(FileNotFoundError):
    """The ConceptWorld weights folder is missing or incomplete."""


def weights_dir() -> Path:
    """The folder holding ``t2i/``, ``t2v/`` and ``judge/`` (``$CONCEPTWORLD_WEIGHTS`` overrides)."""
    return Path(os.environ.get(_ENV) or Path(__file__).resolve().parent / "weights")


def _component(name: str) -> Path:
    path = weights_dir() / name
    marker = path / ("config.json" if name == "judge" else "model_index.json")
    if not marker.is_file():
        raise WeightsNotFoundError(
            f"ConceptWorld {name!r} weights not found at {path} (no {marker.name}). "
            f"Train them with `python -m conceptworld.train`, or point ${_ENV} at a folder made by it."
        )
    return path


def t2i_path() -> Path:
    """Folder of the text-to-image model (``StableDiffusionPipeline`` layout)."""
    return _component("t2i")


def t2v_path() -> Path:
    """Folder of the text-to-video model (``AnimateDiffPipeline`` layout)."""
    return _component("t2v")


def load_t2i(device: str | None = None, torch_dtype=None):
    """Load the text-to-image model as a stock ``diffusers.StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(t2i_path(), torch_dtype=torch_dtype, local_files_only=True)
    return pipe.to(device) if device else pipe


def load_t2v(device: str | None = None, torch_dtype=None):
    """Load the text-to-video model as a stock ``diffusers.AnimateDiffPipeline``."""
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(t2v_path(), torch_dtype=torch_dtype, local_files_only=True)
    return pipe.to(device) if device else pipe


@functools.lru_cache(maxsize=1)
def _judge():
    from .judgenet import Judge

    return Judge.load(_component("judge"))


def judge(images) -> list[dict[str, tuple[str, float]]]:
    """Say which concepts each image shows.

    ``images``: PIL images, an ``(N, H, W, 3)`` array (uint8, or float in [0, 1]) or an
    ``(N, 3, H, W)`` tensor in [0, 1]. Returns, per image, ``{attribute: (value, confidence)}``
    for ``shape``, ``color``, ``background`` and ``instance``.
    """
    return _judge()(images)


def judge_video(frames) -> dict:
    """Judge one clip: ``{"frames": [per-frame dicts], "motion": (direction, pixels moved), ...}``."""
    return _judge().video(frames)


def render(
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    instance: str = "none",
    motion: str | None = None,
    n: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Ground-truth renders: ``(n, 32, 32, 3)`` images, or ``(n, 8, 32, 32, 3)`` videos when
    ``motion`` is given; float32 in [0, 1]. Unset attributes are drawn at random."""
    for name, value, allowed in (
        ("shape", shape, world.SHAPES),
        ("color", color, world.COLORS),
        ("background", background, world.BACKGROUNDS),
        ("instance", instance, world.INSTANCES),
        ("motion", motion, world.MOTIONS),
    ):
        if value is not None and value not in allowed:
            raise ValueError(f"Got {value!r} for {name}. It must be one of {allowed}.")
    if instance != "none" and (shape or color):
        base = world.INSTANCE_BASE[instance]
        if (shape or base[0], color or base[1]) != base:
            raise ValueError(f"Got shape={shape!r}, color={color!r} for instance {instance!r}, whose design is a {base[1]} {base[0]}. Leave them unset.")
    rng = np.random.default_rng(seed)
    kwargs = dict(shape=shape, color=color, background=background, instance=instance)
    if motion is None:
        return np.stack([world.render_scene(world.random_scene(rng, **kwargs)) for _ in range(n)])
    return np.stack([world.render_video(world.random_video_scene(rng, motion, **kwargs), motion) for _ in range(n)])
