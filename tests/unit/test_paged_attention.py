"""The Triton paged decode kernel equals the plain path, run in Triton's interpreter on the CPU.

The interpreter is switched on by an environment variable that Triton reads when a kernel is
defined, for the life of the process; so the kernel runs in a subprocess
(paged_decode_interpret.py) and this process never imports triton. Cases: shuffled block
tables, GQA groups 1/2/4, windows narrower and wider than the contexts, contexts 1..70,
block sizes 4 and 16, fp32 (≤ 1e-5) and bf16 / fp16 (loose); decode rows interleaved with
prefill rows, which the kernel must leave alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attention_cases import TOLERANCE, decode_cases

REPO = Path(__file__).resolve().parents[2]
CASES = decode_cases()

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (it comes with the `test` extra): the paged decode kernel is "
           "checked in Triton's interpreter",
)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.unit.paged_decode_interpret"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_equals_reference(interpreted, case):
    result = interpreted[case.id]
    assert result["max_err"] <= TOLERANCE[case.dtype], result
    assert result["others_untouched"], "the kernel wrote rows that are not decode tokens"



def test_padding_rows_get_zeros(interpreted):
    assert interpreted["padded_rows_get_zeros"]
