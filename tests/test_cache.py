"""The patch cache: one build across processes, no torn files, corrupt entries rebuilt."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import torch

from unlearn.cache import PatchCache, cache_key
from unlearn.patch import Patch, PatchMetadata


def _patch(value: float = 1.0) -> Patch:
    meta = PatchMetadata("test", {"v": value}, ("c",), ("h",), {"unet": "f" * 64}, "0.1.0")
    return Patch({"unet/w": torch.full((64, 64), value)}, meta)


def _builder(root: str, key: str, log: str, start_at: float) -> None:
    while time.time() < start_at:  # start every process at the same moment
        time.sleep(0.001)

    def build() -> Patch:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # a slow build, so the others have to wait on the lock
        return _patch()

    patch, _ = PatchCache(root).get_or_build(key, build)
    assert torch.equal(patch.deltas["unet/w"], torch.ones(64, 64))


def test_concurrent_builders_produce_exactly_one_build(tmp_path: Path):
    key = cache_key({"concept": "zorblax", "method": "ablation"})
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=_builder, args=(str(tmp_path / "cache"), key, str(log), start_at)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text().count("built") == 1
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path: Path):
    cache = PatchCache(tmp_path)
    key = cache_key({"x": 1})
    calls = []

    def build() -> Patch:
        calls.append(1)
        return _patch(2.0)

    _, built = cache.get_or_build(key, build)
    assert built
    _, built = cache.get_or_build(key, build)
    assert not built and len(calls) == 1
    path = cache.path(key)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the tensor data
    path.write_bytes(bytes(data))
    assert cache.get(key) is None  # checksum catches it
    patch, built = cache.get_or_build(key, build)
    assert built and len(calls) == 2
    assert torch.equal(patch.deltas["unet/w"], torch.full((64, 64), 2.0))


def test_cache_key_is_order_independent_and_content_sensitive():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
