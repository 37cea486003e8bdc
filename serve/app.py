"""The Ray Serve application: a FastAPI ingress composed with an image and a video deployment.

Model deployments receive the policy as ``user_config`` (``{"policy_yaml": ..., "source": ...}``)
so that a new policy version rolls out through Ray Serve's ``reconfigure`` without restarting
replicas: the new patches are built off the request path and swapped in atomically. The first
policy a replica receives must apply and verify, or the replica never becomes ready (fail
closed); a later invalid policy is rejected and the old one keeps serving.
"""


import asyncio
import base64
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from ray import serve
from ray.serve.handle import DeploymentHandle

from .api import ErrorResponse, GenerationResponse, ImageRequest, ScanRequest, VideoRequest
from .metrics import Metrics

logger = logging.getLogger("conceptguard.serve")

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "conceptworld-demo.yaml"
APP_NAME = "conceptguard"
# Measured on 2 CPU cores, 8 clients: 0.01 s formed batches of ~2.5 (4.7 req/s), 0.05 s batches
# of ~7 (6.3-8.2 req/s over runs); 0.2 s gave no more. See README, Serving > Measured.
DEFAULT_BATCH_WAIT_S = 0.05
DEFAULT_MAX_BATCH = 8
# batches Ray Serve may hand an image replica before the first is generated (they queue inside)
MAX_FORMED_BATCHES = 64


class ServeSettings(BaseModel):
    """Everything ``conceptguard serve`` and the Ray Serve config file can set."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(default=str(DEFAULT_POLICY), description="Path of the policy YAML file.")
    cache_dir: str | None = Field(default=None, description="Patch cache folder, shared by all replicas (a shared filesystem in a cluster).")
    device: str | None = Field(default=None, description="Device of the model replicas (cpu, cuda); default: where the pipeline loads.")
    seed: int = Field(default=0, description="Seed of the patch builds.")
    trace_denoiser: bool | None = Field(
        default=None,
        description="Replay each replica's denoiser through TorchScript traces (same outputs, about a quarter faster on a CPU); default: on for CPU replicas.",
    )
    image_replicas: PositiveInt = Field(default=1, description="Replicas of the text-to-image deployment.")
    video_replicas: PositiveInt = Field(default=1, description="Replicas of the text-to-video deployment.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per model replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per model replica.")
    torch_threads: PositiveInt | None = Field(default=None, description="Intra-op threads of a replica's torch; default: Ray's, one per CPU of num_cpus.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the model replicas, e.g. {OMP_WAIT_POLICY: PASSIVE} on a CPU shared with the HTTP proxy.")
    max_batch_size: PositiveInt = Field(default=DEFAULT_MAX_BATCH, description="Most image requests batched into one generation.")
    batch_wait_timeout_s: float = Field(
        default=DEFAULT_BATCH_WAIT_S,
        ge=0,
        description="How long a batch waits to fill. The replica's event loop shares the GIL with the generation thread, so a short wait collects few requests.",
    )
    max_ongoing_requests: PositiveInt = Field(default=32, description="Requests a model replica accepts at once.")
    gateway_max_ongoing_requests: PositiveInt = Field(
        default=256,
        description="Requests the HTTP gateway holds at once (it only waits on the models; a low limit starves their batches).",
    )


def resolve_policy_path(path: str) -> Path:
    """``path`` as given, or relative to the project folder (for config files run elsewhere)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (DEFAULT_POLICY.parents[1] / p).exists():
        return DEFAULT_POLICY.parents[1] / p
    return p


def policy_user_config(path: str) -> dict:
    """The ``user_config`` that carries a policy to the model replicas (its text, not its path,
    so replicas on other nodes need no copy of the file)."""
    p = resolve_policy_path(path)
    return {"policy_yaml": p.read_text(encoding="utf-8"), "source": str(p)}


class _ModelDeployment:
    """Shared body of the image and video deployments."""

    kind = ""

    def __init__(self, cache_dir: str | None, device: str | None, seed: int, torch_threads: int | None = None, trace_denoiser: bool | None = None):
        self.cache_dir, self.device, self.seed, self.trace_denoiser = cache_dir, device, seed, trace_denoiser
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model = None
        self.error: str | None = None

    async def reconfigure(self, user_config: dict) -> None:
        from .model import PatchedModel

        yaml_text, source = user_config["policy_yaml"], user_config.get("source", "<policy>")
        if self.model is None:
            try:
                self.model = await asyncio.to_thread(
                    PatchedModel,
                    self.kind,
                    yaml_text,
                    source_name=source,
                    cache_dir=self.cache_dir,
                    device=self.device,
                    seed=self.seed,
                    trace_denoiser=self.trace_denoiser,
                )
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                logger.error("%s replica cannot apply its policy and will not serve: %s", self.kind, self.error)
                raise
            return
        try:
            await asyncio.to_thread(self.model.update_policy, yaml_text, source)
        except Exception as e:  # the old policy stays in force
            logger.error("%s replica rejected policy update from %s, old policy still serving: %s", self.kind, source, e)

    def check_health(self) -> None:
        if self.model is None or self.model.active is None:
            raise RuntimeError(f"{self.kind} replica has no verified policy in force: {self.error or 'not configured'}")

    def scan(self, embedding: dict, prompt: str | None = None) -> dict:
        return self.model.scan(embedding, prompt)

    def info(self) -> dict:
        if self.model is None:
            return {"kind": self.kind, "ready": False, "policy": None, "last_error": self.error}
        return self.model.info()

    async def _run(self, requests: list[dict]) -> list[dict]:
        # requests with the same sampling settings share one pipeline call
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r["steps"], r["guidance"], r["width"], r["height"], r.get("num_frames")), []).append(i)
        results: list[Any] = [None] * len(requests)
        for idx in groups.values():
            try:
                out = await asyncio.to_thread(self.model.generate, [requests[i] for i in idx])
                for i, o in zip(idx, out):
                    results[i] = o
            except Exception as e:  # one bad batch never takes the replica down
                logger.exception("generation failed")
                for i in idx:
                    results[i] = {"error": f"{type(e).__name__}: {e}"}
        return results


@serve.deployment(name="ImageModel", health_check_period_s=10, health_check_timeout_s=30)
class ImageModel(_ModelDeployment):
    """Image replica: ``@serve.batch`` groups arriving requests, and batches are merged again
    when the model is free.

    Ray Serve forms a batch as soon as its first request arrives (within
    ``batch_wait_timeout_s``), also while the previous batch is still generating; under load
    that makes batches from whatever arrived in that window (~5 of 8 with 32 clients on two
    replicas). So formed batches are handed over at once (``max_concurrent_batches``) to one
    generation loop, which takes up to ``max_batch_size`` waiting requests each time the model
    is free: full batches when saturated, no added wait when idle.
    """

    kind = "text_to_image"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_batch_size = DEFAULT_MAX_BATCH
        self._waiting: asyncio.Queue | None = None
        self._loop_task: asyncio.Task | None = None  # held so the loop is never garbage-collected

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S, max_concurrent_batches=MAX_FORMED_BATCHES)
    async def generate(self, requests: list[dict]) -> list[dict]:
        if self._waiting is None:
            self._waiting = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._generation_loop())
        futures = []
        for r in requests:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.put_nowait((r, fut))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    async def _generation_loop(self) -> None:
        """Generate, one batch at a time, what is waiting (up to ``max_batch_size``, FIFO)."""
        while True:
            batch = [await self._waiting.get()]
            while len(batch) < self.max_batch_size and not self._waiting.empty():
                batch.append(self._waiting.get_nowait())
            batch = [(r, f) for r, f in batch if not f.done()]  # a cancelled request is skipped
            if not batch:
                continue
            try:
                results = await self._run([r for r, _ in batch])
            except Exception as e:  # _run answers errors per request; this is the last resort
                logger.exception("image generation loop")
                results = [{"error": f"{type(e).__name__}: {e}"}] * len(batch)
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)


@serve.deployment(name="VideoModel", health_check_period_s=10, health_check_timeout_s=30)
class VideoModel(_ModelDeployment):
    kind = "text_to_video"

    async def generate(self, request: dict) -> dict:
        return (await self._run([request]))[0]


api = FastAPI(
    title="conceptguard",
    description="Text-to-image and text-to-video generation with a concept-removal policy in force.",
    version="1",
    responses={422: {"model": ErrorResponse}},
)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field {field!r}; remove it (see the OpenAPI schema at /docs)"
    elif first.get("type") == "json_invalid":
        msg = "the body is not valid JSON"
    body = ErrorResponse(error={"type": "invalid_request", "message": f"{field}: {msg}" if field else msg, "field": field})
    return JSONResponse(status_code=422, content=body.model_dump())


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _clip(frames: np.ndarray, container: str, fps: int) -> bytes:
    import imageio.v3 as iio

    data = [(np.clip(f, 0, 1) * 255).round().astype(np.uint8) for f in frames]
    if container == "gif":
        return iio.imwrite("<bytes>", data, extension=".gif", duration=int(1000 / fps), loop=0)
    return iio.imwrite("<bytes>", data, extension=".mp4", fps=fps, macro_block_size=1)


DEPLOYMENT_NAMES = {"text_to_image": "ImageModel", "text_to_video": "VideoModel"}


def _deployment_message(deployment: str) -> str | None:
    """Ray Serve's status message for a deployment of this application (why its replicas fail
    to start, e.g. a patch that does not fit the base model), or None."""
    try:
        app_name = serve.get_replica_context().app_name
        status = serve.status().applications[app_name].deployments[deployment]
    except Exception:  # not in a replica, or Serve is shutting down
        return None
    if status.status == "HEALTHY" or not status.message:
        return None
    return f"{status.status}: {status.message.strip()[-2000:]}"


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, image: DeploymentHandle | None, video: DeploymentHandle | None, max_batch_size: int = DEFAULT_MAX_BATCH, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S):
        self.handles = {"text_to_image": image, "text_to_video": video}
        self.metrics = Metrics()
        self.batching = (max_batch_size, batch_wait_timeout_s)
        self._batching_set = False

    async def _info(self, kind: str) -> dict | None:
        handle = self.handles[kind]
        if handle is None:
            return None
        try:
            return await asyncio.wait_for(handle.info.remote(), timeout=5)
        except Exception as e:
            reason = await asyncio.to_thread(_deployment_message, DEPLOYMENT_NAMES[kind])
            return {"kind": kind, "ready": False, "policy": None, "last_error": reason or f"unreachable: {type(e).__name__}: {e}"}

    def _error(self, endpoint: str, status: int, kind: str, message: str, field: str | None = None) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(status_code=status, content=ErrorResponse(error={"type": kind, "message": message, "field": field}).model_dump())

    async def _generate(self, kind: str, endpoint: str, req: ImageRequest) -> dict | JSONResponse:
        handle = self.handles[kind]
        if handle is None:
            return self._error(endpoint, 404, "not_served", f"this deployment serves no {kind.replace('_', '-')} model")
        if kind == "text_to_image" and not self._batching_set:
            await handle.set_batching.remote(*self.batching)
            self._batching_set = True
        payload = req.model_dump()  # width/height None: the pipeline's default size
        try:
            result = await handle.generate.remote(payload)
        except Exception as e:  # no ready replica, or it died: the request fails, the gateway does not
            logger.error("%s: %s: %s", endpoint, type(e).__name__, e)
            return self._error(endpoint, 503, "unavailable", f"the {kind.replace('_', '-')} model is not available; see GET /readyz")
        guard = result.get("guard") or {}
        for reason in guard.get("reasons", []):
            self.metrics.guard.labels(guard["action"], reason["kind"], reason["concept"]).inc()
        if "guard_seconds" in result:
            self.metrics.guard_latency.observe(result["guard_seconds"])
        if "error" in result:
            message, status = result["error"], result.get("status")
            if status == 400:
                return self._error(endpoint, 400, "embedding_rejected", message, "embeddings")
            if status == 403:
                return self._error(endpoint, 403, "blocked", message)
            status = 503 if message.startswith("NotReadyError") else 500
            return self._error(endpoint, status, "generation_failed", message.split(":", 1)[-1].strip() if status == 503 else "the model failed on this request; it was logged")
        self.metrics.generation.labels(endpoint).observe(result["generation_seconds"])
        self.metrics.batch_size.labels(endpoint).observe(result["batch_size"])
        return result

    def _headers(self, result: dict) -> dict:
        headers = {"X-Policy-Version": result["policy_version"]}
        guard = result.get("guard") or {}
        if guard.get("action", "allow") != "allow":
            headers["X-Guard-Action"] = guard["action"]
            headers["X-Guard-Concepts"] = ",".join(sorted({r["concept"] for r in guard["reasons"]}))
        return headers

    def _body(self, files: list[bytes], media: str, result: dict) -> dict:
        return {
            "data": [{"b64": base64.b64encode(f).decode(), "media_type": media} for f in files],
            "policy": result.get("policy", ""),
            "policy_version": result["policy_version"],
            "guard": result.get("guard") or {},
        }

    @api.post("/v1/images", response_model=GenerationResponse, responses={200: {"content": {"image/png": {}}}})
    async def images(self, req: ImageRequest):
        """Generate images with the policy in force."""
        t0 = time.perf_counter()
        result = await self._generate("text_to_image", "/v1/images", req)
        if isinstance(result, JSONResponse):
            return result
        self.metrics.latency.labels("/v1/images").observe(time.perf_counter() - t0)
        self.metrics.requests.labels("/v1/images", "200").inc()
        pngs = [_png(a) for a in result["arrays"]]
        if req.response_format == "png":
            return Response(content=pngs[0], media_type="image/png", headers=self._headers(result))
        return JSONResponse(self._body(pngs, "image/png", result), headers=self._headers(result))

    @api.post("/v1/videos", response_model=GenerationResponse, responses={200: {"content": {"image/gif": {}, "video/mp4": {}}}})
    async def videos(self, req: VideoRequest):
        """Generate clips with the policy in force."""
        t0 = time.perf_counter()
        result = await self._generate("text_to_video", "/v1/videos", req)
        if isinstance(result, JSONResponse):
            return result
        media = "image/gif" if req.container == "gif" else "video/mp4"
        files = [_clip(a, req.container, req.fps) for a in result["arrays"]]
        self.metrics.latency.labels("/v1/videos").observe(time.perf_counter() - t0)
        self.metrics.requests.labels("/v1/videos", "200").inc()
        if req.response_format == "binary":
            return Response(content=files[0], media_type=media, headers=self._headers(result))
        return JSONResponse(self._body(files, media, result), headers=self._headers(result))

    @api.post("/v1/embeddings/scan")
    async def scan(self, req: ScanRequest) -> dict:
        """Review an embedding offline: is it loadable, and what would the guard do with it?"""
        handle = self.handles["text_to_image"] or self.handles["text_to_video"]
        result = await handle.scan.remote(req.embedding.model_dump(), req.prompt)
        outcome = "rejected" if not result["accepted"] else result["verdict"]["action"]
        self.metrics.scans.labels(outcome).inc()
        self.metrics.requests.labels("/v1/embeddings/scan", "200").inc()
        return result

    @api.get("/v1/policy")
    async def policy(self) -> dict:
        """The policy in force on each model: name, version, patches and their build times."""
        return {kind: await self._info(kind) for kind, h in self.handles.items() if h is not None}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """The gateway is up."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        """Ready when every model has a verified policy in force; otherwise 503 with the reasons."""
        infos = {kind: await self._info(kind) for kind, h in self.handles.items() if h is not None}
        ready = all(i and i.get("ready") for i in infos.values())
        body = {
            "ready": ready,
            "models": {k: {"ready": bool(i and i.get("ready")), "reason": (i or {}).get("last_error"), "policy_version": ((i or {}).get("policy") or {}).get("version")} for k, i in infos.items()},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text format."""
        for kind, h in self.handles.items():
            if h is not None:
                self.metrics.observe_replica(kind, await self._info(kind))
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def build_app(settings: ServeSettings):
    """The Ray Serve application for ``settings`` (policy read and validated here, fail fast)."""
    from policies import load_policy

    policy = load_policy(resolve_policy_path(settings.policy))
    models = policy.spec.models.present()
    user_config = policy_user_config(settings.policy)
    opts = dict(
        num_replicas=None,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, **({"runtime_env": {"env_vars": settings.env_vars}} if settings.env_vars else {})},
        user_config=user_config,
        max_ongoing_requests=settings.max_ongoing_requests,
    )
    args = (settings.cache_dir, settings.device, settings.seed, settings.torch_threads, settings.trace_denoiser)
    image = ImageModel.options(**{**opts, "num_replicas": settings.image_replicas}).bind(*args) if "text_to_image" in models else None
    video = VideoModel.options(**{**opts, "num_replicas": settings.video_replicas}).bind(*args) if "text_to_video" in models else None
    # I/O only; leave the CPUs to the models. Ray's default of 5 ongoing requests would cap the
    # image batches at 5 whatever max_batch_size says.
    gateway = Gateway.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=settings.gateway_max_ongoing_requests)
    return gateway.bind(image, video, settings.max_batch_size, settings.batch_wait_timeout_s)


def app_builder(args: dict):
    """Entry point for Ray Serve config files: ``import_path: serve.app:app_builder``."""
    return build_app(ServeSettings(**(args or {})))
