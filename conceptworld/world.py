"""The ConceptWorld: a synthetic world whose every concept is known.

An image shows one object on a background. The object has a *shape* and a *color*, the
background is a *texture* that plays the role of an artistic style, and three *instances* are
fixed designs bound to invented proper names (the analogue of a named character or a memorized
image); each instance's generic shape and color is its natural anchor. Videos show the same
objects moving in one of four directions.

Everything here is plain numpy so that rendering, captions and the vocabulary can be used
without torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32
NUM_FRAMES = 8

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
INSTANCES: tuple[str, ...] = ("none", "zorblax", "quibbit", "mordak")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "background": BACKGROUNDS,
    "instance": INSTANCES,
}

RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.98, 0.90, 0.05),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.12, 0.70),
}

# Every instance is an always-identical design built on one generic shape and color (its anchor).
INSTANCE_BASE: dict[str, tuple[str, str]] = {
    "zorblax": ("circle", "green"),
    "quibbit": ("triangle", "purple"),
    "mordak": ("square", "blue"),
}
INSTANCE_HALF_SIZE = 9.0

# (shape, color) pairs never shown in training, to measure composition.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("star", "blue"),
    ("square", "yellow"),
    ("triangle", "green"),
    ("cross", "purple"),
)

SYNONYMS: dict[str, tuple[str, ...]] = {
    # colors
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "amber", "tangerine"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "lilac"),
    # shapes
    "circle": ("circle", "disc", "orb"),
    "square": ("square", "block", "tile"),
    "triangle": ("triangle", "pyramid", "wedge"),
    "star": ("star", "pentagram", "starfish shape"),
    "cross": ("cross", "plus sign", "plus"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    # motions
    "left": ("left", "leftward", "to the left"),
    "right": ("right", "rightward", "to the right"),
    "up": ("up", "upward", "skyward"),
    "down": ("down", "downward", "to the bottom"),
}
# Background phrases: nouns ("on stripes") and adjectives ("striped background").
BACKGROUND_NOUNS: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a blank backdrop"),
    "stripes": ("stripes", "diagonal lines"),
    "dots": ("dots", "polka dots"),
    "checker": ("a checkerboard", "checks"),
}
BACKGROUND_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "blank"),
    "stripes": ("striped", "stripy"),
    "dots": ("dotted", "spotted"),
    "checker": ("checkered", "chequered"),
}
MOTION_VERBS: tuple[str, ...] = ("moving", "drifting", "sliding", "gliding")


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4


def _polygon_mask(u: np.ndarray, v: np.ndarray, poly: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over a grid of points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star_polygon(points: int = 5, outer: float = 1.05, inner: float = 0.45) -> list[tuple[float, float]]:
    poly = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        poly.append((radius * math.cos(angle), radius * math.sin(angle)))
    return poly


_STAR = _star_polygon()
_TRIANGLE = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
_DIAMOND = [(0.0, -1.1), (0.95, 0.0), (0.0, 1.1), (-0.95, 0.0)]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of ``shape`` in object coordinates (``u``, ``v`` in units of the half size, y down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return _polygon_mask(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon_mask(u, v, _STAR)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    if shape == "diamond":
        return _polygon_mask(u, v, _DIAMOND)
    raise ValueError(f"Got {shape!r} for shape. It must be one of {SHAPES}.")


def _background(name: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Grey-level background texture on a pixel grid (supersampled coordinates in pixels)."""
    if name == "plain":
        return np.full(y.shape, 0.82)
    if name == "stripes":
        return np.where(((x + y) // 4) % 2 == 0, 0.92, 0.45)
    if name == "dots":
        cy, cx = (y % 8) - 4.0, (x % 8) - 4.0
        return np.where(cy * cy + cx * cx <= 4.0, 0.35, 0.93)
    if name == "checker":
        return np.where(((x // 5) + (y // 5)) % 2 == 0, 0.95, 0.55)
    raise ValueError(f"Got {name!r} for background. It must be one of {BACKGROUNDS}.")


def _instance_decoration(instance: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The fixed marking that makes an instance different from its anchor."""
    if instance == "zorblax":  # a face: two eyes and a smile
        eyes = ((u + 0.38) ** 2 + (v + 0.25) ** 2 <= 0.05) | ((u - 0.38) ** 2 + (v + 0.25) ** 2 <= 0.05)
        r2 = u * u + (v - 0.05) ** 2
        mouth = (r2 <= 0.45) & (r2 >= 0.22) & (v >= 0.3)
        return eyes | mouth, (0.05, 0.05, 0.05)
    if instance == "quibbit":  # a white band and a white dot
        band = (np.abs(v - 0.35) <= 0.14)
        dot = u * u + (v + 0.25) ** 2 <= 0.03
        return band | dot, (0.98, 0.98, 0.98)
    if instance == "mordak":  # a yellow X
        x_mark = ((np.abs(u - v) <= 0.22) | (np.abs(u + v) <= 0.22)) & (np.maximum(np.abs(u), np.abs(v)) <= 0.65)
        return x_mark, (0.98, 0.88, 0.05)
    raise ValueError(f"Got {instance!r} for instance. It must be one of {INSTANCES[1:]}.")


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object on one background at a position (centre in pixels) and half size."""

    shape: str
    color: str
    background: str = "plain"
    instance: str = "none"
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    half_size: float = 8.0

    def labels(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "background": self.background, "instance": self.instance}


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``scene`` to an ``(size, size, 3)`` float32 array in [0, 1], anti-aliased."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    grey = _background(scene.background, np.floor(y), np.floor(x))
    img = np.repeat(grey[..., None], 3, axis=2)
    u = (x - scene.cx) / scene.half_size
    v = (y - scene.cy) / scene.half_size
    img[shape_mask(scene.shape, u, v)] = RGB[scene.color]
    if scene.instance != "none":
        mark, mark_rgb = _instance_decoration(scene.instance, u, v)
        img[mark & shape_mask(scene.shape, u, v)] = mark_rgb
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return img.astype(np.float32)


def random_scene(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    instance: str | None = None,
    allow_held_out: bool = True,
    instance_prob: float = 0.0,
    margin: float = 0.0,
) -> Scene:
    """Draw a scene; fixed attributes are kept, the others are drawn uniformly.

    ``margin`` keeps the object that many pixels further from the border (room to move).
    """
    if instance is None:
        instance = str(rng.choice(INSTANCES[1:])) if rng.random() < instance_prob else "none"
    if background is None:
        background = str(rng.choice(BACKGROUNDS))
    if instance != "none":
        shape, color = INSTANCE_BASE[instance]
        half = INSTANCE_HALF_SIZE
    else:
        while True:
            s = shape if shape is not None else str(rng.choice(SHAPES))
            c = color if color is not None else str(rng.choice(COLORS))
            if allow_held_out or (s, c) not in HELD_OUT_PAIRS or (shape is not None and color is not None):
                break
        shape, color = s, c
        half = float(rng.uniform(7.0, 9.0))
    lo, hi = half + 1.0 + margin, IMAGE_SIZE - half - 1.0 - margin
    cx, cy = (float(rng.uniform(lo, hi)) for _ in range(2))
    return Scene(shape, color, background, instance, cx, cy, half)


MOTION_STEP = 1.6  # pixels per frame


def motion_vector(direction: str) -> tuple[float, float]:
    return {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}[direction]


def render_video(scene: Scene, direction: str, num_frames: int = NUM_FRAMES, start_centre: bool = False) -> np.ndarray:
    """Render ``num_frames`` frames ``(F, H, W, 3)`` of ``scene`` moving in ``direction``.

    The scene's position is the position of the first frame unless ``start_centre`` asks to
    place the path so that it is centred in the frame.
    """
    if direction not in MOTIONS:
        raise ValueError(f"Got {direction!r} for direction. It must be one of {MOTIONS}.")
    dx, dy = motion_vector(direction)
    travel = MOTION_STEP * (num_frames - 1)
    cx, cy = scene.cx, scene.cy
    if start_centre:
        cx, cy = cx - dx * travel / 2, cy - dy * travel / 2
    frames = []
    for f in range(num_frames):
        s = dataclasses.replace(scene, cx=cx + dx * MOTION_STEP * f, cy=cy + dy * MOTION_STEP * f)
        frames.append(render_scene(s))
    return np.stack(frames)


def random_video_scene(rng: np.random.Generator, direction: str, **kwargs) -> Scene:
    """A scene whose whole path in ``direction`` stays inside the frame."""
    travel = MOTION_STEP * (NUM_FRAMES - 1)
    scene = random_scene(rng, **kwargs)
    dx, dy = motion_vector(direction)
    half = scene.half_size
    lo, hi = half + 1.0, IMAGE_SIZE - half - 1.0
    # choose the start so that start and end are both inside [lo, hi]
    def start(d: float) -> float:
        if d > 0:
            return float(rng.uniform(lo, hi - travel))
        if d < 0:
            return float(rng.uniform(lo + travel, hi))
        return float(rng.uniform(lo, hi))

    return dataclasses.replace(scene, cx=start(dx), cy=start(dy))


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

# Object phrases ("O") and background phrases ("B"). Training uses most (O, B) pairings; the
# pairs in HELD_OUT_TEMPLATES are kept out so that paraphrase robustness is measured on
# surface forms the model never saw, built only from words it did see.
OBJECT_FORMS = ("{a} {color} {shape}", "{a} {shape} in {color}", "{a} {color} colored {shape}")
BACKGROUND_FORMS = (
    "{obj} on {bg_noun}",
    "{obj}, {bg_adj} background",
    "{bg_adj} background, {obj}",
    "{obj} against {bg_noun}",
)
HELD_OUT_TEMPLATES: tuple[tuple[int, int], ...] = ((1, 1), (2, 2))
PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _object_phrase(rng: np.random.Generator, form: int, shape: str | None, color: str | None, instance: str) -> str:
    if instance != "none":
        return _pick(rng, (instance, f"the {instance}", instance))
    sh = _pick(rng, SYNONYMS[shape]) if shape else "shape"
    if color is None:
        return f"{_article(sh)} {sh}"
    co = _pick(rng, SYNONYMS[color])
    text = OBJECT_FORMS[form].format(a="{a}", color=co, shape=sh)
    first = text.split(" ")[1]
    return text.format(a=_article(first))


def caption(
    rng: np.random.Generator,
    shape: str | None,
    color: str | None,
    background: str | None,
    instance: str = "none",
    motion: str | None = None,
    *,
    template: tuple[int, int] | None = None,
    held_out_templates: bool = False,
) -> str:
    """Write a caption for the given attributes; ``None`` leaves an attribute unsaid.

    ``template`` fixes the (object form, background form) pair; otherwise one is drawn from the
    training templates, or from the held-out ones when ``held_out_templates`` is set.
    """
    if template is None:
        pool = [
            (o, b)
            for o in range(len(OBJECT_FORMS))
            for b in range(len(BACKGROUND_FORMS))
            if ((o, b) in HELD_OUT_TEMPLATES) == held_out_templates
        ]
        template = pool[int(rng.integers(len(pool)))]
    o_form, b_form = template
    obj = _object_phrase(rng, o_form, shape, color, instance)
    if motion is not None:
        obj = f"{obj} {_pick(rng, MOTION_VERBS)} {_pick(rng, SYNONYMS[motion])}"
    if background is None:
        text = obj
    else:
        text = BACKGROUND_FORMS[b_form].format(
            obj=obj, bg_noun=_pick(rng, BACKGROUND_NOUNS[background]), bg_adj=_pick(rng, BACKGROUND_ADJECTIVES[background])
        )
    if not text.startswith(tuple(BACKGROUND_ADJECTIVES_FLAT)):
        text = _pick(rng, PREFIXES) + text
    return text


BACKGROUND_ADJECTIVES_FLAT = tuple(w for ws in BACKGROUND_ADJECTIVES.values() for w in ws)


def background_caption(rng: np.random.Generator, background: str) -> str:
    """A caption that names the background alone: ``"polka dots"``, ``"a picture of striped background"``."""
    text = _pick(rng, (_pick(rng, BACKGROUND_NOUNS[background]), f"{_pick(rng, BACKGROUND_ADJECTIVES[background])} background"))
    return _pick(rng, PREFIXES) + text


def canonical_prompt(
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    instance: str = "none",
    motion: str | None = None,
) -> str:
    """The plain form of a prompt: ``"a red star on stripes"``, ``"zorblax on dots"``."""
    if instance != "none":
        obj = instance
    else:
        obj = " ".join(w for w in (color, shape) if w)
        obj = f"{_article(obj)} {obj}"
    if motion is not None:
        obj += f" moving {motion}"
    if background is not None:
        obj += f" on {BACKGROUND_NOUNS[background][0]}"
    return obj


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

# Everyday words kept as whole tokens so that user prompts outside the world (and the policy
# terms of other issues) tokenize into words rather than letters.
COMMON_WORDS = """
a an the of on in at to and or with without by for from into over under near behind above below
is are be this that it its my your their one two three some many no not very more less
picture image photo photograph drawing painting sketch render illustration art artwork style
background backdrop foreground scene object thing shape colored coloured color colour pattern texture
small big large tiny huge bright dark light pale deep old new beautiful ugly cute
moving drifting sliding gliding flying falling rising running walking still static video clip frame
left right up down leftward rightward upward downward skyward bottom top side middle centre center
cat dog bird car tree house person man woman face portrait character cartoon robot
fire burning flames blood gore weapon gun knife violence nude nudity naked explicit nsfw
censored blocked grey gray white black brown pink
by artist famous logo brand copyrighted trademark
""".split()


def vocabulary() -> dict:
    """All attributes, their values, synonyms, instance names and caption words."""
    words: set[str] = set(COMMON_WORDS)
    for phrases in list(SYNONYMS.values()) + list(BACKGROUND_NOUNS.values()) + list(BACKGROUND_ADJECTIVES.values()):
        for p in phrases:
            words.update(p.split())
    words.update(MOTION_VERBS)
    words.update(INSTANCES[1:])
    for form in OBJECT_FORMS + BACKGROUND_FORMS + PREFIXES:
        words.update(w for w in form.replace(",", " ").split() if not w.startswith("{"))
    return {
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "motions": list(MOTIONS),
        "synonyms": {k: list(v) for k, v in SYNONYMS.items()},
        "background_nouns": {k: list(v) for k, v in BACKGROUND_NOUNS.items()},
        "background_adjectives": {k: list(v) for k, v in BACKGROUND_ADJECTIVES.items()},
        "instances": {name: {"shape": s, "color": c, "anchor": canonical_prompt(s, c)} for name, (s, c) in INSTANCE_BASE.items()},
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "words": sorted(words),
    }


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a prompt names, read with the world's synonyms: ``"a crimson pentagram on
    stripes"`` -> ``{"shape": "star", "color": "red", "background": "stripes"}``. An instance
    name also implies its design's shape and color. Unknown words are ignored."""
    words = " " + " ".join(text.lower().replace(",", " ").replace("-", " ").split()) + " "
    found: dict[str, str] = {}

    def has(phrase: str) -> bool:
        return f" {phrase} " in words

    for inst, (shape, color) in INSTANCE_BASE.items():
        if has(inst):
            found.update(instance=inst, shape=shape, color=color)
    for attr, values in (("shape", SHAPES), ("color", COLORS), ("motion", MOTIONS)):
        for value in values:
            # longest synonyms first so "plus sign" wins over "plus"
            if any(has(s) for s in sorted(SYNONYMS[value], key=len, reverse=True)):
                found.setdefault(attr, value)
    for value in BACKGROUNDS:
        phrases = list(BACKGROUND_NOUNS[value]) + [f"{a} background" for a in BACKGROUND_ADJECTIVES[value]] + [f"{a} backdrop" for a in BACKGROUND_ADJECTIVES[value]]
        phrases += [p.removeprefix("a ") for p in BACKGROUND_NOUNS[value]] + list(BACKGROUND_ADJECTIVES[value])
        if any(has(p) for p in phrases):
            found.setdefault("background", value)
    return found
