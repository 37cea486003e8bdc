"""End to end on CPU: the real Ray Serve app over the ConceptWorld models and a real policy.

One local Ray for the module. The policy removes ``zorblax`` with the closed-form edit (no
gradient steps, so replicas are ready in seconds); the rollout test switches to a version that
also removes ``mordak``.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import conceptworld

PORT = 8765
URL = f"http://127.0.0.1:{PORT}"

POLICY = """\
apiVersion: conceptguard.dev/v1
kind: ConceptPolicy
metadata: {{name: e2e, version: {version}, owner: tests}}
spec:
  models:
    text_to_image: {{builtin: conceptworld}}
    text_to_video: {{builtin: conceptworld}}
  concepts:
    - id: zorblax
      category: instance
      target: {{text: zorblax, phrasings: [the zorblax, a picture of zorblax]}}
      anchor: a green circle
      preserve: [a green circle, a green square, quibbit, mordak, a red star on stripes]
      method: {{name: closed_form}}
{extra}"""

MORDAK = """\
    - id: mordak
      category: instance
      target: {text: mordak, phrasings: [the mordak]}
      anchor: a blue square
      preserve: [a blue square, zorblax, quibbit]
      method: {name: closed_form}
"""


def write_policy(path: Path, version: str, extra: str = "") -> Path:
    path.write_text(POLICY.format(version=version, extra=extra))
    return path


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="conceptguard-tests")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield tmp_path_factory.mktemp("serve")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def app(ray_serve):
    from ray import serve

    from serve.app import ServeSettings, build_app

    policy = write_policy(ray_serve / "policy-v1.yaml", "1.0.0")
    settings = ServeSettings(policy=str(policy), cache_dir=str(ray_serve / "cache"), num_cpus=1)
    serve.run(build_app(settings), name="conceptguard", route_prefix="/")
    return settings


def decode_images(body: dict) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64"])))) for d in body["data"]])


def test_generation_through_http_has_the_concept_removed(app):
    r = httpx.post(f"{URL}/v1/images", json={"prompt": "zorblax on dots", "n": 8, "seed": 1}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-policy-version"] == "1.0.0"
    rows = conceptworld.judge(decode_images(r.json()))
    assert sum(row["instance"][0] == "zorblax" for row in rows) <= 1, rows
    r = httpx.post(f"{URL}/v1/images", json={"prompt": "quibbit on a checkerboard", "n": 8, "seed": 2}, timeout=120)
    rows = conceptworld.judge(decode_images(r.json()))
    assert sum(row["instance"][0] == "quibbit" for row in rows) >= 6, rows


def test_png_and_video_responses(app):
    r = httpx.post(f"{URL}/v1/images", json={"prompt": "a red star on stripes", "response_format": "png"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    r = httpx.post(f"{URL}/v1/videos", json={"prompt": "a blue circle moving right", "seed": 4, "container": "gif", "response_format": "binary"}, timeout=300)
    assert r.status_code == 200 and r.content[:3] == b"GIF" and r.headers["x-policy-version"] == "1.0.0"
    import imageio.v3 as iio

    frames = iio.imread(r.content, extension=".gif", index=None)[..., :3]
    assert frames.shape[0] == 8
    rows = conceptworld.judge(frames.astype(np.float32) / 255.0)
    assert sum(row["shape"][0] == "circle" and row["color"][0] == "blue" for row in rows) >= 6, rows


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 501}, "prompt"),
        ({"prompt": "a star", "steps": 0}, "steps"),
        ({"prompt": "a star", "n": 99}, "n"),
        ({"prompt": "a star", "width": 30}, "width"),
        ({"prompt": "a star", "colour": "red"}, "colour"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(app, body, field):
    r = httpx.post(f"{URL}/v1/images", json=body, timeout=30)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == field and field in err["message"]
    assert "Traceback" not in r.text


def test_malformed_json_and_frames_out_of_range(app):
    r = httpx.post(f"{URL}/v1/images", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "Traceback" not in r.text
    r = httpx.post(f"{URL}/v1/videos", json={"prompt": "a star", "num_frames": 100}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["field"] == "num_frames"
    assert httpx.get(f"{URL}/healthz", timeout=30).status_code == 200  # still serving


def test_policy_health_readiness_and_metrics(app):
    pol = httpx.get(f"{URL}/v1/policy", timeout=30).json()
    for kind in ("text_to_image", "text_to_video"):
        assert pol[kind]["ready"] and pol[kind]["policy"]["version"] == "1.0.0"
        assert [p["concepts"] for p in pol[kind]["policy"]["patches"]] == [["zorblax"]]
    assert httpx.get(f"{URL}/readyz", timeout=30).json()["ready"] is True
    httpx.post(f"{URL}/v1/images", json={"prompt": "a red star"}, timeout=120)
    text = httpx.get(f"{URL}/metrics", timeout=30).text
    assert 'conceptguard_requests_total{endpoint="/v1/images",status="200"}' in text
    assert 'conceptguard_replica_ready{model="text_to_image"} 1.0' in text
    assert 'conceptguard_policy_info{model="text_to_image",policy="e2e",version="1.0.0"} 1.0' in text
    assert "zorblax on dots" not in text


def _batch_counts() -> tuple[float, float]:
    """(requests, summed batch sizes) of /v1/images so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    vals = {}
    for fam in text_string_to_metric_families(httpx.get(f"{URL}/metrics", timeout=30).text):
        for smp in fam.samples:
            if smp.name.startswith("conceptguard_batch_size_") and smp.labels.get("endpoint") == "/v1/images":
                vals[smp.name] = smp.value
    return vals.get("conceptguard_batch_size_count", 0.0), vals.get("conceptguard_batch_size_sum", 0.0)


def test_concurrent_requests_are_batched_and_each_gets_its_own_image(app):
    prompts = {"a red star on stripes": ("star", "red"), "a blue circle on dots": ("circle", "blue")}
    jobs = [(list(prompts)[i % 2], i) for i in range(12)]
    count0, sum0 = _batch_counts()
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: httpx.post(f"{URL}/v1/images", json={"prompt": job[0], "seed": job[1]}, timeout=120), jobs))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    # every answer is the image of its own prompt, not of another request in its batch
    rows = conceptworld.judge(np.concatenate([decode_images(r.json()) for r in responses]))
    hits = [(row["shape"][0], row["color"][0]) == prompts[prompt] for row, (prompt, _) in zip(rows, jobs)]
    assert sum(hits) >= 11, list(zip(jobs, rows))
    count1, sum1 = _batch_counts()
    assert count1 - count0 == len(jobs)
    assert (sum1 - sum0) / len(jobs) > 2, "concurrent requests were generated one by one"


def test_rollout_while_serving_answers_every_request(app, ray_serve):
    from ray import serve

    from serve.app import build_app

    statuses: list[int] = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                statuses.append(c.post(f"{URL}/v1/images", json={"prompt": "mordak on dots", "steps": 10}).status_code)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.0)
    v2 = write_policy(ray_serve / "policy-v2.yaml", "1.1.0", MORDAK)
    serve.run(build_app(app.model_copy(update={"policy": str(v2)})), name="conceptguard", route_prefix="/")
    deadline = time.time() + 120
    while time.time() < deadline:
        pol = httpx.get(f"{URL}/v1/policy", timeout=30).json()
        if all(pol[k]["policy"]["version"] == "1.1.0" for k in pol):
            break
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    t.join(120)
    assert statuses and all(s == 200 for s in statuses), statuses
    pol = httpx.get(f"{URL}/v1/policy", timeout=30).json()
    assert pol["text_to_image"]["policy"]["version"] == "1.1.0"
    r = httpx.post(f"{URL}/v1/images", json={"prompt": "mordak on dots", "n": 8, "seed": 3}, timeout=120)
    assert r.headers["x-policy-version"] == "1.1.0"
    rows = conceptworld.judge(decode_images(r.json()))
    assert sum(row["instance"][0] == "mordak" for row in rows) <= 1, rows


def test_replica_with_a_patch_for_another_base_never_becomes_ready(ray_serve, tiny_pipeline):
    from ray import serve

    from policies import load_policy_text
    from serve.app import ServeSettings, build_app
    from unlearn import PatchCache, get_method
    from unlearn.engine import job_key, load_policy_pipelines, plan

    text = POLICY.format(version="9.0.0", extra="").replace("    text_to_video: {builtin: conceptworld}\n", "")
    path = ray_serve / "policy-wrong-base.yaml"
    path.write_text(text)
    pol = load_policy_text(text, str(path))
    models = load_policy_pipelines(pol)
    (job,) = plan(pol, models)
    foreign = get_method("closed_form")(job.config).build(tiny_pipeline(), job.concepts, progress=False)
    cache = ray_serve / "foreign-cache"
    PatchCache(cache).put(job_key(job, models["text_to_image"], 0), foreign)  # where this model's patch belongs

    settings = ServeSettings(policy=str(path), cache_dir=str(cache), num_cpus=1)
    with pytest.raises(RuntimeError):
        serve.run(build_app(settings), name="wrong-base", route_prefix="/wrong")
    status = serve.status().applications["wrong-base"]
    assert status.status == "DEPLOY_FAILED"
    assert "Rebuild the patch for this base model" in status.deployments["ImageModel"].message
    r = httpx.get(f"{URL}/wrong/readyz", timeout=60)
    assert r.status_code == 503 and not r.json()["ready"]
    assert "Rebuild the patch for this base model" in r.json()["models"]["text_to_image"]["reason"]
    assert httpx.post(f"{URL}/wrong/v1/images", json={"prompt": "zorblax"}, timeout=60).status_code == 503
    serve.delete("wrong-base")


def test_invalid_policy_update_keeps_the_old_policy(app, ray_serve):
    from typer.testing import CliRunner

    from serve.cli import app as cli

    bad = ray_serve / "bad.yaml"
    bad.write_text(POLICY.format(version="2.0.0", extra="").replace("closed_form", "close_form"))
    result = CliRunner().invoke(cli, ["policy", "apply", str(bad)])
    assert result.exit_code == 1 and "close_form" in result.output and "unchanged" in result.output
    assert httpx.get(f"{URL}/readyz", timeout=30).status_code == 200
