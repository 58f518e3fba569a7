"""Which autocast dtype `run.amp` means on this device, and why (one line for the log).

    dtype, reason = resolve_amp("auto", torch.device("cpu"))   # (torch.bfloat16, "...amx_bf16...")

`auto` picks bf16 only where the hardware computes it natively, because elsewhere bf16 is emulated
through fp32 arithmetic and is slower than plain fp32 (or than fp16 on older GPUs):

- CPU: bf16 when the CPU has AMX-BF16 or AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and
  later; AMD Zen 4 and later), fp32 otherwise. oneDNN, which runs torch's CPU convolutions and
  matrix products, uses these instructions for bf16; without them it converts to fp32 and back.
- CUDA: bf16 on GPUs with native bf16 (compute capability 8.0+: A100, H100, ...), else fp16 with a
  GradScaler (V100, T4, ...).
- anything else (MPS, ...): fp32.

The CPU probe reads the kernel's flag list in /proc/cpuinfo. torch.backends.cpu.get_cpu_capability()
cannot answer this question: it names the vector width torch's own kernels were dispatched for
("AVX512" on Skylake, which has no bf16 instructions, as on Sapphire Rapids, which has AMX), not the
bf16 instructions oneDNN can use. Without /proc/cpuinfo (macOS, Windows) the probe finds nothing
and `auto` stays fp32, the choice that is never slower than expected. Arm's BF16 extension
(aarch64 "bf16" flag) is not counted: its speed-up in torch's CPU kernels has not been measured here.

`bf16`, `fp16` and `off` are taken as asked, on any device; the reason then says if bf16 or fp16
will be emulated.
"""

from __future__ import annotations

from pathlib import Path

import torch

# x86 flags (as Linux spells them) for instructions that compute on bf16 data: AMX tile
# multiply-adds and AVX-512 bf16 dot products / conversions.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")
CHOICES = ("auto", "bf16", "fp16", "off")
# The one table of dtype names (None: fp32, i.e. no autocast). Config values use "off" for fp32.
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The x86 `flags` of the first processor listed in /proc/cpuinfo text (empty if none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_flags() -> frozenset[str]:
    """This CPU's native bf16 instruction sets among CPU_BF16_FLAGS; empty where unknown."""
    try:
        flags = parse_cpu_flags(CPUINFO.read_text())
    except OSError:
        return frozenset()
    return flags & frozenset(CPU_BF16_FLAGS)


def cuda_native_bf16() -> bool:
    """bf16 computed by the current GPU itself, not emulated in fp32 (compute capability 8.0 and
    up). The current GPU: each rank selects its own before it resolves the precision."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, one line saying why); see the module docstring."""
    if amp not in CHOICES:
        raise ValueError(f"run.amp must be one of {', '.join(CHOICES)}, got {amp!r}")
    device = torch.device(device)
    if amp == "off":
        return None, "run.amp=off: fp32"
    if device.type == "cpu":
        native = cpu_bf16_flags()
        have = f"the CPU has {', '.join(sorted(native))}" if native else \
            f"the CPU lists none of {', '.join(CPU_BF16_FLAGS)} in {CPUINFO}"
        if amp == "auto":
            return (torch.bfloat16, f"run.amp=auto on cpu: bf16, {have} (native bf16)") if native \
                else (None, f"run.amp=auto on cpu: fp32, {have} (bf16 would be emulated, slower)")
        emulated = "" if amp == "fp16" or native else " (emulated: expect it slower than fp32)"
        return dtype_of(amp), f"run.amp={amp} on cpu: {amp} as asked; {have}{emulated}"
    if device.type == "cuda":
        native = cuda_native_bf16()
        if amp == "auto":
            # Without native bf16 (before Ampere) torch emulates bf16 with fp32 math, slower than
            # fp16 on the tensor cores these GPUs do have. fp16's 5-bit exponent flushes small
            # gradients to zero, so fp16 runs with loss scaling: StepBase creates a GradScaler
            # whenever amp_dtype is fp16.
            return (torch.bfloat16, "run.amp=auto on cuda: bf16, native on this GPU") if native \
                else (torch.float16, "run.amp=auto on cuda: fp16 with loss scaling, this GPU "
                                     "has no native bf16")
        emulated = " (emulated on this GPU)" if amp == "bf16" and not native else ""
        return dtype_of(amp), f"run.amp={amp} on cuda: {amp} as asked{emulated}"
    if amp == "auto":
        return None, f"run.amp=auto on {device.type}: fp32 (no native-bf16 probe for this device)"
    return dtype_of(amp), f"run.amp={amp} on {device.type}: {amp} as asked"


def dtype_of(amp: str) -> torch.dtype | None:
    """The dtype a name stands for: bf16, fp16, or None for fp32 / off."""
    return None if amp == "off" else DTYPES[amp]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype of `run.amp` on `device` (None: fp32); see `resolve_amp`."""
    return resolve_amp(amp, device)[0]


def attack_dtype(amp: str) -> torch.dtype | None:
    """Attacks and evaluation: fp32 unless eval.amp / --amp asks otherwise ("off" = fp32)."""
    return dtype_of(amp)


def loader_dtype(device: torch.device) -> torch.dtype:
    # fp16 halves the decoded batch's memory traffic on a GPU and holds [0, 1] pixels exactly
    # enough (11-bit mantissa > 8-bit JPEG); the perturbation is added in fp32 anyway.
    return torch.float16 if device.type == "cuda" else torch.float32
