"""Deployment targets of int8 arithmetic: what the target CPU's integer kernels compute exactly.

int8 arithmetic is a property of the machine that *runs* the artifact, not of the one that builds
it. x86 CPUs with AVX-512 VNNI multiply u8 activations by s8 weights and accumulate in int32
(``vpdpbusd``): exact for any int8 codes. x86 CPUs without it (AVX2, AVX-512 without VNNI, and
AVX-VNNI-only CPUs under torch's fbgemm) use ``vpmaddubsw``, which adds *pairs* of u8 x s8
products in a saturating int16: 255 * 127 * 2 = 64770 overflows 32767. fbgemm and onnxruntime
answer it with a reduced range; here the weights of such a target are limited to [-64, 64]
(255 * 64 * 2 = 32640 fits), so every kernel computes them exactly. ARM (``sdot``/``udot`` or
widening multiply-accumulate) is exact at full range.

The simulated-quant graph uses the target's ranges, so it *is* what the target computes, and the
backends' within-one-step check stays strict on every target. Artifacts record the target's name.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache

from graphopt.errors import ConfigError

INT16_MAX = 32767
ACTIVATION_ABS_MAX = {"uint8": 255, "int8": 128}
TARGET_KEY = "graphopt.quant_target"    # Graph.meta key: the Target a quantized graph was built for


@dataclass(frozen=True)
class Target:
    """The integer arithmetic of one family of CPUs, as the quantization passes must model it."""

    name: str
    description: str
    weight_qmax: int            # per-channel symmetric int8 weights in [-weight_qmax, weight_qmax]
    pairwise_int16: bool        # u8 x s8 products are summed in pairs in a saturating int16
    arch: str                   # "x86" or "arm64"

    @property
    def weight_qmin(self) -> int:
        return -self.weight_qmax

    def saturates(self, weight_qmax: int, activation_dtype: str = "uint8") -> bool:
        """Whether this CPU's kernels can overflow on weights up to ``weight_qmax`` (in codes)."""
        return self.pairwise_int16 and 2 * ACTIVATION_ABS_MAX[activation_dtype] * weight_qmax > INT16_MAX

    def runs_exactly(self, target: "Target", activation_dtype: str = "uint8") -> bool:
        """Whether this machine's kernels compute an artifact built for ``target`` exactly (the
        file is the same on every CPU; only saturation can make two CPUs differ), so running it
        here in onnxruntime or torch is a faithful check of it."""
        return not self.saturates(target.weight_qmax, activation_dtype)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-vnni", "x86 with AVX-512 VNNI (int32 dot products; onnxruntime also uses AVX-VNNI)",
           weight_qmax=127, pairwise_int16=False, arch="x86"),
    Target("x86-avx2", "x86 without AVX-512 VNNI (AVX2, AVX-512F/BW, AVX-VNNI under fbgemm): "
           "7-bit weights, since u8 x s8 pairs add in a saturating int16",
           weight_qmax=64, pairwise_int16=True, arch="x86"),
    Target("arm64", "64-bit ARM (NEON sdot/udot or widening multiply-accumulate, int32 sums)",
           weight_qmax=127, pairwise_int16=False, arch="arm64"),
)}
TARGET_NAMES = ("auto", *TARGETS)


def get_target(name: str | Target) -> Target:
    """The named target; ``auto`` is the CPU this process runs on."""
    if isinstance(name, Target):
        return name
    if name == "auto":
        return host_target()
    if name not in TARGETS:
        raise ConfigError(f"unknown quantization target {name!r}; known: {', '.join(TARGET_NAMES)}")
    return TARGETS[name]


@lru_cache(maxsize=1)
def host_target() -> Target:
    """The target this CPU is, from what its kernels see (CPUID through torch's cpuinfo), else
    from /proc/cpuinfo's flags. A CPU with only AVX-VNNI counts as x86-avx2: torch's fbgemm
    needs AVX-512 VNNI for its int32 kernels."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return TARGETS["arm64"]
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        raise ConfigError(f"cannot tell the int8 arithmetic of this CPU ({machine!r}); "
                          f"name a target: {', '.join(TARGETS)}")
    vnni = _torch_says_vnni()
    if vnni is None:
        vnni = "avx512_vnni" in _cpuinfo_flags()
    return TARGETS["x86-vnni" if vnni else "x86-avx2"]


def _torch_says_vnni() -> bool | None:
    import torch

    probe = getattr(torch.cpu, "_is_vnni_supported", None)   # torch's cpuinfo: CPUID, as the kernels see it
    try:
        return bool(probe()) if probe is not None else None
    except Exception:   # a private helper: a torch without it falls back to /proc/cpuinfo
        return None


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
