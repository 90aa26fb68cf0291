"""Where the tensors live: the ``device`` setting (auto, cpu, cuda, cuda:N), autocast on that device,
the low-precision dtype of a computation, host-to-device batch copies and the device's RNG.

The model is always built (and initialized) on the CPU and then moved, so one seed gives the same
initial weights on every device; the data order comes from a CPU generator, so it does too.
"""

from __future__ import annotations

import contextlib

import torch

from .config import DEVICE_FORMS, ConfigError, valid_device


def resolve(spec: str, field: str = "train.device") -> torch.device:
    """The torch device of a setting; ``auto`` is CUDA when available, else the CPU. A CUDA device
    that this machine lacks is a one-line error naming ``field``."""
    if not valid_device(spec):
        raise ConfigError(f"{field}={spec!r} is invalid: expected {DEVICE_FORMS}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"{field}={spec!r} is invalid: this machine has "
                + (f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else "no CUDA device")
                + "; use cpu or auto"
            )
    return device


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def cpu_bf16_is_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Without either, bf16 matmuls take a
    reference path: on an AVX2-only AMD EPYC they ran 26-111× slower than fp32 (docs/performance.md)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: True)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def slow_bf16_warning(device: torch.device, what: str) -> str | None:
    """The warning for bf16 on a CPU without native bf16 (``what``: the setting that asked for it), else None."""
    if device.type != "cpu" or cpu_bf16_is_native():
        return None
    return (
        f"spannorm: warning: {what} on a CPU without AVX-512 BF16 or AMX ({torch.backends.cpu.get_cpu_capability()}): "
        "bf16 matmuls run many times slower than fp32 here (docs/performance.md); fp32 is faster on this machine"
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype of x's device when autocast is on
    there, else x's own (devices without autocast, such as ``meta``, use x's)."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """CPU tensors onto ``device``: on CUDA through pinned memory with asynchronous copies."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


def rng_state(device: torch.device) -> torch.Tensor | None:
    """The RNG state of a CUDA device (the CPU's is saved separately), None on other devices."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    """Restore :func:`rng_state`; a state saved on another kind of device is not applied (the
    model's forward draws no random numbers: only exact resumes on the same kind depend on it)."""
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state.cpu(), device)


def set_tf32(enabled: bool) -> None:
    """CUDA fp32 matmuls in TF32 (``enabled``) or in full fp32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
