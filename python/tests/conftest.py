"""Test devices: the CPU always, CUDA when present (``FLASHATTN_TEST_DEVICES=cuda`` or ``cpu`` picks one).

Every CUDA output is poisoned (NaN-filled) before the kernels run, so an element a kernel forgets to write
fails its check.
"""

import os
import zlib

import pytest
import torch

import flashattn


def _devices():
    want = os.environ.get("FLASHATTN_TEST_DEVICES")
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if want:
        return [d for d in want.split(",") if d in have]
    return have


DEVICES = _devices()


def pytest_report_header(config):
    return f"flashattn test devices: {DEVICES}; {flashattn.info()['backends']}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _poison():
    flashattn._flashattn.set_poison_outputs(True)
    yield
    flashattn._flashattn.set_poison_outputs(False)


@pytest.fixture(autouse=True)
def _seed(request):
    # Random inputs per test, reproducible from the test's name and FLASHATTN_SEED (change it for fresh ones).
    torch.manual_seed(zlib.crc32(f"{request.node.nodeid}/{os.environ.get('FLASHATTN_SEED', '0')}".encode()))
