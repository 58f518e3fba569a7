"""run.amp resolution: native bf16 where the hardware has it, fp32 (CPU) or fp16 (old GPUs) where
it would be emulated. The probes are replaced here, so both branches run on any machine."""

import pytest
import torch

from dist_free import precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1
"""
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"


def fake_cpuinfo(monkeypatch, tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    monkeypatch.setattr(precision, "CPUINFO", path)


def test_cpu_flags_are_read_from_the_flags_line_only():
    flags = precision.parse_cpu_flags(SAPPHIRE_RAPIDS)
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= flags and "spectre_v1" not in flags
    assert precision.parse_cpu_flags("processor : 0\nFeatures : fp asimd bf16\n") == frozenset()


def test_auto_on_a_cpu_with_native_bf16_picks_bf16(monkeypatch, tmp_path):
    fake_cpuinfo(monkeypatch, tmp_path, SAPPHIRE_RAPIDS)
    dtype, reason = precision.resolve_amp("auto", CPU)
    assert dtype is torch.bfloat16
    assert "amx_bf16, avx512_bf16" in reason and "bf16" in reason


def test_avx512_bf16_alone_counts_as_native(monkeypatch, tmp_path):
    fake_cpuinfo(monkeypatch, tmp_path, "flags : avx2 avx512f avx512_bf16\n")    # e.g. AMD Zen 4
    assert precision.resolve_amp("auto", CPU)[0] is torch.bfloat16


def test_auto_on_a_cpu_without_bf16_instructions_stays_fp32(monkeypatch, tmp_path):
    fake_cpuinfo(monkeypatch, tmp_path, SKYLAKE)      # AVX-512, but no bf16 instructions
    dtype, reason = precision.resolve_amp("auto", CPU)
    assert dtype is None and "fp32" in reason and "emulated" in reason


def test_no_cpuinfo_means_fp32(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "absent")
    assert precision.cpu_bf16_flags() == frozenset()
    assert precision.resolve_amp("auto", CPU)[0] is None


def test_explicit_choices_are_kept(monkeypatch, tmp_path):
    fake_cpuinfo(monkeypatch, tmp_path, SKYLAKE)
    assert precision.resolve_amp("bf16", CPU)[0] is torch.bfloat16
    assert precision.resolve_amp("fp16", CPU)[0] is torch.float16
    assert precision.resolve_amp("off", CPU) == (None, "run.amp=off: fp32")


def test_bf16_is_said_to_be_emulated_only_on_a_cpu_without_it(monkeypatch, tmp_path):
    fake_cpuinfo(monkeypatch, tmp_path, SKYLAKE)
    assert "emulated" in precision.resolve_amp("bf16", CPU)[1]
    fake_cpuinfo(monkeypatch, tmp_path, SAPPHIRE_RAPIDS)
    assert "emulated" not in precision.resolve_amp("bf16", CPU)[1]


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_asks_for_native_bf16_not_emulation(monkeypatch, native, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation       # torch's emulation would always say yes

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    dtype, reason = precision.resolve_amp("auto", CUDA)
    assert dtype is expected and asked == [False]
    assert ("loss scaling" in reason) == (not native)


def test_fp16_from_auto_gets_a_grad_scaler(monkeypatch):
    """The fp16 that auto picks on pre-Ampere GPUs is safe only with loss scaling; StepBase adds it."""
    from dist_free.engine.step_base import StepBase
    monkeypatch.setattr(precision, "cuda_native_bf16", lambda: False)
    dtype, _ = precision.resolve_amp("auto", CUDA)
    model = torch.nn.Linear(2, 2)
    step = StepBase(model, torch.optim.SGD(model.parameters(), lr=0.1), amp_dtype=dtype)
    assert step.scaler is not None


def test_auto_on_other_devices_is_fp32():
    assert precision.resolve_amp("auto", torch.device("meta"))[0] is None


def test_a_bad_amp_value_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="run.amp must be one of"):
        precision.resolve_amp("fp8", CPU)
