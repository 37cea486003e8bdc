"""The replica core without Ray: fail closed, atomic policy updates, batched generation."""

from __future__ import annotations

import pytest
import torch

from policies import PolicyError, load_policy_text
from unlearn import BaseModelMismatchError, PatchCache, PatchError, get_method
from unlearn.engine import job_key, load_policy_pipelines, plan
from serve.model import PatchedModel

POLICY = """\
apiVersion: conceptguard.dev/v1
kind: ConceptPolicy
metadata: {{name: replica, version: {version}, owner: tests}}
spec:
  models:
    text_to_image: {{builtin: conceptworld}}
  concepts:
    - id: {cid}
      category: instance
      target: {{text: {cid}, phrasings: [the {cid}]}}
      anchor: {anchor}
      preserve: [quibbit, a red star on stripes]
      method: {{name: closed_form}}
"""


def policy(version="1.0.0", cid="zorblax", anchor="a green circle") -> str:
    return POLICY.format(version=version, cid=cid, anchor=anchor)


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return PatchedModel("text_to_image", policy(), cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_replica_is_ready_with_its_policy_in_force(replica):
    info = replica.info()
    assert info["ready"] and info["policy"]["version"] == "1.0.0"
    assert [p["concepts"] for p in info["policy"]["patches"]] == [["zorblax"]]
    out = replica.generate([{"prompt": "a red star", "n": 2, "steps": 5, "guidance": 5.0, "seed": 0, "width": None, "height": None}])
    assert len(out[0]["arrays"]) == 2 and out[0]["policy_version"] == "1.0.0"


def test_invalid_update_is_rejected_and_the_old_policy_keeps_serving(replica):
    before = {k: v.clone() for k, v in replica.pipe.unet.state_dict().items()}
    with pytest.raises(PolicyError, match="close_form"):
        replica.update_policy(policy("1.1.0").replace("closed_form", "close_form"))
    assert replica.info()["policy"]["version"] == "1.0.0"
    assert all(torch.equal(before[k], v) for k, v in replica.pipe.unet.state_dict().items())


def test_update_swaps_to_the_new_version(replica):
    desc = replica.update_policy(policy("2.0.0", "mordak", "a blue square"))
    assert desc["version"] == "2.0.0" and desc["concepts"] == ["mordak"]
    assert replica.info()["policy"]["version"] == "2.0.0"


def test_cpu_replica_serves_through_the_traced_denoiser_with_the_eager_outputs(replica):
    from serve.traced import trace_pipeline, untrace_pipeline

    request = {"prompt": "zorblax", "n": 2, "steps": 5, "guidance": 5.0, "seed": 3, "width": None, "height": None}
    traced = replica.generate([request])[0]["arrays"]
    info = replica.info()["denoiser"]
    assert info["traced"] and info["calls"]["traced"] >= 5
    untrace_pipeline(replica.pipe)
    try:
        eager = replica.generate([request])[0]["arrays"]
    finally:
        replica.tracer = trace_pipeline(replica.pipe)
    for a, b in zip(traced, eager):  # to rounding: the trace may use the direct convolution kernel (serve.traced)
        assert abs(a - b).max() <= 1e-5


def test_replica_with_a_patch_for_another_base_never_becomes_ready(tmp_path, tiny_pipeline):
    pol = load_policy_text(policy(), "p.yaml")
    models = load_policy_pipelines(pol)
    (job,) = plan(pol, models)
    key = job_key(job, models["text_to_image"], 0)
    # a patch built on another model, planted where this model's patch belongs
    foreign = get_method("closed_form")(job.config).build(tiny_pipeline(), job.concepts, progress=False)
    PatchCache(tmp_path).put(key, foreign)
    with pytest.raises(BaseModelMismatchError, match="Rebuild the patch for this base model"):
        PatchedModel("text_to_image", policy(), cache_dir=str(tmp_path))


def test_policy_without_this_model_is_refused():
    with pytest.raises(PatchError, match="spec.models.text_to_video"):
        PatchedModel("text_to_video", policy())
