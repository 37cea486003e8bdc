"""The ConceptPolicy document: pydantic models, content hashes, JSON Schema export and diffs.

A policy names the models it applies to and the concepts to remove from them. Every model is
strict (``extra="forbid"``, strict types) because a misspelt key in a safety policy must fail
loudly rather than silently fall back to a default. Each unlearning method has its own config
model; they form one union discriminated by ``name`` (see :data:`METHOD_CONFIGS`).

Validators raise :class:`pydantic_core.PydanticCustomError` whose ``type`` starts with
``policy_``; their message is complete ("Got ... . rule. how to fix.") and their context may
carry ``at``, a path below the failing model, so that the loader can point at the exact line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

API_VERSION = "conceptguard.dev/v1"
KIND = "ConceptPolicy"

SLUG_MAX_LENGTH = 63
SLUG_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Semantic Versioning 2.0.0, the regex recommended at semver.org.
SEMVER_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SLUG_RE = re.compile(SLUG_PATTERN)
_SEMVER_RE = re.compile(SEMVER_PATTERN)


def _policy_error(kind: str, message: str, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error with a finished message; ``at`` locates it below the failing model."""
    return PydanticCustomError(f"policy_{kind}", "{message}", {"message": message, "at": at})


def _check_slug(value: str) -> str:
    if len(value) > SLUG_MAX_LENGTH or not _SLUG_RE.fullmatch(value):
        raise _policy_error(
            "slug",
            f"Got {value!r}. It must be a slug: lowercase letters a-z, digits and '-', starting and ending "
            f"with a letter or digit, at most {SLUG_MAX_LENGTH} characters. Rename it, for example 'van-gogh-style'.",
        )
    return value


def _check_semver(value: str) -> str:
    if not _SEMVER_RE.fullmatch(value):
        raise _policy_error(
            "semver",
            f"Got {value!r}. A version must follow semantic versioning MAJOR.MINOR.PATCH. "
            "Write it as, for example, '1.0.0'.",
        )
    return value


def _check_text(value: str) -> str:
    if not value.strip():
        raise _policy_error("blank", f"Got {value!r}. The text is empty or only whitespace. Write the words it stands for.")
    return value


Slug = Annotated[
    str,
    AfterValidator(_check_slug),
    WithJsonSchema({"type": "string", "pattern": SLUG_PATTERN, "maxLength": SLUG_MAX_LENGTH}),
]
SemVer = Annotated[str, AfterValidator(_check_semver), WithJsonSchema({"type": "string", "pattern": SEMVER_PATTERN})]
Text = Annotated[str, AfterValidator(_check_text), WithJsonSchema({"type": "string", "minLength": 1, "pattern": r"\S"})]

Category = Literal["object", "style", "instance", "nsfw", "other"]
Scope = Literal["image", "video", "both"]
DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    """Base of every policy model: unknown keys and type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _canonical_sha256(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Metadata and models
# --------------------------------------------------------------------------------------------


class PolicyMetadata(_Strict):
    """Who owns the policy and which revision of it this is."""

    name: Slug = Field(description="Policy name: a lowercase slug such as 'studio-default' (letters, digits, '-').")
    version: SemVer = Field(description="Policy revision as a semantic version 'MAJOR.MINOR.PATCH', e.g. '1.2.0'.")
    owner: Text = Field(description="Team or person accountable for the policy, e.g. 'trust-and-safety@example.com'.")
    description: str = Field(default="", description="Free text: why these concepts are removed.")


class ModelSource(_Strict):
    """One diffusion model: either the bundled ConceptWorld model or a hub id / local folder."""

    builtin: Literal["conceptworld"] | None = Field(
        default=None, description="A model bundled with conceptguard; only 'conceptworld' exists. Exclusive with source."
    )
    source: Text | None = Field(
        default=None,
        description="A Hugging Face hub id ('org/name') or a local diffusers folder. Exclusive with builtin.",
    )
    revision: Text | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of source; pin a commit for reproducible patches."
    )
    dtype: DType = Field(default="float32", description="Floating-point type the weights are loaded in.")

    @model_validator(mode="after")
    def _exactly_one_origin(self) -> ModelSource:
        if self.builtin is not None and self.source is not None:
            raise _policy_error(
                "rule",
                f"Got both builtin={self.builtin!r} and source={self.source!r}. A model comes from exactly one of "
                "them. Delete one of the two keys.",
                at=("source",),
            )
        if self.builtin is None and self.source is None:
            raise _policy_error(
                "rule",
                "Got neither builtin nor source. A model comes from exactly one of them. "
                "Add 'builtin: conceptworld' or 'source: <hub id or folder>'.",
            )
        if self.builtin is not None and self.revision is not None:
            raise _policy_error(
                "rule",
                f"Got revision={self.revision!r} for a builtin model. A revision only applies to a source. "
                "Delete revision, or use source instead of builtin.",
                at=("revision",),
            )
        return self

    def describe(self) -> str:
        """One line such as ``builtin conceptworld (float32)`` or ``org/name@rev (float16)``."""
        origin = f"builtin {self.builtin}" if self.builtin else f"{self.source}" + (f"@{self.revision}" if self.revision else "")
        return f"{origin} ({self.dtype})"


class ModelsSpec(_Strict):
    """The models a policy applies to; at least one is required."""

    text_to_image: ModelSource | None = Field(default=None, description="The text-to-image model to patch.")
    text_to_video: ModelSource | None = Field(default=None, description="The text-to-video model to patch.")

    @model_validator(mode="after")
    def _at_least_one(self) -> ModelsSpec:
        if self.text_to_image is None and self.text_to_video is None:
            raise _policy_error(
                "rule",
                "Got no model. A policy applies to at least one model. "
                "Add text_to_image and/or text_to_video, e.g. 'text_to_image: {builtin: conceptworld}'.",
            )
        return self

    def present(self) -> dict[str, ModelSource]:
        """The models that are set, keyed by field name."""
        return {name: model for name in type(self).model_fields if (model := getattr(self, name)) is not None}


# --------------------------------------------------------------------------------------------
# Unlearning methods
# --------------------------------------------------------------------------------------------


def _require_name(schema: dict[str, Any]) -> None:
    """The discriminator has a Python default for convenience, but a document must write it."""
    required = schema.setdefault("required", [])
    if "name" not in required:
        required.insert(0, "name")


class _MethodConfig(_Strict):
    """Base of the method configs: ``name`` is the discriminator of :data:`MethodConfig`."""

    model_config = ConfigDict(json_schema_extra=_require_name)

    name: str

    @property
    def parameter_group(self) -> str:
        """Which weights the method changes (a label, for reports): its ``parameters`` option."""
        return self.parameters

    @property
    def optimisation_steps(self) -> int:
        """How many optimisation steps the method runs (its ``steps`` option); 0 for closed-form edits."""
        return self.steps


class _TextSpaceOptions(_Strict):
    """Options of the text-space penalty shared by the fine-tuning methods of the UNet."""

    text_space_weight: NonNegativeFloat = Field(
        default=0.0,
        description="Weight of a penalty on the change of the cross-attention key/value outputs for the rest of the text space (the preserve prompts and `preserve_vocabulary` random prompts), so the edit keeps other prompts; 0 turns it off.",
    )
    preserve_vocabulary: NonNegativeInt = Field(
        default=512,
        le=100_000,
        description="Random prompts of 1-5 vocabulary words (the target's words left out) in the text space that `text_space_weight` holds fixed.",
    )


class AblationConfig(_TextSpaceOptions, _MethodConfig):
    """Concept ablation: fine-tune so the target's distribution matches the anchor's.

    Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models", ICCV 2023.
    """

    name: Literal["ablation"] = Field(default="ablation", description="Method name: 'ablation'.")
    variant: Literal["model", "noise"] = Field(
        default="model",
        description="'model': match the frozen model's prediction for the anchor; 'noise': match the true noise of anchor images.",
    )
    parameters: Literal["cross_attn_kv", "cross_attn", "full", "embedding"] = Field(
        default="cross_attn_kv",
        description="Weights fine-tuned: cross-attention key/value, all cross-attention, the full UNet, or the text embedding.",
    )
    steps: PositiveInt = Field(default=100, description="Number of fine-tuning steps.")
    learning_rate: PositiveFloat = Field(
        default=2e-6, le=1.0, description="Base learning rate; the engine may scale it by batch size."
    )
    batch_size: PositiveInt = Field(default=4, description="Prompts per fine-tuning step.")
    anchor_images: PositiveInt = Field(default=200, description="Number of anchor images generated as training data.")
    regularization_weight: NonNegativeFloat = Field(
        default=0.0, description="Weight of the loss that keeps anchor outputs unchanged; 0 turns it off."
    )
    preserve_weight: NonNegativeFloat = Field(
        default=0.0, description="Weight of a loss that keeps the model's predictions for the concept's preserve prompts as the base model's; 0 turns it off."
    )
    context_prompts: NonNegativeInt = Field(
        default=0,
        description="Extra training pairs that place a target phrasing and the anchor in the same random context of vocabulary words, so the concept is ablated inside longer prompts too; 0: the target phrasings alone.",
    )


class ForgetMeNotConfig(_TextSpaceOptions, _MethodConfig):
    """Forget-Me-Not: attention re-steering that suppresses attention to the target tokens.

    Zhang et al., "Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models", CVPR-W 2024.
    """

    name: Literal["forget_me_not"] = Field(default="forget_me_not", description="Method name: 'forget_me_not'.")
    steps: PositiveInt = Field(default=35, description="Number of fine-tuning steps.")
    learning_rate: PositiveFloat = Field(default=2e-6, le=1.0, description="Learning rate of the fine-tuning.")
    reference_images: PositiveInt = Field(default=10, description="Number of reference images of the target concept.")
    parameters: Literal["cross_attn_k", "cross_attn_kv", "cross_attn", "full", "embedding"] = Field(
        default="full",
        description="Weights fine-tuned: the cross-attention key projections (attention can change, what each token says cannot), the key/value projections (the text side only), all of the cross-attention, the full UNet, or 'embedding': the text encoder's input embeddings of the concept's own words only (no other prompt changes).",
    )
    following_tokens: bool = Field(
        default=False,
        description="Also steer attention away from the end-of-text and padding positions after the concept's words, which a causal text encoder fills with the concept's meaning; false: the concept's own tokens, as in the paper.",
    )
    preserve_weight: NonNegativeFloat = Field(
        default=0.0,
        description="Weight of a loss that keeps every cross-attention layer's attention maps for the preserve prompts and `preserve_vocabulary` random prompts as the base model's (total-variation distance); 0 turns it off.",
    )
    typo_variants: bool = Field(
        default=False,
        description="Also re-steer attention away from misspellings of the target's canonical text (one letter dropped, or two neighbouring letters swapped, in a word of 4+ letters): their word pieces are masked (and, with parameters 'embedding', tuned); a piece that is a whole vocabulary word is not.",
    )
    attention_loss: Literal["norm", "mass"] = Field(
        default="norm",
        description="What is minimised: 'norm', the squared norm of the re-steered positions' attention maps (the paper; each position's probabilities squared, so mass spread thinly over many positions weighs little); 'mass', the square of the total probability on them, which weighs padding positions as much as one token.",
    )
    encoder_attention_weight: NonNegativeFloat = Field(
        default=0.0,
        description="Weight of a second re-steering loss inside the text encoder (parameters 'embedding' only): the attention mass that every later position puts on the concept's tokens, every layer and head, through which a causal encoder copies the concept into the words, end-of-text and padding after it; 0 turns it off.",
    )

    @model_validator(mode="after")
    def _encoder_attention_needs_embedding(self) -> ForgetMeNotConfig:
        if self.encoder_attention_weight > 0 and self.parameters != "embedding":
            raise _policy_error(
                "rule",
                f"Got encoder_attention_weight={self.encoder_attention_weight} with parameters={self.parameters!r}. The "
                "text-encoder re-steering loss only moves the text encoder's input embeddings. Set parameters: embedding, "
                "or encoder_attention_weight: 0.",
                at=("encoder_attention_weight",),
            )
        return self


class TextEncoderConfig(_MethodConfig):
    """Few-shot unlearning of the text encoder only: the target prompt comes to condition like the
    anchor, and the patch transfers to every pipeline sharing the encoder, text-to-video included.

    Liu and Tan, "Unlearning Concepts from Text-to-Video Diffusion Models", arXiv:2407.14209, 2024.
    """

    name: Literal["text_encoder"] = Field(default="text_encoder", description="Method name: 'text_encoder'.")
    steps: PositiveInt = Field(default=100, description="Number of fine-tuning steps.")
    learning_rate: PositiveFloat = Field(default=1e-5, le=1.0, description="Learning rate of the fine-tuning.")
    images: PositiveInt = Field(default=8, description="Number of images of the target concept used as training data.")
    context_prompts: NonNegativeInt = Field(
        default=0,
        description="Extra training pairs that place a target phrasing and the anchor in the same random context of vocabulary words, so the encoder also re-maps the concept inside longer prompts; 0: the target phrasings alone.",
    )
    encoding_weight: NonNegativeFloat = Field(
        default=0.0,
        description="Weight of a term pulling the tuned encoding of each target phrasing (and context pair) onto the frozen encoding of the anchor, position by position, so that a denoiser the patch was not trained against (the video UNet sharing the encoder) reads the anchor too; 0 turns it off.",
    )
    preserve_weight: NonNegativeFloat = Field(
        default=1.0, description="Weight of the term holding the encodings of the preserve prompts (and the preserve vocabulary) at their original values."
    )
    preserve_vocabulary: NonNegativeInt = Field(
        default=0,
        le=100_000,
        description="Random prompts of 1-5 vocabulary words (the target's words left out) held at their original encodings as well, so the tuned encoder keeps the text space at large; 0 turns it off.",
    )
    typo_variants: bool = Field(
        default=False,
        description="Also train on misspellings of the target's canonical text (one letter dropped, or two neighbouring letters swapped, in a word of 4+ letters; variants that spell another vocabulary word left out) as extra target phrasings.",
    )

    @property
    def parameter_group(self) -> str:
        return "text_encoder"


class ClosedFormConfig(_MethodConfig):
    """Closed-form edit of the cross-attention key/value projections (no training).

    Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024.
    """

    name: Literal["closed_form"] = Field(default="closed_form", description="Method name: 'closed_form'.")
    preserve_weight: PositiveFloat = Field(
        default=0.5, description="Weight (lambda) keeping the preserve prompts' projections unchanged."
    )
    erase_weight: PositiveFloat = Field(default=1.0, description="Weight of mapping the target onto the anchor.")
    preserve_vocabulary: NonNegativeInt = Field(
        default=512,
        le=100_000,
        description=(
            "Random prompts of 1-5 words drawn from the tokenizer's vocabulary (the target's words left out) that are held "
            "fixed as well, so the edit keeps the text space at large, not only the listed preserve prompts. 0 turns it off."
        ),
    )
    context_prompts: NonNegativeInt = Field(
        default=0,
        description="Extra erase pairs that place a target phrasing and the anchor in the same random context of vocabulary words, so the concept is erased inside longer prompts too; 0: the target phrasings alone.",
    )
    typo_variants: bool = Field(
        default=False,
        description="Also erase misspellings of the target's canonical text (one letter dropped, or two neighbouring letters swapped, in a word of 4+ letters; variants that spell another vocabulary word left out), mapped onto the anchor like the phrasings.",
    )

    @property
    def parameter_group(self) -> str:
        return "cross_attn_kv"

    @property
    def optimisation_steps(self) -> int:
        return 0


MethodConfig = Annotated[
    Union[AblationConfig, ForgetMeNotConfig, TextEncoderConfig, ClosedFormConfig],
    Field(discriminator="name"),
]
"""Any method config; the ``name`` key selects which."""

METHOD_CONFIGS: Mapping[str, type[_MethodConfig]] = {
    get_args(cls.model_fields["name"].annotation)[0]: cls for cls in get_args(get_args(MethodConfig)[0])
}
"""Method name -> config class, derived from :data:`MethodConfig` so the two cannot disagree."""


# --------------------------------------------------------------------------------------------
# Concepts and the policy
# --------------------------------------------------------------------------------------------


class ConceptTarget(_Strict):
    """What to remove: the canonical text and other ways of asking for it."""

    text: Text = Field(description="The canonical prompt text of the concept, e.g. 'Van Gogh'.")
    phrasings: list[Text] = Field(
        default_factory=list, description="Other prompts that mean the same concept (synonyms, paraphrases)."
    )


class GuardSpec(_Strict):
    """Request-time screening for this concept: prompts, and user textual-inversion embeddings
    that are triggered (Wu et al., 2023) or that restore the removed concept (Pham et al., 2024)."""

    enabled: bool = Field(default=True, description="Screen requests for this concept.")
    action: Literal["block", "censor", "flag"] = Field(
        default="flag",
        description="What a hit does: 'block' answers 4xx with the reason, 'censor' returns the censored image, 'flag' serves and marks the response.",
    )
    triggers: list[Text] = Field(
        default_factory=list,
        description="Words that must not be combined with a user embedding (e.g. 'on fire'); synonyms and misspellings match too.",
    )
    blocked_terms: list[Text] = Field(
        default_factory=list, description="Prompt terms screened even without an embedding; synonyms and misspellings match too."
    )
    synonym_similarity: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Text-encoder cosine similarity at or above which a word counts as a synonym of a term."
    )
    max_edit_distance: int = Field(default=1, ge=0, le=3, description="Letters a misspelling may differ from a term by (terms of 5+ letters).")
    detect_restoring: bool = Field(
        default=True, description="Flag user embeddings whose conditioning is close to this removed concept (concept inversion)."
    )
    restoring_similarity: float = Field(
        default=0.8, gt=0.0, le=1.0, description="Similarity of an embedding's conditioning to the removed concept's at or above which it counts as restoring."
    )
    probe_samples: int = Field(
        default=0, ge=0, le=32, description="Images generated with a new embedding and judged, to detect restoring (0: off)."
    )
    probe_threshold: float = Field(
        default=0.4, gt=0.0, le=1.0, description="Share of probe images showing the concept at or above which the embedding counts as restoring."
    )


class ConceptSpec(_Strict):
    """One concept to remove, what to map it onto, and how."""

    id: Slug = Field(description="Identifier of the concept, unique within the policy: a lowercase slug.")
    target: ConceptTarget = Field(
        description="The concept to remove: a plain string, or {text, phrasings} to list other phrasings."
    )
    anchor: Text = Field(description="What the target should turn into, e.g. 'a painting' for an artist's style.")
    category: Category = Field(description="Kind of concept: object, style, instance, nsfw or other.")
    scope: Scope = Field(default="both", description="Which models to patch: image, video or both.")
    preserve: list[Text] = Field(
        default_factory=list, description="Neighbouring prompts whose outputs must not change."
    )
    method: MethodConfig = Field(description="The unlearning method and its settings; 'name' selects the method.")
    guard: GuardSpec | None = Field(default=None, description="Request-time screening for this concept.")

    @field_validator("target", mode="before", json_schema_input_type=Union[str, ConceptTarget])
    @classmethod
    def _target_shorthand(cls, value: Any) -> Any:
        return {"text": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _anchor_differs(self) -> ConceptSpec:
        if self.anchor.strip().lower() == self.target.text.strip().lower():
            raise _policy_error(
                "rule",
                f"Got anchor {self.anchor!r}, the same text as the target. The anchor is what the target turns "
                "into. Write a neutral replacement, e.g. 'a painting' for an artist's style.",
                at=("anchor",),
            )
        return self

    def spec_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of this concept; equal specs hash equal."""
        return _canonical_sha256(self.model_dump(mode="json"))


class PolicySpec(_Strict):
    """The models and the concepts to remove from them."""

    models: ModelsSpec = Field(description="The models the policy applies to.")
    concepts: list[ConceptSpec] = Field(min_length=1, description="The concepts to remove, in order.")

    @model_validator(mode="after")
    def _unique_ids(self) -> PolicySpec:
        first: dict[str, int] = {}
        for i, concept in enumerate(self.concepts):
            if concept.id in first:
                raise _policy_error(
                    "rule",
                    f"Got concept id {concept.id!r} at spec.concepts[{first[concept.id]}] and spec.concepts[{i}]. "
                    "Concept ids must be unique within a policy. Rename one of them.",
                    at=("concepts", i, "id"),
                )
            first[concept.id] = i
        return self

    @model_validator(mode="after")
    def _scope_has_model(self) -> PolicySpec:
        needed = {"image": "text_to_image", "video": "text_to_video"}
        present = self.models.present()
        for i, concept in enumerate(self.concepts):
            model = needed.get(concept.scope)
            if model is not None and model not in present:
                raise _policy_error(
                    "rule",
                    f"Got scope {concept.scope!r} for concept {concept.id!r}, but spec.models has no {model}. "
                    f"Add spec.models.{model} or change the scope.",
                    at=("concepts", i, "scope"),
                )
        return self


class Policy(_Strict):
    """A ConceptPolicy document (``apiVersion: conceptguard.dev/v1``)."""

    model_config = ConfigDict(serialize_by_alias=True)

    api_version: Literal["conceptguard.dev/v1"] = Field(
        alias="apiVersion", description="Version of the policy format; only 'conceptguard.dev/v1' exists."
    )
    kind: Literal["ConceptPolicy"] = Field(description="Document kind; always 'ConceptPolicy'.")
    metadata: PolicyMetadata = Field(description="Name, version, owner and description of the policy.")
    spec: PolicySpec = Field(description="The models and the concepts to remove.")

    def concept(self, concept_id: str) -> ConceptSpec:
        """The concept with id ``concept_id``; raises ``KeyError`` naming the known ids."""
        for concept in self.spec.concepts:
            if concept.id == concept_id:
                return concept
        known = ", ".join(c.id for c in self.spec.concepts)
        raise KeyError(f"Got {concept_id!r} for concept id. Policy {self.metadata.name!r} has: {known}.")

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the whole policy, metadata included."""
        return _canonical_sha256(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy document (what a YAML file may contain)."""
    schema = Policy.model_json_schema(mode="validation", by_alias=True)
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def export_json_schema(path: str | Path) -> Path:
    """Write :func:`json_schema` to ``path`` as indented JSON and return the path."""
    path = Path(path)
    path.write_text(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Diffs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldChange:
    """One changed value; ``field`` is a dotted path such as ``method.steps``."""

    field: str
    old: Any
    new: Any


@dataclasses.dataclass(frozen=True)
class PolicyDiff:
    """What changed between two policies; concepts are matched by id."""

    metadata: tuple[FieldChange, ...]
    models: tuple[FieldChange, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: Mapping[str, tuple[FieldChange, ...]]

    @property
    def version_change(self) -> FieldChange | None:
        """The change of ``metadata.version``, if any."""
        return next((c for c in self.metadata if c.field == "version"), None)

    @property
    def content_changed(self) -> bool:
        """Whether models or concepts differ (metadata aside)."""
        return bool(self.models or self.added or self.removed or self.changed)


def _leaf_changes(old: Any, new: Any, prefix: str = "") -> list[FieldChange]:
    """Changed leaves between two JSON dumps.

    Lists are leaves, and so is a method whose ``name`` differs: its other keys mean different
    things, so a field-by-field comparison would mislead.
    """
    if old == new:
        return []
    switched_method = prefix == "method" and isinstance(old, dict) and isinstance(new, dict) and old.get("name") != new.get("name")
    if isinstance(old, dict) and isinstance(new, dict) and not switched_method:
        changes: list[FieldChange] = []
        for key in list(old) + [k for k in new if k not in old]:
            changes += _leaf_changes(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return changes
    return [FieldChange(prefix, old, new)]


def diff_policies(old: Policy, new: Policy) -> PolicyDiff:
    """Compare two policies: metadata and model changes, concepts added, removed and changed."""
    old_concepts = {c.id: c for c in old.spec.concepts}
    new_concepts = {c.id: c for c in new.spec.concepts}
    changed = {
        cid: tuple(_leaf_changes(old_concepts[cid].model_dump(mode="json"), concept.model_dump(mode="json")))
        for cid, concept in new_concepts.items()
        if cid in old_concepts and old_concepts[cid].spec_hash() != concept.spec_hash()
    }
    return PolicyDiff(
        metadata=tuple(_leaf_changes(old.metadata.model_dump(mode="json"), new.metadata.model_dump(mode="json"))),
        models=tuple(_leaf_changes(old.spec.models.model_dump(mode="json"), new.spec.models.model_dump(mode="json"))),
        added=tuple(cid for cid in new_concepts if cid not in old_concepts),
        removed=tuple(cid for cid in old_concepts if cid not in new_concepts),
        changed=changed,
    )
