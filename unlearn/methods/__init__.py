"""Unlearning methods, each registered under the name a policy uses for it."""

from . import ablation, closed_form, forget_me_not, text_encoder  # noqa: F401  (registration)
from .base import UnlearnMethod, get_method, register_method, registered_methods

__all__ = ["UnlearnMethod", "get_method", "register_method", "registered_methods"]
