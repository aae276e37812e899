"""Runs the Triton paged decode kernel in Triton's interpreter on CPU tensors, against the plain path.

A script, not a test module: TRITON_INTERPRET must be set before triton is imported and the
setting lasts for the process, so test_paged_attention.py runs this in a subprocess and the
interpreter never leaks into other tests (or into a GPU run of the kernel compiled for real).
Prints one JSON object: case id → {"max_err", "others_untouched"}.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import torch  # noqa: E402

from tests.attention_cases import decode_cases, random_decode_step  # noqa: E402
from workers.model.paged_attention import paged_decode_attention  # noqa: E402
from workers.model.reference_attention import decode_reference  # noqa: E402


def run(case) -> dict:
    step = random_decode_step(case)
    decode = step.meta.decode_batch(case.sliding_window)
    expected = torch.full_like(step.q_TQD, 7.0)
    got = torch.full_like(step.q_TQD, 7.0)
    decode_reference(step.q_TQD, expected, decode, step.kv_cache, 0)
    paged_decode_attention(step.q_TQD, got, decode.rows_S, step.kv_cache.k_BPGD[0], step.kv_cache.v_BPGD[0],
                           decode.block_tables_SB, decode.context_lens_S, decode.sliding_window)
    rows = step.decode_rows
    return {
        "max_err": float((got[rows].float() - expected[rows].float()).abs().max()),
        "others_untouched": bool((got[step.other_rows] == 7.0).all()),
    }


def padded_rows_get_zeros() -> bool:
    """A batch padded to a fixed size: padding rows have context length 0 and must come out zero."""
    step = random_decode_step(decode_cases()[0])
    decode = step.meta.decode_batch(None)
    lens = decode.context_lens_S.clone()
    lens[::2] = 0
    out = torch.full_like(step.q_TQD, 7.0)
    paged_decode_attention(step.q_TQD, out, decode.rows_S, step.kv_cache.k_BPGD[0], step.kv_cache.v_BPGD[0],
                           decode.block_tables_SB, lens, None)
    padded = decode.rows_S[::2]
    return bool((out[padded] == 0).all()) and bool(out[decode.rows_S[1::2]].isfinite().all())


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = {case.id: run(case) for case in decode_cases()}
    results["padded_rows_get_zeros"] = padded_rows_get_zeros()
    print(json.dumps(results))
