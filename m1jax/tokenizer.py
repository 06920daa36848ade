"""Tokenizers (text <-> token ids) and the MiniMax-M1 chat template.

Two implementations of one small protocol:

* ``HFTokenizer``: a Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` package. MiniMax-M1
  ships a GPT-2-style byte-level BPE in this format (``tokenizer_class: GPT2Tokenizer``); special
  tokens come from the ``tokenizer_config.json`` next to it when there is one.
* ``CharTokenizer``: one token per character after a few special tokens, for the toy tasks.
  ``CharTokenizer(arith.CHARS)`` is exactly the default job's encoding (``m1jax/data/arith.py``:
  0 pad, 1 bos, 2 eos, then the characters).

``encode`` never adds special tokens (prompts built with ``chat_prompt`` carry their own markers);
``decode`` drops special tokens. ``load(spec)`` picks one from a command-line value.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, Sequence, runtime_checkable

from etils import epath


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added (those written in the text are kept)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens dropped."""
        ...


class CharTokenizer:
    """``specials`` (ids 0..S-1, default pad, bos, eos) then one id per character of ``chars``."""

    def __init__(self, chars: str, specials: Sequence[str] = ("<pad>", "<bos>", "<eos>")):
        if len(set(chars)) != len(chars):
            raise ValueError(f"CharTokenizer: repeated characters in {chars!r}.")
        self.chars, self.specials = chars, tuple(specials)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.specials) + len(chars)
        self._index = {c: len(self.specials) + i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self._index})
        if bad:
            raise ValueError(f"characters {bad} are not in this tokenizer's alphabet {self.chars!r}.")
        return [self._index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.specials)
        return "".join(self.chars[int(t) - n] for t in ids if n <= int(t) < self.vocab_size)

    def to_hf(self):
        """The same tokenizer as a ``tokenizers.Tokenizer`` (word-level over single characters), so an
        exported model's directory carries a ``tokenizer.json`` that transformers can load."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Tok

        vocab = {s: i for i, s in enumerate(self.specials)} | self._index
        tok = _Tok(models.WordLevel(vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(self.specials))
        return tok


class HFTokenizer:
    """A ``tokenizer.json`` (e.g. MiniMax-M1's byte-level BPE) with its special-token ids.

    bos/eos/pad tokens: from ``tokenizer_config.json`` beside the file when present; otherwise the
    MiniMax-M1 names (``<beginning_of_sentence>``, ``<end_of_sentence>``) if the vocabulary has them.
    pad falls back to eos (padding is masked everywhere, so only its range matters).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        p = epath.Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.exists():
            raise FileNotFoundError(f"tokenizer {path!r}: no such file; pass a tokenizer.json or a directory "
                                    "holding one (a Hugging Face model directory).")
        self.path = str(file)
        self._tok = _Tok.from_str(file.read_text())
        config_file = file.parent / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special("bos_token", M1_BOS)
        eos = self._special("eos_token", M1_EOS)
        if eos is None:
            raise ValueError(f"tokenizer {path!r}: no eos token (set eos_token in tokenizer_config.json).")
        self.eos_id = eos
        pad = self._special("pad_token", None)
        self.pad_id = eos if pad is None else pad

    def _special(self, key: str, default: str | None) -> int | None:
        name = self.config.get(key, default)
        if isinstance(name, dict):  # {"content": "...", ...} (AddedToken form)
            name = name.get("content")
        if name is None:
            return None
        token_id = self._tok.token_to_id(name)
        if token_id is None and key in self.config:
            raise ValueError(f"{self.path}: {key}={name!r} of tokenizer_config.json is not in the vocabulary.")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the M1 chat template unless the source
        config has its own) into ``directory``."""
        save_hf_files(self._tok, directory, self.config)


def save_hf_files(tok, directory: str, config: dict[str, Any] | None = None) -> None:
    """tokenizer.json + tokenizer_config.json for a ``tokenizers.Tokenizer``; specials default to
    the MiniMax-M1 names when the vocabulary has them, and the chat template to ``M1_CHAT_TEMPLATE``."""
    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    d.joinpath("tokenizer.json").write_text(tok.to_str())
    config = dict(config or {})
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("chat_template", M1_CHAT_TEMPLATE)
    for key, name in (("bos_token", M1_BOS), ("eos_token", M1_EOS)):
        if key not in config and tok.token_to_id(name) is not None:
            config[key] = name
    d.joinpath("tokenizer_config.json").write_text(json.dumps(config, indent=2))


ARITH_CHARS = "0123456789+="  # the default job's alphabet (m1jax/data/arith.py)


def load(spec: str) -> Tokenizer:
    """``arith`` (the default job's characters), ``chars:ABC...`` (a CharTokenizer over those
    characters), or a path to a ``tokenizer.json`` or a directory holding one (local or gs://)."""
    if spec == "arith":
        return CharTokenizer(ARITH_CHARS)
    if spec.startswith("chars:"):
        return CharTokenizer(spec[len("chars:"):])
    return HFTokenizer(spec)


# ----------------------------------------------------------------------------- chat template
# MiniMax-M1's special tokens and chat template, from the model's own tokenizer_config.json
# (huggingface.co/MiniMaxAI/MiniMax-M1-40k and -80k, "chat_template"; the same template ships with
# tiny-random MiniMax-M1 tokenizers; ms-swift's `minimax_m1` template and vLLM's
# examples/tool_chat_template_minimax_m1.jinja use the same markers). bos_token
# "<beginning_of_sentence>", eos_token "<end_of_sentence>", unk_token "<end_of_document>".
M1_BOS, M1_EOS, M1_BEGIN_DOCUMENT = "<beginning_of_sentence>", "<end_of_sentence>", "<begin_of_document>"

# The template without its tool-calling branches (tools in the system block, role "tool"), which
# m1jax does not use; the system/user/assistant/generation parts are verbatim.
M1_CHAT_TEMPLATE = (
    "{{ '<begin_of_document>' -}}{% set ns = namespace(system_prompt='') -%}"
    "{% for message in messages -%}{% if message['role'] == 'system' -%}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'][0]['text'] -%}{% endif -%}{%- endfor -%}"
    "{% if ns.system_prompt != '' -%}"
    "{{ '<beginning_of_sentence>system ai_setting=assistant\\n' + ns.system_prompt + '<end_of_sentence>\\n' -}}"
    "{%- endif -%}"
    "{% for message in messages -%}{% if message['role'] == 'user' -%}"
    "{{ '<beginning_of_sentence>user name=user\\n' + message['content'][0]['text'] + '<end_of_sentence>\\n' -}}"
    "{% elif message['role'] == 'assistant' -%}{{ '<beginning_of_sentence>ai name=assistant\\n' -}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] -}}"
    "{%- endfor -%}{{ '<end_of_sentence>\\n' -}}{% endif -%}{%- endfor -%}"
    "{% if add_generation_prompt -%}{{ '<beginning_of_sentence>ai name=assistant\\n' -}}{%- endif -%}"
)


def _texts(message: dict) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list) and all(isinstance(c, dict) for c in content):
        return [c["text"] for c in content if c.get("type") == "text"]
    raise ValueError(f"message content must be a string or a list of {{'type': 'text', 'text': ...}} parts, "
                     f"got {content!r}.")


def chat_prompt(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The MiniMax-M1 chat format of ``messages`` (roles system, user, assistant):

        <begin_of_document>
        <beginning_of_sentence>system ai_setting=assistant\\n{all system texts}<end_of_sentence>\\n   (if any)
        <beginning_of_sentence>user name=user\\n{text}<end_of_sentence>\\n                           (per user turn)
        <beginning_of_sentence>ai name=assistant\\n{text}<end_of_sentence>\\n                       (per assistant turn)
        <beginning_of_sentence>ai name=assistant\\n                                                (generation prompt)

    (one string, no line breaks other than the ``\\n`` shown). As in the original template, the
    system texts of all system messages are joined into one block at the top, a user turn uses its
    first text part and an assistant turn all its text parts. Content is a string or a list of
    ``{"type": "text", "text": ...}`` parts. Equals transformers' ``apply_chat_template`` with
    ``M1_CHAT_TEMPLATE`` (tests/test_tokenizer.py).
    """
    system = "".join(_texts(m)[0] for m in messages if m.get("role") == "system")
    out = [M1_BEGIN_DOCUMENT]
    if system:
        out.append(f"{M1_BOS}system ai_setting=assistant\n{system}{M1_EOS}\n")
    for m in messages:
        role = m.get("role")
        if role == "user":
            out.append(f"{M1_BOS}user name=user\n{_texts(m)[0]}{M1_EOS}\n")
        elif role == "assistant":
            out.append(f"{M1_BOS}ai name=assistant\n{''.join(_texts(m))}{M1_EOS}\n")
        elif role != "system":
            raise ValueError(f"message role {role!r}: m1jax's chat template handles 'system', 'user' and "
                             "'assistant' (tool calls are not supported).")
    if add_generation_prompt:
        out.append(f"{M1_BOS}ai name=assistant\n")
    return "".join(out)

