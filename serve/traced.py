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
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

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
    ``eager`` calls and ``traces`` the traces made, for metrics and tests.
    """

    def __init__(self, denoiser: nn.Module, *, max_traces: int = 8, rtol: float = 1e-4, atol: float = 1e-5):
        if max_traces < 1:
            raise ValueError(f"max_traces must be at least 1, got {max_traces}.")
        self.denoiser = denoiser
        self.eager = denoiser.forward
        self.max_traces = max_traces
        self.rtol, self.atol = rtol, atol
        self.calls = {"traced": 0, "eager": 0}
        self.traces = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (trace or None, output type)
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
        trace, output_type = entry
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
        expected = self.eager(sample, timestep, encoder_hidden_states, return_dict=True)
        output_type = type(expected)
        trace = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about shape checks: shapes are part of the key
                candidate = torch.jit.trace(_Call(self.denoiser, self.eager), (sample, timestep, encoder_hidden_states), check_trace=False)
            got = candidate(sample, timestep, encoder_hidden_states)
            if torch.allclose(got, expected.sample, rtol=self.rtol, atol=self.atol):
                trace = candidate
                self.traces += 1
            else:
                diff = (got - expected.sample).abs().max().item()
                log.warning("Traced %s differs from eager by %.3g for inputs %s; these calls run eagerly.", type(self.denoiser).__name__, diff, key)
        except Exception as e:  # any failure to trace means eager calls, never a failed request
            log.warning("Could not trace %s for inputs %s (%s); these calls run eagerly.", type(self.denoiser).__name__, key, e)
        self._entries[key] = (trace, output_type)
        while len(self._entries) > self.max_traces:
            self._entries.popitem(last=False)
        return self._entries[key]


def trace_pipeline(pipe, *, max_traces: int = 8) -> TracedDenoiser:
    """Install a :class:`TracedDenoiser` on ``pipe.unet`` (idempotent); returns it."""
    denoiser = pipe.unet
    current = denoiser.__dict__.get("forward")
    if isinstance(current, TracedDenoiser):
        return current
    _install_registration_hooks()
    tracer = TracedDenoiser(denoiser, max_traces=max_traces)
    denoiser.forward = tracer
    _TRACERS.add(tracer)
    return tracer


def untrace_pipeline(pipe) -> None:
    """Remove the tracer from ``pipe.unet``: every call runs eagerly again."""
    current = pipe.unet.__dict__.get("forward")
    if isinstance(current, TracedDenoiser):
        del pipe.unet.forward
        _TRACERS.discard(current)
