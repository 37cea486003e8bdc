"""Read policy YAML files and report every problem as ``FILE:LINE: field: message``.

The YAML is composed into nodes first (with ``yaml.SafeLoader``; never the unsafe loader) so
that each key and list item keeps the line it was written on. Pydantic's errors are then mapped
back onto those lines and rewritten as "Got ... . rule. how to fix." messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from .schema import METHOD_CONFIGS, Policy

__all__ = ["PolicyError", "PolicyIssue", "load_policy", "load_policy_text"]

Loc = tuple[Union[str, int], ...]


@dataclasses.dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file. ``line`` is 1-based, or ``None`` when no line applies."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PolicyError(ValueError):
    """A policy file is unreadable or invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        if not issues:
            raise ValueError("PolicyError needs at least one issue.")
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.issues,))


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


class _PolicyYamlLoader(yaml.SafeLoader):
    """``SafeLoader`` that also reads YAML 1.2 exponent floats such as ``2e-6`` as numbers.

    YAML 1.1 (PyYAML) requires a dot in a float, so ``learning_rate: 2e-6`` would otherwise be
    the string ``'2e-6'`` and fail strict validation.
    """


_PolicyYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _key(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return None
    if node.tag == _MERGE_TAG:
        return "<<"
    return loader.construct_object(node, deep=True)


def _walk(
    loader: yaml.SafeLoader, node: yaml.Node, path: Loc = (), active: frozenset[int] = frozenset()
) -> Iterator[tuple[Loc, yaml.Node]]:
    """Yield ``(path, node)`` for every node below ``node``; an alias that loops is not re-entered."""
    if id(node) in active:
        return
    active = active | {id(node)}
    yield path, node
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            yield from _walk(loader, value_node, (*path, _key(loader, key_node)), active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _walk(loader, item, (*path, i), active)


def _duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node, source: str) -> list[PolicyIssue]:
    """Keys written twice in one mapping: YAML keeps the last silently, a policy must not."""
    issues = []
    for path, node in _walk(loader, root):
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = _key(loader, key_node)
            if key in seen:
                issues.append(
                    PolicyIssue(
                        source,
                        _line(key_node),
                        _format_loc((*path, key)),
                        f"Got the key {key!r} twice (first on line {seen[key]}). YAML would keep only the last one. "
                        "Delete one of them.",
                    )
                )
            else:
                seen[key] = _line(key_node)
    return issues


def _line_map(loader: yaml.SafeLoader, node: yaml.Node, path: Loc, lines: dict[Loc, int], active: frozenset[int]) -> None:
    """Record the line of every key and list item under ``path`` (merge keys already flattened)."""
    if id(node) in active:
        return
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _key(loader, key_node)
            if key is None:
                continue
            lines[(*path, key)] = _line(key_node)
            _line_map(loader, value_node, (*path, key), lines, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = _line(item)
            _line_map(loader, item, (*path, i), lines, active)


def _yaml_issue(error: yaml.YAMLError, source: str) -> PolicyIssue:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if isinstance(error, yaml.MarkedYAMLError):
        text = "; ".join(part for part in (error.context, error.problem) if part)
    else:
        text = str(error)
    return PolicyIssue(
        source,
        mark.line + 1 if mark is not None else None,
        "",
        f"Invalid YAML: {text}. Fix the syntax here (indentation, a missing ':' or an unclosed quote or bracket).",
    )


def _parse(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Parse one YAML document into plain data and a map from path to line."""
    loader = _PolicyYamlLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PolicyError(
                [PolicyIssue(source, None, "", "The file holds no YAML document. Write a ConceptPolicy; see policies/conceptworld-demo.yaml.")]
            )
        issues = _duplicate_keys(loader, root, source)
        if issues:
            raise PolicyError(issues)
        data = loader.construct_document(root)
        lines: dict[Loc, int] = {(): _line(root)}
        _line_map(loader, root, (), lines, frozenset())
    except yaml.YAMLError as e:
        raise PolicyError([_yaml_issue(e, source)]) from e
    finally:
        loader.dispose()
    return data, lines


# --------------------------------------------------------------------------------------------
# Pydantic errors -> issues
# --------------------------------------------------------------------------------------------


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(annotation: Any) -> tuple[Any, FieldInfo | None]:
    """Strip ``Annotated`` and ``Optional``; return the inner type and any ``Field`` metadata."""
    info = None
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            info = next((m for m in extra if isinstance(m, FieldInfo)), info)
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation, info


@dataclasses.dataclass
class _Located:
    """Where a pydantic error points: the path as written in the file, and what is known there."""

    path: Loc
    owner: type[BaseModel] | None
    field: FieldInfo | None
    name: str | None


def _locate(loc: Loc) -> _Located:
    """Follow ``loc`` through the policy models, dropping the tags pydantic inserts for unions."""
    path: list[str | int] = []
    tp: Any = Policy
    owner: type[BaseModel] | None = None
    field: FieldInfo | None = None
    name: str | None = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        path.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            owner, name = tp, part
            field = next((f for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
            if field is None:
                path.extend(parts)
                break
            tp, _ = _unwrap(field.annotation)
            if field.discriminator is not None and parts and parts[0] in METHOD_CONFIGS:
                tp = METHOD_CONFIGS[str(parts.pop(0))]
        elif isinstance(part, int) and get_origin(tp) is list:
            tp, _ = _unwrap(get_args(tp)[0])
        else:
            owner, field, name = None, None, str(part)
            path.extend(parts)
            break
    return _Located(tuple(path), owner, field, name)


def _closest(word: Any, options: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(word: Any, options: Sequence[str]) -> str:
    match = _closest(word, options) if len(options) > 1 else None
    return f" Did you mean {match!r}?" if match else ""


def _short(value: Any, limit: int = 60) -> str:
    if value is None:
        return "an empty value"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _explain(error: dict[str, Any], where: _Located) -> tuple[Loc, str]:
    """The path to report and the message for one pydantic error."""
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    name = where.name or "the document"
    about = f" {where.name}: {where.field.description}" if where.field is not None and where.field.description else ""

    if kind.startswith("policy_"):
        return (*where.path, *ctx.get("at", ())), error["msg"]
    if kind == "extra_forbidden":
        allowed = [f.alias or n for n, f in where.owner.model_fields.items()] if where.owner else []
        return where.path, (
            f"Got the unknown key {name!r}. Allowed keys here: {', '.join(allowed)}."
            f"{_did_you_mean(name, allowed)} Rename or delete the key."
        )
    if kind == "invalid_key":
        return where.path, f"Got the key {value!r}, which is not text. Keys are field names. Rename or delete it."
    if kind == "missing":
        return where.path, f"The required key {name!r} is missing. Add it.{about}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        known = list(METHOD_CONFIGS)
        if kind == "union_tag_not_found":
            return where.path, f"The method has no 'name'. Add 'name:' with one of: {', '.join(known)}."
        tag = ctx.get("tag")
        return (*where.path, "name"), (
            f"Got {tag!r} for the method name. Known methods: {', '.join(known)}.{_did_you_mean(tag, known)}"
        )
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return where.path, f"Got {_short(value)} for {name}. {_sentence(error['msg'])}{_did_you_mean(value, options)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return where.path, (
            f"Got {_short(value)} for {name}. Expected a mapping of 'key: value' lines.{about}"
        )
    if kind == "list_type":
        return where.path, (
            f"Got {_short(value)} for {name}. Expected a list. Write one '- item' line per entry, or [a, b].{about}"
        )
    if kind == "string_type" and value is not None and not isinstance(value, (dict, list)):
        return where.path, (
            f"Got {_short(value)} ({type(value).__name__}) for {name}. Expected text. "
            "Put the value in quotes so YAML reads it as text."
        )
    if kind in ("int_type", "float_type", "bool_type") and isinstance(value, str):
        return where.path, f"Got {_short(value)} for {name}. {_sentence(error['msg'])} Write the value without quotes."
    return where.path, f"Got {_short(value)} for {name}. {_sentence(error['msg'])}{about}"


def _lookup_line(path: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of ``path``, or of its nearest ancestor written in the file."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _issues(error: ValidationError, lines: dict[Loc, int], source: str) -> list[PolicyIssue]:
    issues = []
    for item in error.errors():
        path, message = _explain(item, _locate(tuple(item["loc"])))
        field = _format_loc(path) or "<document>"
        issues.append(PolicyIssue(source, _lookup_line(path, lines), field, _sentence(message)))
    return sorted(set(issues), key=lambda i: (i.line or 0, i.field, i.message))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_policy_text(text: str, source_name: str = "<string>") -> Policy:
    """Parse and validate a policy from YAML text; ``source_name`` names it in messages.

    Raises :class:`PolicyError` listing every problem as ``source_name:LINE: field: message``.
    """
    data, lines = _parse(text, source_name)
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(_issues(e, lines, source_name)) from e


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read, parse and validate the policy file at ``path``.

    Raises :class:`PolicyError` when the file cannot be read or is invalid.
    """
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PolicyError([PolicyIssue(source, None, "", "No such file. Check the path.")]) from e
    except UnicodeDecodeError as e:
        raise PolicyError([PolicyIssue(source, None, "", f"The file is not UTF-8 text ({e.reason}). Save it as UTF-8.")]) from e
    except OSError as e:
        raise PolicyError([PolicyIssue(source, None, "", f"Cannot read the file: {e.strerror or e}.")]) from e
    return load_policy_text(text, source)
