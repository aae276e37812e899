"""Tokenizer: round trips, BOS/EOS discovery, chat templates, incremental detokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers

from cluster.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

# Characters of 1 to 4 UTF-8 bytes, spaces, and the special-token strings' pieces.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list("ab <s>/\n\t.é中🙂") + ["\u00a0", "\u200d"]), max_size=40)


@pytest.fixture(scope="module")
def demo_tok(demo_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_tokenizer_dir)


@pytest.fixture
def tok_dir(demo_tokenizer_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the demo tokenizer files, to add config files to."""
    for f in demo_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _chunks(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _stream(tok: Tokenizer, chunks: list[list[int]], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    return [detok.push(chunk) for chunk in chunks] + [detok.flush()]


def test_demo_special_tokens(demo_tok: Tokenizer) -> None:
    assert (demo_tok.backend.token_to_id("<unk>"), demo_tok.bos_token_id, demo_tok.eos_token_id) == (0, 1, 2)
    assert demo_tok.eos_token_ids == (2,)
    assert (demo_tok.bos_token, demo_tok.eos_token) == ("<s>", "</s>")
    assert demo_tok.vocab_size == 2048


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(demo_tok: Tokenizer, text: str) -> None:
    ids = demo_tok.encode(text)
    assert ids[0] == demo_tok.bos_token_id
    assert demo_tok.decode(ids[1:], skip_special_tokens=False) == text
    if "<s>" not in text and "</s>" not in text and "<unk>" not in text:
        assert demo_tok.decode(ids) == text


def test_special_token_strings_in_text_become_special_ids(demo_tok: Tokenizer) -> None:
    ids = demo_tok.encode("<s>hi</s>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert demo_tok.decode(ids) == "hi"


def test_common_words_are_single_tokens(demo_tok: Tokenizer) -> None:
    ids = demo_tok.encode("[INST] What is the capital of Paris? [/INST]", add_bos=False)
    assert len(ids) <= 14  # BPE learnt the corpus; a byte tokenizer would need 45


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 2047), max_size=60), cuts=st.lists(st.integers(0, 60), max_size=20),
       skip=st.booleans())
def test_deltas_concatenate_to_decode_for_any_ids(demo_tok: Tokenizer, ids, cuts, skip) -> None:
    deltas = _stream(demo_tok, _chunks(ids, cuts), skip_special_tokens=skip)
    assert "".join(deltas) == demo_tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30), cuts=st.lists(st.integers(0, 200), max_size=30))
def test_multibyte_characters_split_over_byte_tokens(demo_tok: Tokenizer, text: str, cuts) -> None:
    # One token per UTF-8 byte: every multi-byte character is split, in any chunking.
    byte_to_char = _gpt2_byte_chars()
    ids = [demo_tok.backend.token_to_id(byte_to_char[b]) for b in text.encode("utf-8")]
    deltas = _stream(demo_tok, _chunks(ids, cuts))
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas), "an incomplete character leaked into a delta"


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte → printable character map (what ByteLevel tokens are spelt in)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def test_incomplete_character_is_held_back_then_flushed(demo_tok: Tokenizer) -> None:
    byte_to_char = _gpt2_byte_chars()
    euro = [demo_tok.backend.token_to_id(byte_to_char[b]) for b in "€".encode()]
    detok = IncrementalDetokenizer(demo_tok)
    assert detok.push(demo_tok.encode("a", add_bos=False)) == "a"
    assert detok.push(euro[:1]) == ""
    assert detok.push(euro[1:2]) == ""
    assert detok.push(euro[2:]) == "€"
    assert detok.push(euro[:1]) == ""
    assert detok.flush() == "\ufffd"  # the sequence ended mid-character: decode says the same


def sentencepiece_style_tokenizer() -> Tokenizer:
    """A tiny tokenizer shaped like Mistral's: ▁ for spaces, byte fallback, Strip decoder."""
    specials = ["<unk>", "<s>", "</s>"]
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", *"abcdehlorstw", "▁a", "▁b", "he", "▁he", "lo", "llo"]
    vocab = {p: i for i, p in enumerate(specials + pieces)}
    merges = [("▁", "a"), ("▁", "b"), ("h", "e"), ("▁", "he"), ("l", "o"), ("l", "lo")]
    model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=[2])


SP_TEXT = st.text(alphabet=st.sampled_from(list("abhelo w") + ["é", "中", "🙂"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(text=SP_TEXT, cuts=st.lists(st.integers(0, 200), max_size=30),
       eos_at=st.lists(st.integers(0, 200), max_size=3))
def test_sentencepiece_deltas_concatenate_to_decode(text: str, cuts, eos_at) -> None:
    tok = sentencepiece_style_tokenizer()
    ids = tok.encode(text, add_bos=False)
    for i in eos_at:  # skipped special tokens anywhere, even inside a character's bytes
        ids.insert(i % (len(ids) + 1), 2)
    assert "".join(_stream(tok, _chunks(ids, cuts))) == tok.decode(ids)


@settings(max_examples=200, deadline=None)
@given(text=SP_TEXT, split=st.integers(1, 200), cuts=st.lists(st.integers(0, 200), max_size=10))
def test_prompt_context_keeps_the_leading_space(text: str, split: int, cuts) -> None:
    tok = sentencepiece_style_tokenizer()
    ids = tok.encode(text, add_bos=False)
    k = split % (len(ids) + 1)
    prompt_text = tok.decode(ids[:k])
    assume(not prompt_text.endswith("\ufffd"))  # a prompt cut inside a character has no clean split
    deltas = _stream(tok, _chunks(ids[k:], cuts), prompt_ids=ids[:k])
    assert "".join(deltas) == tok.decode(ids)[len(prompt_text):]


def test_first_generated_word_keeps_its_space() -> None:
    tok = sentencepiece_style_tokenizer()
    ids = tok.encode("hello world", add_bos=False)
    assert tok.decode(ids[-1:]) == "d"  # decoding alone strips the ▁ the word starts with
    k = len(tok.encode("hello", add_bos=False))
    assert "".join(_stream(tok, [ids[k:]], prompt_ids=ids[:k])) == " world"


def test_mixtral_instruct_format(demo_tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who are you?"},
    ]
    expected = "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Who are you? [/INST]"
    assert demo_tok.apply_chat_template(messages) == expected
    assert demo_tok.apply_chat_template(messages[1:2]) == "<s>[INST] Hi [/INST]"


def test_content_parts_are_joined(demo_tok: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    assert demo_tok.apply_chat_template([{"role": "user", "content": parts}]) == "<s>[INST] Hi there [/INST]"


@pytest.mark.parametrize("roles", [
    ["assistant"], ["user", "user"], ["user", "assistant", "assistant"], ["system"],
    ["user", "system"], ["system", "assistant"], ["system", "system", "user"], ["tool"], [],
])
def test_bad_role_order_is_a_clear_error(demo_tok: Tokenizer, roles: list[str]) -> None:
    with pytest.raises(ValueError, match="role|empty|user message"):
        demo_tok.apply_chat_template([{"role": r, "content": "x"} for r in roles])


def test_bad_content_is_a_clear_error(demo_tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="content"):
        demo_tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url"}]}])


def test_encode_chat_has_one_bos(demo_tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    ids = demo_tok.encode_chat(messages)
    assert ids[0] == demo_tok.bos_token_id and ids[1] != demo_tok.bos_token_id
    assert ids == demo_tok.encode(demo_tok.apply_chat_template(messages), add_bos=False)


CHATML = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_checkpoint_chat_template_is_used(tok_dir: Path) -> None:
    _edit_json(tok_dir / "tokenizer_config.json", chat_template=CHATML)
    tok = Tokenizer.from_dir(tok_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(messages) == "<|system|>S</s>\n<|user|>U</s>\n<|assistant|>"
    without_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert without_prompt == "<|system|>S</s>\n<|user|>U</s>\n"
    with pytest.raises(ChatTemplateError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_file_and_named_templates(tok_dir: Path) -> None:
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    _edit_json(tok_dir / "tokenizer_config.json", chat_template=templates)
    assert Tokenizer.from_dir(tok_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "D<s>"
    (tok_dir / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(tok_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"


def test_chat_template_is_sandboxed(tok_dir: Path) -> None:
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    _edit_json(tok_dir / "tokenizer_config.json", chat_template=escape)
    with pytest.raises(Exception, match="unsafe|access"):
        Tokenizer.from_dir(tok_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_invalid_chat_template_fails_at_load(tok_dir: Path) -> None:
    _edit_json(tok_dir / "tokenizer_config.json", chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        Tokenizer.from_dir(tok_dir)


def test_special_tokens_as_added_token_dicts(tok_dir: Path) -> None:
    _edit_json(tok_dir / "tokenizer_config.json", bos_token={"content": "</s>", "special": True},
               eos_token={"content": "<unk>", "special": True})
    tok = Tokenizer.from_dir(tok_dir)
    assert (tok.bos_token_id, tok.eos_token_ids) == (2, (0,))


def test_eos_list_from_generation_config(tok_dir: Path) -> None:
    _edit_json(tok_dir / "generation_config.json", eos_token_id=[2, 5, 2], bos_token_id=1)
    _edit_json(tok_dir / "config.json", eos_token_id=7)
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == (2, 5, 7)


def test_ids_from_config_files_when_tokenizer_config_is_silent(tok_dir: Path) -> None:
    (tok_dir / "tokenizer_config.json").unlink()
    _edit_json(tok_dir / "config.json", bos_token_id=2, eos_token_id=[0, 1])
    tok = Tokenizer.from_dir(tok_dir)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.eos_token) == (2, (0, 1), "<unk>")
    _edit_json(tok_dir / "generation_config.json", bos_token_id=1)
    assert Tokenizer.from_dir(tok_dir).bos_token_id == 1  # generation_config.json wins over config.json


def test_no_bos_and_add_bos_token_false(tok_dir: Path) -> None:
    (tok_dir / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.bos_token_id is None and tok.eos_token_ids == ()
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    _edit_json(tok_dir / "tokenizer_config.json", bos_token="<s>", add_bos_token=False)
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.bos_token_id == 1 and tok.encode("hi") == tok.encode("hi", add_bos=False)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@settings(max_examples=50, deadline=None)
@given(TRICKY_TEXT)
def test_tricky_text_round_trips(demo_tok: Tokenizer, text: str) -> None:
    assert demo_tok.decode(demo_tok.encode(text, add_bos=False), skip_special_tokens=False) == text
