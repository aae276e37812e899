"""Text-level engine behaviour on the demo checkpoint: detokenization and stop strings."""

from __future__ import annotations

import asyncio

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.tokenizer import Tokenizer
from workers.model.sampling_params import SamplingParams


def stream(model_dir, prompt_ids, params):
    engine = build_local_engine(model_dir, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128,
                                                        block_size=16, num_kv_blocks=64))

    async def main():
        outs = [o async for o in engine.generate("r", prompt_ids, params)]
        await engine.shutdown()
        return outs

    return asyncio.run(main())


def test_text_deltas_join_to_the_full_decode(demo_model_dir):
    tok = Tokenizer.from_dir(demo_model_dir)
    prompt = tok.encode("The quick brown fox")
    outs = stream(demo_model_dir, prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    ids = [t for o in outs for t in o.token_ids]
    assert len(ids) == 40 and outs[-1].finish_reason == "length"
    full = tok.decode(prompt + ids)
    assert full.endswith("".join(o.text for o in outs))
    assert "".join(o.text for o in outs) == full[len(tok.decode(prompt)):]


def test_stop_string_spanning_token_boundaries(demo_model_dir):
    tok = Tokenizer.from_dir(demo_model_dir)
    prompt = tok.encode("Once upon a time")
    free = stream(demo_model_dir, prompt, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    deltas = [o.text for o in free]
    full = "".join(deltas)
    # A stop string made of the end of one token's text and the start of the next.
    k = next(i for i in range(len(deltas) - 1)
             if len(deltas[i]) >= 2 and len(deltas[i + 1]) >= 2 and i > 2)
    stop = deltas[k][-2:] + deltas[k + 1][:2]
    cut = full.index(stop)
    stopped = stream(demo_model_dir, prompt, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True,
                                                            stop=(stop,)))
    assert stopped[-1].finish_reason == "stop"
    assert "".join(o.text for o in stopped) == full[:cut]
