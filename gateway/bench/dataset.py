"""What each benchmark request sends: a prompt (token ids or text) and how many tokens to generate.

Random prompts are token ids, so the server counts exactly `input_len` prompt tokens (ids are
used as given, no BOS added). Requests ask for exactly `output_len` tokens (`ignore_eos`), so
the load does not depend on what the model happens to say. File prompts are text: their length
in tokens is what the server reports back in `usage`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from gateway.bench.config import DatasetConfig


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | tuple[int, ...]
    output_len: int

    @property
    def input_len(self) -> int | None:
        """Prompt tokens, when known before the server tokenizes (token-id prompts)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive bounds [len·(1−r), len·(1+r)], never below 1."""
    return max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))


def sample_lengths(num: int, length: int, range_ratio: float, rng: random.Random) -> list[int]:
    low, high = length_range(length, range_ratio)
    return [rng.randint(low, high) for _ in range(num)]


def random_requests(config: DatasetConfig) -> list[BenchRequest]:
    rng = random.Random(config.seed)
    input_lens = sample_lengths(config.num_prompts, config.input_len, config.range_ratio, rng)
    output_lens = sample_lengths(config.num_prompts, config.output_len, config.range_ratio, rng)
    return [BenchRequest(tuple(rng.randrange(config.vocab_size) for _ in range(n_in)), n_out)
            for n_in, n_out in zip(input_lens, output_lens, strict=True)]


def file_requests(config: DatasetConfig) -> list[BenchRequest]:
    """Prompts from `config.path`, cycled up to `num_prompts`, in file order.

    A `.jsonl` file holds one object per line: `{"prompt": "text" | [ids], "output_len": N}`
    (`output_len`, or `max_tokens`, is optional); any other file is one prompt per non-empty line.
    Output lengths not given by the file are drawn like random ones.
    """
    path = Path(config.path or "")
    prompts = _read_jsonl(path) if path.suffix == ".jsonl" else _read_lines(path)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    rng = random.Random(config.seed)
    drawn = sample_lengths(config.num_prompts, config.output_len, config.range_ratio, rng)
    out = []
    for i in range(config.num_prompts):
        prompt, output_len = prompts[i % len(prompts)]
        out.append(BenchRequest(prompt, output_len if output_len is not None else drawn[i]))
    return out


def load_requests(config: DatasetConfig) -> list[BenchRequest]:
    return random_requests(config) if config.name == "random" else file_requests(config)


def _read_lines(path: Path) -> list[tuple[str, int | None]]:
    return [(line, None) for line in (raw.strip() for raw in path.read_text().splitlines()) if line]


def _read_jsonl(path: Path) -> list[tuple[str | tuple[int, ...], int | None]]:
    out: list[tuple[str | tuple[int, ...], int | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
            output_len = row.get("output_len", row.get("max_tokens"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt'") from None
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = tuple(prompt)
        elif not (isinstance(prompt, str) and prompt):
            raise ValueError(f"{path}:{number}: 'prompt' must be a non-empty string or list of token ids")
        if output_len is not None and not (isinstance(output_len, int) and output_len >= 1):
            raise ValueError(f"{path}:{number}: 'output_len' must be an integer >= 1")
        out.append((prompt, output_len))
    return out
