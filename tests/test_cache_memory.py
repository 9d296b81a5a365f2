"""The memory a cached split costs, measured: the policy's estimate (`data.cache_bytes`) against
the growth of the peak resident memory of a process that fills one, and uint8 at a quarter of
float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import CHILD_PYTHONPATH

from kerastune_flow import data

CHILD = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
from kerastune_flow import data

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

n, size, uint8 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
# Generated on the fly (nothing held before the cache): whole values, as decoded images are.
images = tf.data.Dataset.range(n).map(
    lambda i: (tf.fill((size, size, 3), tf.cast(i % 256, tf.float32)), tf.cast(i % 10, tf.int32))
)
warm = data.prepare(images.take(64), batch_size=32, training=True, cache=True, uint8=uint8)
for _ in warm:  # the runtime's own first-use memory, before the baseline
    pass
before = peak()
ds = data.prepare(images, batch_size=64, training=True, cache=True, uint8=uint8)
for _ in range(2):
    for x, y in ds:
        pass
assert x.dtype == tf.float32
print(json.dumps({"grown": peak() - before}))
"""


def grown_memory(n: int, size: int, uint8: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(size), "1" if uint8 else "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": CHILD_PYTHONPATH},
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["grown"]


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak memory from /proc/self/status")
N, SIZE = 6000, 64  # 74 MB as uint8, 295 MB as float32: well above the runtime's noise


@LINUX
def test_a_uint8_cache_costs_what_the_policy_estimates():
    estimate = data.cache_bytes(N, (SIZE, SIZE, 3), uint8=True, peak=True)
    grown = grown_memory(N, SIZE, uint8=True)
    assert 0.75 * estimate <= grown <= 1.25 * estimate, (grown, estimate)


@LINUX
@pytest.mark.slow
def test_a_float32_cache_costs_four_times_as_much():
    estimate = data.cache_bytes(N, (SIZE, SIZE, 3), uint8=False, peak=True)
    grown = grown_memory(N, SIZE, uint8=False)
    assert 0.75 * estimate <= grown <= 1.25 * estimate, (grown, estimate)
