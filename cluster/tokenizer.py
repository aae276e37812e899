"""Text ↔ token ids for a checkpoint directory, its chat template, and streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the checkpoint's `tokenizer.json`) and adds what
serving needs from the files around it: which ids are BOS/EOS, and how chat messages become
prompt text. BOS is added here, not by the tokenizer.json post-processor, so `encode` behaves the
same whatever post-processor a checkpoint ships (`add_special_tokens=False` below).

`IncrementalDetokenizer` turns a growing list of generated ids into text deltas for streaming.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPLACEMENT_CHAR = "\ufffd"
MAX_UTF8_BYTES = 4
MIXTRAL_SYSTEM_SEPARATOR = "\n\n"


class ChatTemplateError(ValueError):
    """Messages the chat template cannot render (bad roles, bad order, bad content)."""


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None = None,
        add_bos_token: bool = True,
    ) -> None:
        self.backend = backend
        # A tokenizer.json may carry padding/truncation settings meant for training.
        backend.no_padding()
        backend.no_truncation()
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.chat_template = chat_template
        self._template = _compile_chat_template(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and the BOS/EOS/chat-template facts from the files beside it."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: moe-serve needs a 'fast' (tokenizers) tokenizer file"
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        def token_id(entry: Any) -> int | None:
            # tokenizer_config.json holds a token as a string or as a serialized AddedToken dict.
            content = entry.get("content") if isinstance(entry, dict) else entry
            return backend.token_to_id(content) if isinstance(content, str) else None

        bos_candidates = [token_id(tok_cfg.get("bos_token")), *_ids(gen_cfg.get("bos_token_id")),
                          *_ids(model_cfg.get("bos_token_id"))]
        eos_ids = [token_id(tok_cfg.get("eos_token")), *_ids(gen_cfg.get("eos_token_id")),
                   *_ids(model_cfg.get("eos_token_id"))]
        return cls(
            backend,
            bos_token_id=next((i for i in bos_candidates if i is not None), None),
            eos_token_ids=[i for i in eos_ids if i is not None],
            chat_template=_find_chat_template(path, tok_cfg),
            add_bos_token=tok_cfg.get("add_bos_token", True) is not False,
        )

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the one the chat template writes); `eos_token_ids` holds all stop ids."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (a model's vocab may be padded beyond)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside `text` (e.g. "<s>") become their ids."""
        # encode_batch, not encode: only the batch call lets go of the GIL while Rust works, so a
        # long prompt tokenized on a thread (the ingress's pool) does not stall the event loop.
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.add_bos_token:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
    ) -> str:
        """Prompt text for chat `messages`: the checkpoint's own Jinja template, else Mixtral-Instruct.

        The text starts with the BOS string when the template writes one; encode it with
        `encode(text, add_bos=False)` (or use `encode_chat`) so BOS is not doubled.
        """
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        if self._template is None:
            return mixtral_instruct_prompt(messages, bos_token=self.bos_token or "",
                                           eos_token=self.eos_token or "")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            # The template is the checkpoint's, the messages the client's: either way a bad request.
            raise ChatTemplateError(f"chat template failed: {exc}") from None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids for chat `messages` (BOS comes from the template, as with transformers)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


def mixtral_instruct_prompt(messages: Sequence[Mapping[str, Any]], *, bos_token: str, eos_token: str) -> str:
    """`<s>[INST] user [/INST] assistant</s>[INST] user2 [/INST]`, as Mistral documents it.

    A leading system message is folded into the first user turn (the format has no system
    role); after it, roles must alternate user, assistant, user, ...
    """
    turns = list(messages)
    system = None
    if turns and turns[0].get("role") == "system":
        system = _content_text(turns.pop(0))
    if not turns:
        raise ChatTemplateError("messages need at least one user message")
    parts = [bos_token]
    for i, message in enumerate(turns):
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            where = "after the system message" if system is not None and i == 0 else f"at position {i}"
            raise ChatTemplateError(
                f"roles must alternate user/assistant starting with user (one optional system message "
                f"first); got {role!r} {where} where {expected!r} was expected"
            )
        text = _content_text(message)
        if role == "user":
            if i == 0 and system is not None:
                text = system + MIXTRAL_SYSTEM_SEPARATOR + text
            parts.append(f"[INST] {text} [/INST]")
        else:
            parts.append(f" {text}{eos_token}")
    return "".join(parts)


class IncrementalDetokenizer:
    """Text deltas for one sequence's generated ids, as they arrive.

    Decoding each new id alone is wrong twice over: SentencePiece-style decoders strip the
    leading space of the first token they see, and one character may span several byte tokens.
    So every step decodes a short window `ids[prefix_offset:]` and returns only what it adds to
    `ids[prefix_offset:read_offset]` (the technique of HF text-generation-inference and vLLM);
    text ending in U+FFFD is an incomplete UTF-8 sequence and is held back until it completes.

    Without `prompt_ids`, the deltas plus `flush()` concatenate to `decode(all ids)` exactly
    (byte-level tokenizers; byte-fallback ones too when the bytes form valid UTF-8). With
    `prompt_ids`, the last few prompt ids give the window context, so the first generated token
    keeps its leading space the way it would in `decode(prompt_ids + ids)`.
    """

    PROMPT_CONTEXT = 5  # prompt ids kept as left context, as vLLM does

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        start = max(len(prompt_ids) - self.PROMPT_CONTEXT, 0)
        # Begin the context on a character boundary: a window that starts inside a multi-byte
        # character decodes to U+FFFD there, and byte fallback garbles the whole byte run.
        lowest = max(start - MAX_UTF8_BYTES, 0)
        while start > lowest and self._decode(prompt_ids[start:]).startswith(REPLACEMENT_CHAR):
            start -= 1
        self.ids: list[int] = list(prompt_ids[start:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete (maybe "")."""
        self.ids.extend(new_ids)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(new_text[len(prefix_text):])

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as U+FFFD)."""
        prefix_text, new_text = self._window_texts()
        return self._advance(new_text[len(prefix_text):])

    def _window_texts(self) -> tuple[str, str]:
        window = self.ids[self.prefix_offset:]
        return self._decode(window[:self.read_offset - self.prefix_offset]), self._decode(window)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def _advance(self, delta: str) -> str:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta


def _content_text(message: Mapping[str, Any]) -> str:
    """A message's text: a string, or OpenAI-style content parts that are all text."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ChatTemplateError(f"message content must be a string or a list of text parts, got {content!r}")


def _compile_chat_template(source: str) -> Any:
    """A Jinja template compiled in a sandbox with the helpers HF chat templates expect."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the checkpoint's chat_template is not valid Jinja: {exc}") from None


def _find_chat_template(path: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    """`chat_template.jinja` (newer transformers) or tokenizer_config's `chat_template`."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: serving uses the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    """An id field of config.json/generation_config.json: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []
