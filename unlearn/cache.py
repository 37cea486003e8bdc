"""A content-addressed cache of patches, safe for several processes on one shared folder.

The key of a patch is a hash of everything that determines it (method, options, concept specs,
the fingerprints of the base components, project version). A build happens under an exclusive
file lock, so concurrent builders of the same key yield exactly one build; files are written
under a temporary name and renamed into place, so no reader ever sees a torn file; and every
entry carries a sha256 checksum, so a corrupt entry is detected, removed and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

from .patch import Patch, PatchError

logger = logging.getLogger(__name__)

ENV = "CONCEPTGUARD_CACHE"


def default_cache_dir() -> Path:
    """``$CONCEPTGUARD_CACHE``, else ``~/.cache/conceptguard/patches``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "conceptguard" / "patches")


def cache_key(spec: Mapping) -> str:
    """sha256 of the canonical JSON of ``spec``."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class PatchCache:
    def __init__(self, root: str | Path | None = None, lock_timeout_s: float = 3600.0):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.lock_timeout_s = lock_timeout_s

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _checksum_path(self, key: str) -> Path:
        return self.path(key).with_suffix(".sha256")

    def get(self, key: str) -> Patch | None:
        """The cached patch, or ``None`` when absent; a corrupt entry is removed and ``None`` returned."""
        path, sums = self.path(key), self._checksum_path(key)
        if not path.exists() or not sums.exists():
            return None
        expected = sums.read_text().strip()
        if _sha256_file(path) != expected:
            logger.warning("cache entry %s fails its checksum; removing it so it is rebuilt", path)
            self._remove(key)
            return None
        try:
            return Patch.load(path)
        except PatchError as e:
            logger.warning("cache entry %s is unreadable (%s); removing it so it is rebuilt", path, e)
            self._remove(key)
            return None

    def _remove(self, key: str) -> None:
        for p in (self.path(key), self._checksum_path(key)):
            p.unlink(missing_ok=True)

    def put(self, key: str, patch: Patch) -> Path:
        path = patch.save(self.path(key))
        tmp = self._checksum_path(key).with_suffix(".sha256.tmp")
        tmp.write_text(_sha256_file(path) + "\n")
        os.replace(tmp, self._checksum_path(key))
        return path

    @contextmanager
    def lock(self, key: str):
        """An exclusive lock on ``key`` shared by every process using this cache folder."""
        lock_path = self.path(key).with_suffix(".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise PatchError(
                            f"Waited {self.lock_timeout_s:.0f} s for another builder of cache entry {key[:12]}… ({lock_path}). "
                            "If no builder is running, delete the lock file."
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def get_or_build(self, key: str, build: Callable[[], Patch]) -> tuple[Patch, bool]:
        """The patch for ``key``, building it (once across processes) when missing.

        Returns ``(patch, built)`` where ``built`` says whether this call ran ``build``.
        """
        cached = self.get(key)
        if cached is not None:
            return cached, False
        with self.lock(key):
            cached = self.get(key)  # another process may have built it while we waited
            if cached is not None:
                return cached, False
            patch = build()
            self.put(key, patch)
            return patch, True
