"""`clearcri bench overhead`'s reading of QEMU's translated code."""

from __future__ import annotations

from bench.overhead import translated_code_kib

# HMP `info jit` of a pod VM's QEMU 7.2 under TCG (the head of it)
INFO_JIT = """Translation buffer state:
gen code size       9973731/50249728
TB count            18341
TB avg target size  18 max=2007 bytes
"""


def test_translated_code_is_the_used_part_of_the_buffer() -> None:
    assert translated_code_kib(INFO_JIT) == 9973731 // 1024


def test_no_translated_code_without_tcg() -> None:
    assert translated_code_kib("JIT information is only available with accel=tcg\n") is None
