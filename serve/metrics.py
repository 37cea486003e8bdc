"""Prometheus metrics of the serving app (prometheus-client, its own registry).

Labels are low-cardinality by design: endpoint, status, model, concept id, policy name and
version; never a prompt. Request-side metrics are recorded by the ingress as requests pass;
replica-side state (readiness, patches, build and apply times) is read from the model
deployments when Prometheus scrapes ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("conceptguard_requests_total", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.latency = Histogram("conceptguard_request_duration_seconds", "End-to-end request latency.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.generation = Histogram("conceptguard_generation_duration_seconds", "Time a model replica spent generating one batch.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("conceptguard_batch_size", "Requests per generation batch.", ["endpoint"], buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.ready = Gauge("conceptguard_replica_ready", "1 when the model deployment has a verified policy in force.", ["model"], registry=r)
        self.patches = Gauge("conceptguard_patches_applied", "Patches in force on the model.", ["model"], registry=r)
        self.build_seconds = Gauge("conceptguard_patch_build_seconds", "Seconds spent building or fetching the patches of each concept.", ["model", "concept"], registry=r)
        self.apply_seconds = Gauge("conceptguard_patch_apply_seconds", "Seconds spent applying and verifying the policy's patches.", ["model"], registry=r)
        self.policy = Gauge("conceptguard_policy_info", "The policy in force (value 1), by name and version.", ["model", "policy", "version"], registry=r)
        self.guard = Counter("conceptguard_guard_decisions_total", "Guard hits by action taken, reason and concept.", ["action", "reason", "concept"], registry=r)
        self.guard_latency = Histogram("conceptguard_guard_duration_seconds", "Guard time per request (embedding loading and checks).", buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5), registry=r)
        self._policy_labels: dict[str, tuple[str, str, str]] = {}
        self.scans = Counter("conceptguard_embedding_scans_total", "Embedding scans by outcome (allow, flag, censor, block, rejected).", ["outcome"], registry=r)

    def observe_replica(self, model: str, info: dict | None) -> None:
        """Refresh the replica-side gauges from a model deployment's ``info()``."""
        ready = bool(info and info.get("ready"))
        self.ready.labels(model).set(1.0 if ready else 0.0)
        if not ready:
            self.patches.labels(model).set(0)
            return
        pol = info["policy"]
        self.patches.labels(model).set(len(pol["patches"]))
        self.apply_seconds.labels(model).set(pol["apply_seconds"])
        for p in pol["patches"]:
            for concept in p["concepts"]:
                self.build_seconds.labels(model, concept).set(p["seconds"])
        labels = (model, pol["name"], pol["version"])
        previous = self._policy_labels.get(model)
        if previous is not None and previous != labels:  # one series per model: the policy in force
            self.policy.remove(*previous)
        self._policy_labels[model] = labels
        self.policy.labels(*labels).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
