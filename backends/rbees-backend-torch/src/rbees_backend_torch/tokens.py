"""The raw bytes behind a Hugging Face tokenizer's tokens.

``tokenizer.decode([id])`` cannot be used token by token: a UTF-8 character split over two
tokens decodes to two replacement characters. The bytes are recovered from the vocabulary
strings instead: GPT-2 byte-level BPE maps every byte to a printable character (inverted
here), sentencepiece writes spaces as ``▁`` and unknown bytes as ``<0xNN>``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def _mentions_byte_level(spec: Any) -> bool:
    if isinstance(spec, dict):
        return spec.get("type") == "ByteLevel" or any(
            _mentions_byte_level(v) for v in spec.values())
    if isinstance(spec, list):
        return any(_mentions_byte_level(v) for v in spec)
    return False


def is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a GPT-2 style byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        return _mentions_byte_level(spec.get("decoder")) or _mentions_byte_level(
            spec.get("pre_tokenizer"))
    return hasattr(tokenizer, "byte_decoder")


class TokenBytes:
    """``token_bytes(id)``: the bytes a token stands for; special tokens are ``b""``."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._special = set(tokenizer.all_special_ids) | {
            i for i, tok in added.items() if getattr(tok, "special", False)}
        self._added = {i: str(getattr(tok, "content", tok)) for i, tok in added.items()}
        self._byte_level = is_byte_level(tokenizer)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        data = self._cache.get(token)
        if data is None:
            data = self._cache[token] = self._convert(token)
        return data

    def _convert(self, token: int) -> bytes:
        if token in self._special:
            return b""
        if token in self._added:  # added tokens are stored as plain text
            return self._added[token].encode("utf-8")
        try:
            piece = self._tokenizer.convert_ids_to_tokens(token)
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):
            return b""
        if not isinstance(piece, str):
            return b""
        if self._byte_level:
            try:
                return bytes(_UNICODE_TO_BYTE[char] for char in piece)
            except KeyError:
                return piece.encode("utf-8")
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPACE, " ").encode("utf-8")
