"""HTTP request and response schemas of the serving API (FastAPI / pydantic v2)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 500


def _dims(v: int | None, name: str) -> int | None:
    if v is not None and v % 8:
        raise ValueError(f"{name} has to be divisible by 8 but is {v}")
    return v


class EmbeddingUpload(BaseModel):
    """A user textual-inversion embedding attached to a request (safetensors, .bin or .pt bytes)."""

    model_config = ConfigDict(extra="forbid")

    data: Annotated[str, Field(max_length=2_000_000, description="The file, base64-encoded (at most 1 MiB decoded).")]
    token: Annotated[str | None, Field(max_length=64, description="The token the prompt uses for it; default: the one in the file.")] = None
    name: Annotated[str | None, Field(max_length=128, description="A name for messages and logs.")] = None

    @field_validator("data")
    @classmethod
    def _base64(cls, v: str) -> str:
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data is not valid base64") from None
        return v


class ImageRequest(BaseModel):
    """``POST /v1/images``."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS, description="What not to draw.")] = ""
    n: Annotated[int, Field(ge=1, le=8, description="Number of images.")] = 1
    steps: Annotated[int, Field(ge=1, le=100, description="Denoising steps.")] = 25
    guidance: Annotated[float, Field(ge=0.0, le=30.0, description="Classifier-free guidance scale.")] = 5.0
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Random seed; image i uses seed + i.")] = 0
    width: Annotated[int | None, Field(ge=8, le=1024, description="Width in pixels, a multiple of 8; default: the model's.")] = None
    height: Annotated[int | None, Field(ge=8, le=1024, description="Height in pixels, a multiple of 8; default: the model's.")] = None
    response_format: Annotated[Literal["b64_json", "png"], Field(description="JSON with base64 PNGs, or the first image as image/png.")] = "b64_json"
    embeddings: Annotated[list[EmbeddingUpload], Field(max_length=4, description="Textual-inversion embeddings for this request only.")] = []

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty or only whitespace; write what to draw")
        return v

    @field_validator("width")
    @classmethod
    def _width(cls, v):
        return _dims(v, "width")

    @field_validator("height")
    @classmethod
    def _height(cls, v):
        return _dims(v, "height")


class VideoRequest(ImageRequest):
    """``POST /v1/videos``."""

    n: Annotated[int, Field(ge=1, le=4, description="Number of clips.")] = 1
    num_frames: Annotated[int, Field(ge=2, le=32, description="Frames per clip.")] = 8
    fps: Annotated[int, Field(ge=1, le=30, description="Frames per second of the file.")] = 8
    container: Annotated[Literal["gif", "mp4"], Field(description="File format of each clip.")] = "gif"
    response_format: Annotated[Literal["b64_json", "binary"], Field(description="JSON with base64 files, or the first clip as a file.")] = "b64_json"


class ScanRequest(BaseModel):
    """``POST /v1/embeddings/scan``."""

    model_config = ConfigDict(extra="forbid")

    embedding: EmbeddingUpload
    prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS, description="Also check this prompt with the embedding.")] = None


class GeneratedFile(BaseModel):
    b64: str = Field(description="The file, base64-encoded.")
    media_type: str


class GenerationResponse(BaseModel):
    data: list[GeneratedFile]
    policy: str = Field(description="Name of the policy in force.")
    policy_version: str = Field(description="Version of the policy in force.")
    guard: dict = Field(default_factory=dict, description="The guard's verdict: action and reasons.")


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
