"""conceptguard unlearning: methods that turn policy concepts into weight patches, the patch
format, the shared cache and the engine that applies a policy to loaded pipelines."""

from .cache import PatchCache, cache_key
from .engine import apply_patches, build_patches, load_policy_pipelines, plan, require_all_applied
from .methods import UnlearnMethod, get_method, register_method, registered_methods
from .patch import BaseModelMismatchError, Patch, PatchError, PatchMetadata, PatchStack, cross_attention_layers, fingerprint, pipeline_components, select_parameters

__all__ = [
    "BaseModelMismatchError",
    "Patch",
    "PatchCache",
    "PatchError",
    "PatchMetadata",
    "PatchStack",
    "UnlearnMethod",
    "apply_patches",
    "build_patches",
    "cache_key",
    "fingerprint",
    "get_method",
    "load_policy_pipelines",
    "pipeline_components",
    "plan",
    "register_method",
    "registered_methods",
    "require_all_applied",
    "select_parameters",
    "cross_attention_layers",
]
