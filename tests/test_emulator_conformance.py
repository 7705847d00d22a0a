"""Conformance of the Metal emulator: small MSL kernels checked against results computed in Python.

The kernels and their expected results are flash_attn_metal.selftest.conformance's (`selftest` runs them on a
Mac's GPU too). Each exercises one construct; the negative controls show that a broken emulator (a missing
barrier, a wrong lane layout) would be caught.
"""

from __future__ import annotations

import pytest

from emulator_support import DEVICES
from flash_attn_metal.selftest.conformance import failures, named, run

pytestmark = pytest.mark.parametrize("device", DEVICES)


def assert_conforms(case: str, device: str, *only: str) -> None:
    """The case's outputs (those named in `only`, or all) are what Metal specifies."""
    outputs, expected = run(named(case), device)
    expected = {name: e for name, e in expected.items() if not only or name in only}
    assert expected
    found = failures(outputs, expected, device)
    assert not found, found


# ---- binding, grid, attributes ----

def test_scalar_and_list_arguments_bind_in_order(device):
    assert_conforms("scalar_and_list_arguments", device)


def test_tensor_binds_at_its_storage_offset(device):
    assert_conforms("storage_offset", device)


def test_attributes_and_non_uniform_threadgroups(device):
    assert_conforms("non_uniform_threadgroups", device)


# ---- threadgroup memory and barriers ----

def test_barrier_orders_threadgroup_memory(device):
    assert_conforms("barrier", device)


def test_removed_barrier_is_caught(device):
    assert_conforms("removed_barrier", device)


def test_threadgroup_memory_starts_as_garbage(device):
    assert_conforms("threadgroup_memory_starts_as_garbage", device)


# ---- SIMD-group functions ----

def test_simd_collectives(device):
    assert_conforms("simd_collectives", device)


def test_simd_width_is_32_in_half(device):
    assert_conforms("simd_width_is_32_in_half", device)


# ---- simdgroup_matrix ----

def test_thread_elements_follow_apples_lane_layout(device):
    assert_conforms("lane_layout", device, "layout")


def test_wrong_lane_layout_is_detected(device):
    assert_conforms("lane_layout", device, "flat")


def test_multiply_accumulate_mixed_types_and_transpose(device):
    assert_conforms("multiply_accumulate", device)


def test_threadgroup_matrices_and_diagonal_constructor(device):
    assert_conforms("threadgroup_matrices", device)


# ---- scalars, vectors and math ----

def test_scalar_vector_conversions_and_helpers(device):
    assert_conforms("scalar_vector_conversions", device)


def test_struct_buffer_binds_by_reference(device):
    assert_conforms("struct_buffer_binds_by_reference", device)


def test_math_functions(device):
    assert_conforms("math_functions", device)


# ---- atomics ----

def test_atomics_on_device_and_threadgroup_memory(device):
    assert_conforms("atomics", device)
