"""Policies: the shipped files validate, every model round-trips, every broken file in
tests/bad_policies fails at the expected line and field, and the CLI exits as documented."""

from __future__ import annotations

import json
import pickle
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

import policies
from policies import (
    METHOD_CONFIGS,
    ConceptSpec,
    Policy,
    PolicyError,
    diff_policies,
    json_schema,
    load_policy,
    load_policy_text,
)
from policies.cli import policy_app

ROOT = Path(__file__).resolve().parents[1]
POLICY_DIR = ROOT / "policies"
SHIPPED = sorted([POLICY_DIR / "conceptworld-demo.yaml", *(POLICY_DIR / "examples").glob("*.yaml")])
BAD_DIR = Path(__file__).resolve().parent / "bad_policies"
EXPECTED = json.loads((BAD_DIR / "expected.json").read_text(encoding="utf-8"))
DEMO = POLICY_DIR / "conceptworld-demo.yaml"

MINIMAL = """\
apiVersion: conceptguard.dev/v1
kind: ConceptPolicy
metadata:
  name: minimal
  version: 1.0.0
  owner: tests
spec:
  models:
    text_to_image: {builtin: conceptworld}
  concepts:
    - id: zorblax
      category: instance
      target: zorblax
      anchor: a green circle
      method:
        name: ablation
"""

runner = CliRunner()


def _minimal(**method: object) -> str:
    """MINIMAL with extra ``key: value`` lines under ``method``."""
    return MINIMAL + "".join(f"        {key}: {value}\n" for key, value in method.items())


def _policy_with(method: BaseModel) -> Policy:
    data = load_policy_text(MINIMAL).model_dump(mode="json")
    data["spec"]["concepts"][0]["method"] = method.model_dump(mode="json")
    return Policy.model_validate(data)


def _models(root: type[BaseModel]) -> set[type[BaseModel]]:
    """Every pydantic model reachable from ``root``'s field annotations."""
    found: set[type[BaseModel]] = set()
    todo: list[object] = [root]
    while todo:
        item = todo.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item not in found:
                found.add(item)
                todo += [f.annotation for f in item.model_fields.values()]
        else:
            todo += typing.get_args(item)
    return found


# --------------------------------------------------------------------------------------------
# Shipped policies and the schema
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_validate(path: Path) -> None:
    policy = load_policy(path)
    assert policy.api_version == policies.API_VERSION
    assert policy.spec.concepts
    assert Policy.model_validate(policy.model_dump(mode="json")) == policy


def test_demo_policy_contents() -> None:
    policy = load_policy(DEMO)
    assert [c.id for c in policy.spec.concepts] == ["zorblax", "stripes", "star"]
    assert {m.builtin for m in policy.spec.models.present().values()} == {"conceptworld"}
    assert policy.concept("zorblax").anchor == "a green circle"
    assert policy.concept("star").method.name == "text_encoder"
    with pytest.raises(KeyError, match="zorblax, stripes, star"):
        policy.concept("mordak")


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((POLICY_DIR / "schema.json").read_text(encoding="utf-8"))
    assert committed == json_schema(), "Regenerate with: conceptguard policy schema --out policies/schema.json"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_json_schema_accepts_shipped_policies_and_rejects_unknown_keys(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads((POLICY_DIR / "schema.json").read_text(encoding="utf-8")))
    data = load_policy(path).model_dump(mode="json")
    validator.validate(data)
    data["spec"]["concepts"][0]["method"]["stesp"] = 100
    assert not validator.is_valid(data)


def test_every_model_forbids_extra_keys_and_describes_every_field() -> None:
    models = _models(Policy)
    assert set(METHOD_CONFIGS.values()) <= models
    for model in models:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_method_registry_matches_the_union() -> None:
    union = typing.get_args(typing.get_args(policies.MethodConfig)[0])
    assert set(METHOD_CONFIGS.values()) == set(union)
    assert all(cls.model_fields["name"].default == name for name, cls in METHOD_CONFIGS.items())


# --------------------------------------------------------------------------------------------
# Round trips and hashes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", sorted(METHOD_CONFIGS))
def test_method_config_round_trips(method_name: str) -> None:
    config = METHOD_CONFIGS[method_name]()
    assert pickle.loads(pickle.dumps(config)) == config
    assert type(config).model_validate_json(config.model_dump_json()) == config

    policy = _policy_with(config)
    assert policy.spec.concepts[0].method == config
    assert Policy.model_validate(policy.model_dump(mode="json")) == policy
    assert Policy.model_validate_json(policy.model_dump_json()) == policy
    assert Policy.model_validate(json.loads(json.dumps(policy.model_dump(mode="json")))) == policy
    assert policy.model_copy(deep=True) == policy
    assert pickle.loads(pickle.dumps(policy)) == policy

    concept = policy.spec.concepts[0]
    again = Policy.model_validate_json(policy.model_dump_json())
    assert again.spec.concepts[0].spec_hash() == concept.spec_hash()
    assert again.fingerprint() == policy.fingerprint()
    assert pickle.loads(pickle.dumps(policy)).fingerprint() == policy.fingerprint()


def test_target_shorthand_equals_mapping_form() -> None:
    short = load_policy_text(MINIMAL)
    long = load_policy_text(MINIMAL.replace("target: zorblax", "target: {text: zorblax, phrasings: []}"))
    assert short == long
    assert short.spec.concepts[0].spec_hash() == long.spec.concepts[0].spec_hash()


def test_spec_hash_tracks_every_field() -> None:
    concept = load_policy_text(MINIMAL).spec.concepts[0]
    digest = concept.spec_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0
    variants = [
        {"anchor": "a green square"},
        {"preserve": ["quibbit"]},
        {"scope": "image"},
        {"method": concept.method.model_copy(update={"steps": 101})},
        {"target": concept.target.model_copy(update={"phrasings": ["the zorblax"]})},
    ]
    hashes = {ConceptSpec.model_validate(concept.model_copy(update=u).model_dump(mode="json")).spec_hash() for u in variants}
    assert digest not in hashes and len(hashes) == len(variants)


def test_fingerprint_covers_metadata() -> None:
    policy = load_policy(DEMO)
    bumped = load_policy_text(DEMO.read_text(encoding="utf-8").replace("version: 1.0.0", "version: 1.0.1"))
    assert bumped.spec == policy.spec
    assert bumped.fingerprint() != policy.fingerprint()


# --------------------------------------------------------------------------------------------
# Loader: broken files, YAML details
# --------------------------------------------------------------------------------------------


def test_every_bad_policy_has_an_expectation() -> None:
    assert sorted(p.name for p in BAD_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_policy_is_rejected_at_the_right_place(name: str) -> None:
    path = BAD_DIR / name
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    issues = info.value.issues
    expected = EXPECTED[name]
    assert len(issues) == len(expected), str(info.value)
    for issue, want in zip(issues, expected):
        assert issue.file == str(path)
        assert (issue.line, issue.field) == (want["line"], want["field"]), str(issue)
        for fragment in want["contains"]:
            assert fragment in issue.message, str(issue)
        where = f"{path}:{want['line']}" if want["line"] is not None else str(path)
        prefix = f"{where}: {want['field']}: " if want["field"] else f"{where}: "
        assert str(issue).startswith(prefix)
        assert prefix in str(info.value)


def test_policy_error_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError) as info:
        load_policy(BAD_DIR / "negative_steps.yaml")
    error = info.value
    assert isinstance(error, PolicyError)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.issues == error.issues and str(copy) == str(error)


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="No such file"):
        load_policy(tmp_path / "nope.yaml")


def test_exponent_floats_are_numbers() -> None:
    policy = load_policy_text(_minimal(learning_rate="2e-6"))
    assert policy.spec.concepts[0].method.learning_rate == pytest.approx(2e-6)


def test_numbers_are_not_coerced() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(_minimal(steps='"100"'), "p.yaml")
    (issue,) = info.value.issues
    assert (issue.line, issue.field) == (17, "spec.concepts[0].method.steps")
    assert "without quotes" in issue.message


def test_unquoted_version_asks_for_quotes() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(MINIMAL.replace("version: 1.0.0", "version: 1.0"), "p.yaml")
    (issue,) = info.value.issues
    assert (issue.line, issue.field) == (5, "metadata.version")
    assert "quotes" in issue.message


def test_unsafe_yaml_tags_are_refused() -> None:
    text = MINIMAL.replace("owner: tests", "owner: !!python/object/apply:os.getcwd []")
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "evil.yaml")
    (issue,) = info.value.issues
    assert issue.line == 6 and "Invalid YAML" in issue.message


def test_anchor_equal_to_target_is_rejected() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(MINIMAL.replace("anchor: a green circle", "anchor: Zorblax"), "p.yaml")
    (issue,) = info.value.issues
    assert (issue.line, issue.field) == (14, "spec.concepts[0].anchor")


def test_missing_method_name_is_reported_on_the_method() -> None:
    text = MINIMAL.replace("        name: ablation\n", "        steps: 3\n")
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    (issue,) = info.value.issues
    assert (issue.line, issue.field) == (15, "spec.concepts[0].method")
    assert "closed_form" in issue.message


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(MINIMAL.replace("kind: ConceptPolicy", "kind: ConceptPolicy\nmetdata: {}"), "p.yaml")
    messages = {i.field: (i.line, i.message) for i in info.value.issues}
    line, message = messages["metdata"]
    assert line == 3 and "apiVersion, kind, metadata, spec" in message and "'metadata'" in message


def test_models_need_one_entry() -> None:
    text = MINIMAL.replace("    text_to_image: {builtin: conceptworld}\n", "    text_to_image: null\n")
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    (issue,) = info.value.issues
    assert (issue.line, issue.field) == (8, "spec.models")


# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------


def _edited_demo(tmp_path: Path) -> Path:
    """The demo with zorblax at 250 steps, a new concept and a bumped version."""
    text = DEMO.read_text(encoding="utf-8")
    text = text.replace("version: 1.0.0", "version: 1.1.0")
    text = text.replace("        parameters: cross_attn_kv\n        steps: 100\n", "        parameters: cross_attn_kv\n        steps: 250\n", 1)
    text += (
        "\n    - id: quibbit\n      category: instance\n      target: quibbit\n"
        "      anchor: a purple triangle\n      method: {name: closed_form}\n"
    )
    path = tmp_path / "demo-v1.1.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_diff_policies(tmp_path: Path) -> None:
    result = diff_policies(load_policy(DEMO), load_policy(_edited_demo(tmp_path)))
    assert result.added == ("quibbit",) and result.removed == ()
    assert list(result.changed) == ["zorblax"]
    (change,) = result.changed["zorblax"]
    assert (change.field, change.old, change.new) == ("method.steps", 100, 250)
    assert result.version_change is not None and result.version_change.new == "1.1.0"
    assert not result.models


def test_diff_of_a_switched_method_reports_the_whole_method() -> None:
    old = load_policy_text(MINIMAL)
    new = load_policy_text(MINIMAL.replace("name: ablation", "name: closed_form"))
    (change,) = diff_policies(old, new).changed["zorblax"]
    assert change.field == "method" and change.new["name"] == "closed_form"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_validate_ok() -> None:
    result = runner.invoke(policy_app, ["validate", *map(str, SHIPPED)])
    assert result.exit_code == 0, result.output
    assert f"ok {DEMO} (conceptworld-demo v1.0.0, 3 concepts)" in result.stdout


def test_cli_validate_reports_issues_and_fails() -> None:
    bad = BAD_DIR / "negative_steps.yaml"
    result = runner.invoke(policy_app, ["validate", str(DEMO), str(bad)])
    assert result.exit_code == 1
    assert f"ok {DEMO}" in result.stdout
    assert f"{bad}:19: spec.concepts[0].method.steps: Got -5" in result.stdout


def test_cli_validate_all_bad_files_fail() -> None:
    result = runner.invoke(policy_app, ["validate", *map(str, sorted(BAD_DIR.glob("*.yaml")))])
    assert result.exit_code == 1
    assert "ok " not in result.stdout


def test_cli_explain() -> None:
    result = runner.invoke(policy_app, ["explain", str(DEMO)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "text_to_image: builtin conceptworld (float32)" in out
    assert "method: text_encoder (parameters: text_encoder; 100 steps)" in out
    assert "anchor: 'a green circle'" in out and "preserve: 4 prompts" in out
    assert "estimate" in out


def test_cli_explain_invalid_file_fails() -> None:
    result = runner.invoke(policy_app, ["explain", str(BAD_DIR / "missing_anchor.yaml")])
    assert result.exit_code == 1
    assert "missing_anchor.yaml:18" in result.output


def test_cli_diff(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["diff", str(DEMO), str(_edited_demo(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert 'metadata.version: "1.0.0" -> "1.1.0"' in out
    assert "+ concept quibbit (instance, closed_form)" in out
    assert "~ concept zorblax: method.steps" in out
    assert "method.steps: 100 -> 250" in out
    assert "note:" not in out


def test_cli_diff_of_identical_files() -> None:
    result = runner.invoke(policy_app, ["diff", str(DEMO), str(DEMO)])
    assert result.exit_code == 0 and result.stdout.strip() == "no changes"


def test_cli_diff_notes_a_missing_version_bump(tmp_path: Path) -> None:
    edited = _edited_demo(tmp_path)
    edited.write_text(edited.read_text(encoding="utf-8").replace("version: 1.1.0", "version: 1.0.0"), encoding="utf-8")
    result = runner.invoke(policy_app, ["diff", str(DEMO), str(edited)])
    assert result.exit_code == 0
    assert "metadata.version:" not in result.stdout
    assert "note: the content changed but metadata.version is still 1.0.0" in result.stdout


def test_cli_schema(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json_schema()
    out = tmp_path / "schema.json"
    result = runner.invoke(policy_app, ["schema", "--out", str(out)])
    assert result.exit_code == 0
    assert json.loads(out.read_text(encoding="utf-8")) == json_schema()
