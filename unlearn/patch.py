"""Weight patches: the one mechanism every unlearning method uses to select, save and apply.

A patch holds only the tensors a method changed, as *deltas* from the base weights, in a
safetensors file with metadata (method and options, concept spec hashes, the fingerprint of
each base component it was built on, project version). Patches are applied in place to a loaded
pipeline, in a defined order, and removed again bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

FORMAT = "conceptguard.patch/v1"
SEPARATOR = "/"  # "<component>/<parameter name>"


class PatchError(RuntimeError):
    """A patch could not be built, loaded, applied or verified."""


class BaseModelMismatchError(PatchError):
    """A patch was built on other base weights than the ones it is being applied to."""


def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("conceptguard")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


# --------------------------------------------------------------------------------------------
# Selecting parameters
# --------------------------------------------------------------------------------------------

# Parameter groups by diffusers/transformers module names, so they match SD 1.x/2.x/SDXL UNets,
# AnimateDiff motion UNets and CLIP text encoders alike. Cross-attention is ``attn2`` in diffusers,
# but AnimateDiff's motion modules also name their second (temporal self-)attention ``attn2``:
# the cross-attention groups keep only layers that really read the text (see
# :func:`cross_attention_layers`).
PARAMETER_GROUPS: dict[str, tuple[str, str]] = {
    "cross_attn_kv": ("unet", r"attn2\.to_[kv]\.weight$"),
    "cross_attn_k": ("unet", r"attn2\.to_k\.weight$"),
    "cross_attn": ("unet", r"attn2\.(to_[qkv]\.weight|to_out\.0\.(weight|bias))$"),
    "full": ("unet", r".*"),
    "unet_spatial": ("unet", r"^(?!.*motion_modules).*"),
    "embedding": ("text_encoder", r"embeddings\.token_embedding\.weight$"),
    "text_encoder": ("text_encoder", r".*"),
}
CROSS_ATTENTION_GROUPS = frozenset({"cross_attn_kv", "cross_attn_k", "cross_attn"})


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's attention layers that attend to the text, ``{module name: module}``.

    diffusers marks them with ``is_cross_attention``; a layer without that flag counts when it is
    an ``attn2`` whose key projection reads the text width (``cross_attention_dim``).
    """
    text_dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    out = {}
    for name, m in unet.named_modules():
        flag = getattr(m, "is_cross_attention", None)
        if flag is None:
            to_k = getattr(m, "to_k", None)
            flag = name.endswith("attn2") and to_k is not None and getattr(to_k, "in_features", None) == text_dim
        if flag:
            out[name] = m
    return out


def select_parameters(components: Mapping[str, nn.Module], group: str) -> dict[str, nn.Parameter]:
    """The parameters of ``group`` as ``{"component/name": parameter}``.

    Raises :class:`PatchError` naming the option to change when the group is unknown, its
    component is missing, or it matches no parameter.
    """
    if group not in PARAMETER_GROUPS:
        raise PatchError(f"Got {group!r} for parameters. It must be one of {sorted(PARAMETER_GROUPS)}.")
    component, pattern = PARAMETER_GROUPS[group]
    module = components.get(component)
    if module is None:
        raise PatchError(f"Parameter group {group!r} needs the pipeline's {component!r}, which it does not have. Choose another `parameters` group.")
    rx = re.compile(pattern)
    found = {f"{component}{SEPARATOR}{n}": p for n, p in module.named_parameters() if rx.search(n)}
    if group in CROSS_ATTENTION_GROUPS:
        layers = cross_attention_layers(module)
        found = {k: p for k, p in found.items() if k.split(SEPARATOR, 1)[1].rsplit(".", 2)[0].removesuffix(".to_out") in layers}
    if not found:
        raise PatchError(
            f"Parameter group {group!r} matched no parameter of {component} ({type(module).__name__}); "
            f"it looks for names matching {pattern!r}. Choose another `parameters` group for this model."
        )
    return found


def fingerprint(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatchMetadata:
    method: str
    options: dict
    concepts: tuple[str, ...]  # concept ids
    concept_hashes: tuple[str, ...]
    base_fingerprints: dict[str, str]  # component -> fingerprint of the weights it was built on
    version: str
    build_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PatchMetadata":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise PatchError(f"Patch metadata is not valid JSON: {e}.") from e
        if raw.pop("format", None) != FORMAT:
            raise PatchError(f"Patch metadata format must be {FORMAT!r}. Rebuild the patch with this version of conceptguard.")
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - fields or {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(raw):
            raise PatchError(f"Patch metadata has fields {sorted(raw)}; expected {sorted(fields)}. Rebuild the patch.")
        raw["concepts"] = tuple(raw["concepts"])
        raw["concept_hashes"] = tuple(raw["concept_hashes"])
        return cls(**raw)


@dataclasses.dataclass(frozen=True)
class Patch:
    """Deltas for some parameters of some components, with the metadata to check them."""

    deltas: dict[str, torch.Tensor]
    metadata: PatchMetadata

    @property
    def components(self) -> set[str]:
        return {k.split(SEPARATOR, 1)[0] for k in self.deltas}

    @property
    def patch_id(self) -> str:
        """Content hash of the deltas and of what they were built from (not of how long it took)."""
        h = hashlib.sha256(dataclasses.replace(self.metadata, build_seconds=0.0).to_json().encode())
        for name, t in sorted(self.deltas.items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_weights(cls, before: Mapping[str, torch.Tensor], after: Mapping[str, nn.Parameter | torch.Tensor], metadata: PatchMetadata) -> "Patch":
        """Keep only the tensors that changed, as float32 deltas."""
        deltas = {}
        for name, old in before.items():
            new = after[name].detach().cpu()
            if not torch.equal(new, old.cpu()):
                deltas[name] = (new.float() - old.cpu().float()).contiguous()
        if not deltas:
            raise PatchError(f"The {metadata.method} build for {list(metadata.concepts)} changed no weight. Raise `steps` or the learning rate.")
        return cls(deltas, metadata)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(self.deltas, tmp, metadata={"conceptguard": self.metadata.to_json()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Patch":
        """Read a patch file (safetensors only: nothing is unpickled)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("conceptguard")
                deltas = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise PatchError(f"{path} is not a readable safetensors patch: {e}. Delete it and rebuild.") from e
        if meta is None:
            raise PatchError(f"{path} has no conceptguard metadata; it is not a conceptguard patch.")
        bad = [k for k in deltas if SEPARATOR not in k]
        if bad:
            raise PatchError(f"{path} has tensors {bad[:3]} not named '<component>/<parameter>'; it is not a conceptguard patch.")
        return cls(deltas, PatchMetadata.from_json(meta))


class PatchStack:
    """Patches applied in place to a pipeline's components, in order, removable bit-for-bit.

    The first patch that touches a tensor saves its original value; :meth:`remove_all` copies
    the originals back. Base fingerprints are taken once, before any patch, so patches that
    compose are all checked against the unpatched weights.
    """

    def __init__(self, components: Mapping[str, nn.Module]):
        self.components = dict(components)
        self.applied: list[Patch] = []
        self._originals: dict[str, torch.Tensor] = {}
        self._base_fingerprints: dict[str, str] = {}
        self._named: dict[str, dict[str, nn.Parameter]] = {}

    def base_fingerprint(self, component: str) -> str:
        # check() fingerprints every component a patch touches before changing it, so a component
        # seen here for the first time still holds its base weights
        if component not in self._base_fingerprints:
            self._base_fingerprints[component] = fingerprint(self.components[component])
        return self._base_fingerprints[component]

    def _parameter(self, key: str) -> nn.Parameter:
        component, name = key.split(SEPARATOR, 1)
        module = self.components.get(component)
        if module is None:
            raise PatchError(f"The patch changes {component!r}, which this pipeline does not have ({sorted(self.components)}).")
        if component not in self._named:
            self._named[component] = dict(module.named_parameters())
        params = self._named[component]
        if name not in params:
            raise PatchError(f"The patch changes {key!r}, which {type(module).__name__} does not have. It was built for another architecture.")
        return params[name]

    def check(self, patch: Patch) -> None:
        """Refuse a patch built on other weights, or whose tensors do not fit."""
        for component in sorted(patch.components):
            if component not in self.components:
                raise PatchError(f"Patch {patch.patch_id} changes {component!r}, which this pipeline does not have ({sorted(self.components)}).")
            expected = patch.metadata.base_fingerprints.get(component)
            actual = self.base_fingerprint(component)
            if expected != actual:
                raise BaseModelMismatchError(
                    f"Patch {patch.patch_id} ({patch.metadata.method} for {list(patch.metadata.concepts)}) was built on a {component} "
                    f"with fingerprint {str(expected)[:12]}…, but this model's {component} is {actual[:12]}…. "
                    "Rebuild the patch for this base model."
                )
        for key, delta in patch.deltas.items():
            p = self._parameter(key)
            if tuple(p.shape) != tuple(delta.shape):
                raise PatchError(f"Patch {patch.patch_id} has shape {tuple(delta.shape)} for {key!r}, the model has {tuple(p.shape)}.")
            if not torch.isfinite(delta).all():
                raise PatchError(f"Patch {patch.patch_id} has non-finite values for {key!r}. Rebuild it.")

    @torch.no_grad()
    def apply(self, patch: Patch) -> None:
        self.check(patch)
        for key, delta in patch.deltas.items():
            p = self._parameter(key)
            if key not in self._originals:
                self._originals[key] = p.detach().clone()
            p.add_(delta.to(device=p.device, dtype=p.dtype))
        self.applied.append(patch)
        self.verify()

    @torch.no_grad()
    def verify(self) -> None:
        """Every patched tensor equals its original plus the deltas of the applied patches, in order."""
        for key, original in self._originals.items():
            expected = original.clone()
            for patch in self.applied:
                if key in patch.deltas:
                    expected.add_(patch.deltas[key].to(device=expected.device, dtype=expected.dtype))
            actual = self._parameter(key)
            if not torch.equal(actual, expected) or not torch.isfinite(actual).all():
                raise PatchError(f"Verification failed for {key!r}: the weights are not the base plus the applied patches.")

    def originals(self) -> dict[str, torch.Tensor]:
        """The unpatched values of every tensor the applied patches changed."""
        return dict(self._originals)

    @torch.no_grad()
    def remove_all(self) -> None:
        for key, original in self._originals.items():
            self._parameter(key).copy_(original)
        self._originals.clear()
        self.applied.clear()

    def apply_all(self, patches: Iterable[Patch]) -> None:
        """Apply several patches; if any fails, the weights are restored and the error raised."""
        try:
            for patch in patches:
                self.apply(patch)
        except Exception:
            self.remove_all()
            raise


def pipeline_components(pipe) -> dict[str, nn.Module]:
    """The patchable components of a diffusers pipeline (``unet``, ``text_encoder``, ...)."""
    names = ("unet", "text_encoder", "text_encoder_2", "transformer")
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), nn.Module)}
