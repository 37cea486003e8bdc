"""The ConceptWorld judge: a small CNN that says which concepts an image shows.

For every attribute family (shape, color, background, instance) it returns the predicted value
and its softmax confidence; a regression head gives the object's centre, from which the motion
of a video is read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .world import ATTRIBUTES, IMAGE_SIZE

HEADS: dict[str, int] = {name: len(values) for name, values in ATTRIBUTES.items()}


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AvgPool2d(2),
        )
        feat = 4 * width * (IMAGE_SIZE // 8) ** 2
        self.trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(feat, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, n) for name, n in HEADS.items()})
        self.position = nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``x``: ``(N, 3, H, W)`` in [0, 1]. Returns logits per head and centres in [0, 1]."""
        h = self.trunk(self.features(x * 2.0 - 1.0))
        return {name: head(h) for name, head in self.heads.items()}, torch.sigmoid(self.position(h))


def to_tensor(images) -> torch.Tensor:
    """Accept PIL images, a ``(N, H, W, 3)`` array (uint8 or float in [0, 1]) or a
    ``(N, 3, H, W)`` tensor in [0, 1]; return ``(N, 3, 32, 32)`` float32 in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"Got images of shape {tuple(x.shape)}. The judge reads RGB images: (N, H, W, 3) or (N, 3, H, W).")
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x.clamp(0.0, 1.0)


class Judge:
    """Callable wrapper around a trained :class:`JudgeNet`."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, folder: str | Path) -> "Judge":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        net = JudgeNet(width=config["width"])
        state = load_file(folder / "model.safetensors")
        net.load_state_dict(state, strict=True)
        return cls(net)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        conv_width = self.net.features[0][0].out_channels
        (folder / "config.json").write_text(json.dumps({"width": conv_width, "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}}, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors")

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 256) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Softmax probabilities per head and centres (pixels) for a batch of images."""
        x = to_tensor(images)
        probs: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        centres = []
        for i in range(0, len(x), batch_size):
            logits, pos = self.net(x[i : i + batch_size])
            for k, v in logits.items():
                probs[k].append(v.softmax(-1))
            centres.append(pos * IMAGE_SIZE)
        return {k: torch.cat(v) for k, v in probs.items()}, torch.cat(centres)

    def __call__(self, images) -> list[dict[str, tuple[str, float]]]:
        probs, _ = self.predict(images)
        out = []
        for i in range(len(probs["shape"])):
            row = {}
            for name, values in ATTRIBUTES.items():
                conf, idx = probs[name][i].max(-1)
                row[name] = (values[int(idx)], float(conf))
            out.append(row)
        return out

    def video(self, frames: Sequence) -> dict:
        """Judge one clip: per-frame attributes and the motion direction read from the centres."""
        probs, centres = self.predict(frames)
        per_frame = self(frames)
        k = max(1, len(centres) // 3)
        delta = centres[-k:].mean(0) - centres[:k].mean(0)
        dx, dy = float(delta[0]), float(delta[1])
        if abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
        travel = (dx * dx + dy * dy) ** 0.5
        return {"frames": per_frame, "motion": (direction, travel), "centres": centres.tolist()}

