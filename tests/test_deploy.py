"""The deployment files parse, and the Ray Serve configs build the application (no Ray started)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _build_from(serve_config: dict):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import app_builder

    schema = ServeDeploySchema.model_validate(serve_config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_config)
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "serve.app:app_builder"
    args = dict(app_cfg.args)
    if not Path(args["policy"]).exists():  # cluster paths: build with the shipped demo policy
        args["policy"] = "policies/conceptworld-demo.yaml"
    args["cache_dir"] = None
    return app_builder(args)


def test_serve_config_builds_the_application():
    from ray.serve import Application

    cfg = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    assert isinstance(_build_from(cfg), Application)


def test_kuberay_rayservice_parses_and_its_serve_config_builds():
    from ray.serve import Application

    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"])
    assert any(d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"] for d in docs)
    assert isinstance(_build_from(yaml.safe_load(service["spec"]["serveConfigV2"])), Application)


def test_grafana_dashboard_queries_only_metrics_the_app_exports():
    from serve.metrics import Metrics

    dash = json.loads((DEPLOY / "grafana" / "conceptguard-dashboard.json").read_text())
    exported = {m.name for m in Metrics().registry.collect()}
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("requests", "latency", "blocked", "build", "policy version", "readiness"):
        assert needed in titles
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"conceptguard_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|total|sum|count)$", "", name)
                assert base in exported or name in exported, name


def test_prometheus_scrapes_the_metrics_endpoint():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "conceptguard")
    assert job["metrics_path"] == "/metrics"


def test_dockerfile_runs_the_server():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^CMD \["conceptguard", "serve"', text, re.M)
    assert "torch==2.13.0" in text


def test_a_bad_serve_setting_is_rejected_with_its_name():
    from pydantic import ValidationError

    from serve.app import app_builder

    with pytest.raises(ValidationError, match="image_replica"):
        app_builder({"image_replica": 2})
