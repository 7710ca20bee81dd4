"""precision=auto: bf16 where the hardware runs it natively, fp32 elsewhere (processors/model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emofleet.core.config import ModelSettings
from emofleet.processors.model import ModelLoadError, cpu_flags, load_model, resolve_precision

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
ZEN4 = AVX2_ONLY | {"avx512f", "avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(("device", "flags", "expected"), [
    ("cpu", AVX2_ONLY, "fp32"),
    ("cpu", frozenset(), "fp32"),  # no /proc/cpuinfo: the safe choice
    ("cpu", ZEN4, "bf16"),
    ("cpu", SAPPHIRE_RAPIDS, "bf16"),
    ("cpu", AVX2_ONLY | {"avx512f", "avx512_vnni"}, "fp32"),  # AVX-512 without bf16 emulates it
    ("cuda:0", AVX2_ONLY, "bf16"),
    ("cuda:1", frozenset(), "bf16"),
])
def test_auto_picks_bf16_only_where_it_is_native(device: str, flags: frozenset[str], expected: str) -> None:
    assert resolve_precision("auto", device, flags) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8"])
def test_an_explicit_precision_is_kept_whatever_the_hardware(precision: str) -> None:
    assert resolve_precision(precision, "cpu", ZEN4) == precision
    assert resolve_precision(precision, "cpu", AVX2_ONLY) == precision


def test_fp32_stays_the_default() -> None:
    assert ModelSettings().precision == "fp32"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_load_model_resolves_auto_on_this_machine(tmp_path: Path) -> None:
    model = load_model(ModelSettings(model="tiny", precision="auto", device="cpu"), cache_dir=tmp_path)
    assert model.precision == resolve_precision("auto", "cpu", cpu_flags())
    with pytest.raises(ModelLoadError, match="use one of auto, fp32"):
        load_model(ModelSettings(model="tiny", precision="fp64", device="cpu"), cache_dir=tmp_path)
