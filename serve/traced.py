"""Faster CPU inference for a pipeline's denoiser: TorchScript traces of its plain calls.

A small UNet on a CPU spends much of each denoising step outside arithmetic: Python module
calls, diffusers' attention dispatch (which inspects the processor's signature on every call),
shape checks. :func:`torch.jit.trace` records the tensor operations of one call and replays them
without that overhead; on the bundled ConceptWorld UNet a step takes about a fifth less time
(``bench/speed.py`` measures it). The outputs are the eager outputs: every new trace is compared
with the eager call on the same inputs before it is used, and one that differs is never used.

Safety, because a patched model must never silently serve its unpatched weights:

* a trace holds the module's own parameter and buffer tensors, so patches that change weights in
  place (``unlearn.patch`` adds its deltas in place, and removes them the same way) take effect in
  it at once;
* a parameter, buffer or submodule *replaced* on the denoiser or any module inside it (a LoRA
  layer injected, a weight reassigned) drops every trace, through the module registration hooks
  of :mod:`torch.nn.modules.module`; so does a changed attention processor;
* a call a trace cannot replay exactly runs eagerly: gradients enabled (training), extra
  arguments (``cross_attention_kwargs``, ``added_cond_kwargs``, ``timestep_cond``, residuals),
  a non-tensor timestep, or forward hooks on any submodule (hooks would not run inside a trace).

Traces are keyed by the shapes, dtypes and device of the inputs (one per batch size), at most
``max_traces`` of them, least recently used dropped first.

Convolution kernels (``conv_kernels``): PyTorch runs a CPU convolution through oneDNN, which pays
off on large feature maps; on the small ones of a tiny UNet (ConceptWorld's latents are 8x8)
its direct im2col + matrix-multiply kernel (``aten::thnn_conv2d``) is faster. With ``"auto"``
(the default) a CPU trace whose eager call takes under ``autotune_below_s`` is recorded both
ways, each recording is checked against the eager call, and the one that replays faster is kept
(a handful of timed calls); ``"onednn"`` records the stock calls only, ``"direct"`` always the
direct kernel. The choice applies inside the trace only: eager calls, and other threads, keep
the stock kernels. The direct kernel sums in another order, so its outputs match the eager ones
to float rounding (within ``rtol``/``atol``), not bit for bit; and since the choice is timed, two
processes may choose differently, their outputs agreeing to the same rounding. Pass
``"onednn"`` where bit-identical outputs across processes matter more than speed.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module_hooks
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_TRACERS: "weakref.WeakSet[TracedDenoiser]" = weakref.WeakSet()
_HOOK_HANDLES: list = []
_HOOK_LOCK = threading.Lock()


def _on_registration(module, name, value):
    """Global registration hook: a module inside a traced denoiser changed its structure."""
    for tracer in list(_TRACERS):
        if id(module) in tracer._module_ids:
            tracer._stale = True
    return None


def _install_registration_hooks() -> None:
    with _HOOK_LOCK:
        if not _HOOK_HANDLES:
            _HOOK_HANDLES.extend(
                [
                    _module_hooks.register_module_module_registration_hook(_on_registration),
                    _module_hooks.register_module_parameter_registration_hook(_on_registration),
                    _module_hooks.register_module_buffer_registration_hook(_on_registration),
                ]
            )


def _global_hooks_present() -> bool:
    return bool(
        _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or getattr(_module_hooks, "_global_backward_pre_hooks", None)
    )


CONV_KERNELS = ("auto", "onednn", "direct")


class _DirectConv2d(TorchFunctionMode):
    """While a trace records, route plain 2-D CPU convolutions (no groups, no dilation, numeric
    zero padding, float32) to PyTorch's direct kernel ``aten::thnn_conv2d``; anything else runs as
    called. A function mode is thread-local, so other threads are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            direct = self._direct(*args, **kwargs)
            if direct is not None:
                return direct
        return func(*args, **kwargs)

    @staticmethod
    def _direct(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        if groups != 1 or isinstance(padding, str) or pair(dilation) != (1, 1):
            return None
        if input.device.type != "cpu" or input.dtype != torch.float32 or weight.dtype != torch.float32 or input.dim() != 4:
            return None
        return torch._C._nn.thnn_conv2d(input, weight, tuple(weight.shape[2:]), bias, pair(stride), pair(padding))


class _Call(nn.Module):
    """The traced function: the denoiser's original forward with the pipeline's arguments."""

    def __init__(self, denoiser: nn.Module, forward):
        super().__init__()
        self.denoiser = denoiser
        self._forward = forward

    def forward(self, sample, timestep, encoder_hidden_states):
        return self._forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class TracedDenoiser:
    """Replaces ``denoiser.forward`` with traced replays of its plain inference calls.

    Use :func:`trace_pipeline` / :func:`untrace_pipeline`; ``calls`` counts ``traced`` and
    ``eager`` calls, ``traces`` the traces made and ``kernels`` the convolution kernels each
    input key's trace records (``"onednn"`` or ``"direct"``), for metrics and tests.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        max_traces: int = 8,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        conv_kernels: str = "auto",
        autotune_below_s: float = 0.25,
    ):
        if max_traces < 1:
            raise ValueError(f"max_traces must be at least 1, got {max_traces}.")
        if conv_kernels not in CONV_KERNELS:
            raise ValueError(f"conv_kernels must be one of {', '.join(CONV_KERNELS)}; got {conv_kernels!r}.")
        self.denoiser = denoiser
        self.conv_kernels = conv_kernels
        self.autotune_below_s = autotune_below_s
        self.eager = denoiser.forward
        self.max_traces = max_traces
        self.rtol, self.atol = rtol, atol
        self.calls = {"traced": 0, "eager": 0}
        self.traces = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (trace or None, output type, kernels)
        self._stale = False
        self._snapshot()

    def __deepcopy__(self, memo):
        """A deep copy of the denoiser (a policy build copies the pipeline) runs eagerly: the
        copy's ``forward`` is its class's own, bound to the copy."""
        copied = memo.get(id(self.denoiser))
        if copied is None:
            raise TypeError("A TracedDenoiser is copied only as part of its denoiser; trace the copy with trace_pipeline.")
        return type(copied).forward.__get__(copied)

    def _snapshot(self) -> None:
        modules = list(self.denoiser.modules())
        # the hook dicts of every submodule, checked on each call (hooks would not run in a trace)
        self._hook_dicts = [d for m in modules[1:] for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._module_ids = {id(m) for m in modules}
        self._processors = [(m, m.processor) for m in modules if hasattr(m, "processor") and hasattr(m, "set_processor")]

    @property
    def kernels(self) -> dict[tuple, str]:
        """Input key -> the convolution kernels its trace records, for the keys that have one."""
        return {key: kind for key, (trace, _, kind) in self._entries.items() if trace is not None}

    def _reset(self) -> None:
        self._entries.clear()
        self._snapshot()
        self._stale = False

    # -- the replacement forward ------------------------------------------------------------
    def __call__(self, sample, timestep=None, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        if not self._replayable(sample, timestep, encoder_hidden_states, args, kwargs):
            self.calls["eager"] += 1
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        key = (
            tuple(sample.shape), sample.dtype, sample.device,
            tuple(timestep.shape), timestep.dtype, timestep.device,
            tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype,
        )  # fmt: skip
        with self._lock:
            if self._stale or any(m.processor is not p for m, p in self._processors):
                self._reset()
            entry = self._entries.get(key)
            if entry is None:
                entry = self._trace(key, sample, timestep, encoder_hidden_states)
            else:
                self._entries.move_to_end(key)
        trace, output_type, _ = entry
        if trace is None:
            self.calls["eager"] += 1
            return self.eager(sample, timestep, encoder_hidden_states, return_dict=return_dict)
        self.calls["traced"] += 1
        out = trace(sample, timestep, encoder_hidden_states)
        return output_type(sample=out) if return_dict else (out,)

    def _replayable(self, sample, timestep, encoder_hidden_states, args, kwargs) -> bool:
        if args or any(v is not None and not (isinstance(v, dict) and not v) for v in kwargs.values()):
            return False
        if not (isinstance(sample, torch.Tensor) and isinstance(timestep, torch.Tensor) and isinstance(encoder_hidden_states, torch.Tensor)):
            return False
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if _global_hooks_present():
            return False
        return not any(self._hook_dicts)

    def _trace(self, key, sample, timestep, encoder_hidden_states) -> tuple:
        inputs = (sample, timestep, encoder_hidden_states)
        start = time.perf_counter()
        expected = self.eager(sample, timestep, encoder_hidden_states, return_dict=True)
        eager_s = time.perf_counter() - start
        output_type = type(expected)
        if self.conv_kernels != "auto":
            kinds = [self.conv_kernels]
        else:  # both on a small CPU call, else the stock kernels only
            kinds = ["onednn", "direct"] if sample.device.type == "cpu" and eager_s < self.autotune_below_s else ["onednn"]
        candidates = {}
        for kind in kinds:
            candidate = self._record(kind, inputs, expected.sample, key)
            if candidate is not None:
                candidates[kind] = candidate
        kind = self._fastest(candidates, inputs) if len(candidates) > 1 else next(iter(candidates), None)
        if kind is not None:
            self.traces += 1
            log.info("Traced %s for inputs %s with %s convolutions.", type(self.denoiser).__name__, key, kind)
        self._entries[key] = (candidates.get(kind), output_type, kind)
        while len(self._entries) > self.max_traces:
            self._entries.popitem(last=False)
        return self._entries[key]

    def _record(self, kind: str, inputs: tuple, expected: torch.Tensor, key) -> torch.jit.ScriptModule | None:
        """One trace with the given convolution kernels, or None if it fails or differs from eager."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about shape checks: shapes are part of the key
                with _DirectConv2d() if kind == "direct" else contextlib.nullcontext():
                    candidate = torch.jit.trace(_Call(self.denoiser, self.eager), inputs, check_trace=False)
            got = candidate(*inputs)
        except Exception as e:  # any failure to trace means eager calls, never a failed request
            log.warning("Could not trace %s (%s convolutions) for inputs %s (%s).", type(self.denoiser).__name__, kind, key, e)
            return None
        if not torch.allclose(got, expected, rtol=self.rtol, atol=self.atol):
            diff = (got - expected).abs().max().item()
            log.warning("Traced %s (%s convolutions) differs from eager by %.3g for inputs %s; not used.", type(self.denoiser).__name__, kind, diff, key)
            return None
        return candidate

    @staticmethod
    def _fastest(candidates: dict, inputs: tuple, warmup: int = 2, repeats: int = 7) -> str:
        """The candidate with the shortest median of interleaved timed calls."""
        times: dict[str, list[float]] = {kind: [] for kind in candidates}
        for round_ in range(warmup + repeats):
            for kind, trace in candidates.items():
                start = time.perf_counter()
                trace(*inputs)
                if round_ >= warmup:
                    times[kind].append(time.perf_counter() - start)
        return min(times, key=lambda kind: statistics.median(times[kind]))


def trace_pipeline(pipe, *, max_traces: int = 8, conv_kernels: str = "auto") -> TracedDenoiser:
    """Install a :class:`TracedDenoiser` on ``pipe.unet`` (idempotent); returns it."""
    denoiser = pipe.unet
    current = denoiser.__dict__.get("forward")
    if isinstance(current, TracedDenoiser):
        return current
    _install_registration_hooks()
    tracer = TracedDenoiser(denoiser, max_traces=max_traces, conv_kernels=conv_kernels)
    denoiser.forward = tracer
    _TRACERS.add(tracer)
    return tracer


def untrace_pipeline(pipe) -> None:
    """Remove the tracer from ``pipe.unet``: every call runs eagerly again."""
    current = pipe.unet.__dict__.get("forward")
    if isinstance(current, TracedDenoiser):
        del pipe.unet.forward
        _TRACERS.discard(current)
