"""conceptguard policies: the declarative ConceptPolicy format, its loader and JSON Schema.

Public API::

    load_policy(path), load_policy_text(text, source_name)   -> Policy, or PolicyError
    Policy, ConceptSpec, ...                                  the pydantic models of a document
    METHOD_CONFIGS                                            method name -> config class
    json_schema(), export_json_schema(path)                   the JSON Schema of a document
    diff_policies(old, new)                                   -> PolicyDiff

The ``conceptguard policy`` commands live in :mod:`policies.cli` (``policy_app``).
"""

from .loader import PolicyError, PolicyIssue, load_policy, load_policy_text
from .schema import (
    API_VERSION,
    KIND,
    METHOD_CONFIGS,
    AblationConfig,
    ClosedFormConfig,
    ConceptSpec,
    ConceptTarget,
    FieldChange,
    ForgetMeNotConfig,
    GuardSpec,
    MethodConfig,
    ModelSource,
    ModelsSpec,
    Policy,
    PolicyDiff,
    PolicyMetadata,
    PolicySpec,
    TextEncoderConfig,
    diff_policies,
    export_json_schema,
    json_schema,
)

__all__ = [
    "API_VERSION",
    "KIND",
    "METHOD_CONFIGS",
    "AblationConfig",
    "ClosedFormConfig",
    "ConceptSpec",
    "ConceptTarget",
    "FieldChange",
    "ForgetMeNotConfig",
    "GuardSpec",
    "MethodConfig",
    "ModelSource",
    "ModelsSpec",
    "Policy",
    "PolicyDiff",
    "PolicyError",
    "PolicyIssue",
    "PolicyMetadata",
    "PolicySpec",
    "TextEncoderConfig",
    "diff_policies",
    "export_json_schema",
    "json_schema",
    "load_policy",
    "load_policy_text",
]
