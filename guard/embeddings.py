"""Safe loading of user-supplied textual-inversion embeddings, and their per-request use.

Accepted, and nothing else:

- safetensors: the diffusers layout (one key, the token, holding ``(d,)`` or ``(n, d)``) or the
  A1111 layout (``emb_params``);
- ``.bin``/``.pt``: only through ``torch.load(weights_only=True)``, which refuses any object
  that is not a tensor or plain container, and then only the diffusers single-key dict or the
  A1111 dict with ``string_to_param`` (and its usual bookkeeping keys).

A pickle that would run code is rejected by the restricted unpickler before anything runs.
Limits with messages naming the rule: file size, vector count, dimension equal to the text
encoder's, finite values, norms within a plausible range of the encoder's own vocabulary, and
token names that do not shadow a word of the tokenizer.

Embeddings never touch the shared pipeline: :func:`encode_prompt` computes the prompt
embeddings of one request with the vectors spliced in, for that request only.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


class GuardError(ValueError):
    """A request or an embedding the guard refuses."""


class EmbeddingRejected(GuardError):
    """An embedding file that breaks a loading rule."""


@dataclasses.dataclass(frozen=True)
class EmbeddingLimits:
    max_file_bytes: int = 1 << 20
    max_vectors: int = 16
    min_norm_ratio: float = 0.25  # of the smallest token-embedding norm of the vocabulary
    max_norm_ratio: float = 4.0  # of the largest


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    token: str
    vectors: torch.Tensor  # (n, d) float32
    source_format: str  # "diffusers" or "a1111"

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])


_A1111_KEYS = {"string_to_param", "string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
_TOKEN_RE = re.compile(r"^[<>\w\-]{1,64}$")


def _parse(obj, name: str) -> tuple[str | None, torch.Tensor, str]:
    if not isinstance(obj, Mapping):
        raise EmbeddingRejected(f"{name}: the file holds a {type(obj).__name__}; an embedding file holds a dict. Export it in the diffusers or A1111 format.")
    keys = set(obj)
    if "string_to_param" in keys:
        extra = keys - _A1111_KEYS
        if extra:
            raise EmbeddingRejected(f"{name}: unexpected keys {sorted(extra)} in an A1111 embedding (allowed: {sorted(_A1111_KEYS)}).")
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingRejected(f"{name}: string_to_param must map exactly one placeholder to a tensor.")
        (tensor,) = params.values()
        token = obj.get("name") if isinstance(obj.get("name"), str) else None
        return token, tensor, "a1111"
    if keys == {"emb_params"}:
        return None, obj["emb_params"], "a1111"
    if len(keys) == 1:
        (token,) = keys
        return str(token), obj[token], "diffusers"
    raise EmbeddingRejected(
        f"{name}: keys {sorted(map(str, keys))[:5]} match no embedding layout. Use the diffusers layout (one key, the token) or A1111 (string_to_param)."
    )


def read_embedding(data: bytes, name: str = "<upload>", limits: EmbeddingLimits = EmbeddingLimits()) -> tuple[str | None, torch.Tensor, str]:
    """Parse an embedding file's bytes without executing anything. Returns (token, tensor, format)."""
    if len(data) > limits.max_file_bytes:
        raise EmbeddingRejected(f"{name}: {len(data)} bytes is over the limit of {limits.max_file_bytes} bytes for an embedding file.")
    if data[:8] and int.from_bytes(data[:8], "little") < len(data) and data[8:9] == b"{":
        from safetensors.torch import load

        try:
            obj = load(data)
        except Exception as e:
            raise EmbeddingRejected(f"{name}: not a valid safetensors file ({e}).") from e
        return _parse(obj, name)
    if zipfile.is_zipfile(io.BytesIO(data)) or data[:2] == b"\x80\x02":
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise EmbeddingRejected(f"{name}: refused: the pickle holds objects other than tensors and plain containers (it could run code). Share embeddings as safetensors.") from e
        except Exception as e:
            raise EmbeddingRejected(f"{name}: not a readable torch file ({type(e).__name__}: {e}).") from e
        return _parse(obj, name)
    raise EmbeddingRejected(f"{name}: neither safetensors nor a torch file. Embeddings are accepted as .safetensors, .bin or .pt.")


def validate_embedding(token: str, tensor, tokenizer, text_encoder, name: str = "<upload>", limits: EmbeddingLimits = EmbeddingLimits()) -> TextualInversion:
    """Apply every limit against the model the embedding will be used with."""
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingRejected(f"{name}: the embedding is a {type(tensor).__name__}, not a tensor.")
    vectors = tensor.detach().float()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise EmbeddingRejected(f"{name}: the embedding has shape {tuple(tensor.shape)}; it must be (dim,) or (vectors, dim).")
    weight = text_encoder.get_input_embeddings().weight.detach().float()
    dim = weight.shape[1]
    if vectors.shape[1] != dim:
        raise EmbeddingRejected(f"{name}: vectors of dimension {vectors.shape[1]}, but this model's text encoder uses {dim}. It was trained for another model.")
    if not 1 <= vectors.shape[0] <= limits.max_vectors:
        raise EmbeddingRejected(f"{name}: {vectors.shape[0]} vectors; at most {limits.max_vectors} are accepted.")
    if not torch.isfinite(vectors).all():
        raise EmbeddingRejected(f"{name}: the embedding holds NaN or infinite values.")
    norms = vectors.norm(dim=1)
    vocab = weight.norm(dim=1)
    lo, hi = float(vocab.min()) * limits.min_norm_ratio, float(vocab.max()) * limits.max_norm_ratio
    if float(norms.min()) < lo or float(norms.max()) > hi:
        raise EmbeddingRejected(f"{name}: vector norms {float(norms.min()):.3g}..{float(norms.max()):.3g} are outside the plausible range {lo:.3g}..{hi:.3g} of this model's vocabulary.")
    if not token or not _TOKEN_RE.match(token):
        raise EmbeddingRejected(f"{name}: token {token!r} must be 1-64 letters, digits, '_', '-', '<' or '>'.")
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) == 1 or token.lower() in tokenizer.get_vocab() or f"{token.lower()}</w>" in tokenizer.get_vocab():
        raise EmbeddingRejected(f"{name}: token {token!r} shadows a word the model already knows. Rename it, e.g. '<{token}>'.")
    return TextualInversion(token, vectors, "")


def load_embedding(source: str | Path | bytes, tokenizer, text_encoder, *, token: str | None = None, name: str | None = None, limits: EmbeddingLimits = EmbeddingLimits()) -> TextualInversion:
    """Read and validate one embedding (a path or the file's bytes)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise EmbeddingRejected(f"{path}: {size} bytes is over the limit of {limits.max_file_bytes} bytes for an embedding file.")
        data, name = path.read_bytes(), name or str(path)
    else:
        data, name = bytes(source), name or "<upload>"
    file_token, tensor, fmt = read_embedding(data, name, limits)
    ti = validate_embedding(token or file_token or "", tensor, tokenizer, text_encoder, name, limits)
    return dataclasses.replace(ti, source_format=fmt)


def _placeholder_ids(tokenizer, prompt: str, embeddings: Sequence[TextualInversion]) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Token ids of ``prompt`` with each embedding token expanded to its vectors' positions."""
    by_token = {e.token: e for e in embeddings}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(by_token, key=len, reverse=True))) if by_token else None
    ids = [tokenizer.bos_token_id]
    splices: list[tuple[int, torch.Tensor]] = []
    pos = 0
    for m in pattern.finditer(prompt) if pattern else []:
        ids += tokenizer(prompt[pos : m.start()], add_special_tokens=False).input_ids
        e = by_token[m.group(0)]
        for v in e.vectors:
            splices.append((len(ids), v))
            ids.append(tokenizer.pad_token_id)
        pos = m.end()
    ids += tokenizer(prompt[pos:], add_special_tokens=False).input_ids
    max_len = tokenizer.model_max_length
    ids = ids[: max_len - 1] + [tokenizer.eos_token_id]
    splices = [(i, v) for i, v in splices if i < max_len - 1]
    ids += [tokenizer.pad_token_id] * (max_len - len(ids))
    return torch.tensor([ids]), splices


def encode_prompts(pipe, prompts: Sequence[str], embeddings: Sequence[TextualInversion] = ()) -> torch.Tensor:
    """Prompt embeddings with textual-inversion vectors spliced in (differentiable in them).

    The vectors enter through a forward hook on the token embedding that exists only during
    this call; the pipeline's weights and tokenizer are never changed.
    """
    te = pipe.text_encoder
    rows = [_placeholder_ids(pipe.tokenizer, p, embeddings) for p in prompts]
    ids = torch.cat([r[0] for r in rows])
    splices = [(b, i, v) for b, (_, sp) in enumerate(rows) for i, v in sp]
    layer = te.get_input_embeddings()

    def splice(module, inputs, output):
        output = output.clone()
        for b, i, v in splices:
            output[b, i] = v.to(output.dtype)
        return output

    handle = layer.register_forward_hook(splice) if splices else None
    try:
        return te(ids.to(te.device))[0]
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def encode_prompt(pipe, prompt: str, embeddings: Sequence[TextualInversion] = ()) -> torch.Tensor:
    """:func:`encode_prompts` for one request's prompt, without gradients."""
    return encode_prompts(pipe, [prompt], embeddings)
