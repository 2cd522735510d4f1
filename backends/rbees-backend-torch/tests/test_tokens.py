"""token_bytes gives raw bytes, so characters split over tokens come back whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rbees_backend_torch.tokens import TokenBytes, is_byte_level

TEXT = "héllo wörld, 日本語 🐝 naïve “quotes”\n\ttabs"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                         local_files_only=True)


def test_byte_level_bpe_round_trips_multibyte_text(smollm2_tokenizer: Any) -> None:
    token_bytes = TokenBytes(smollm2_tokenizer)
    assert is_byte_level(smollm2_tokenizer)
    ids = smollm2_tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [token_bytes(i) for i in ids]
    assert any(_is_partial_utf8(p) for p in pieces), "the test text should split a character"
    assert b"".join(pieces) == TEXT.encode()


def test_special_tokens_have_no_bytes(smollm2_tokenizer: Any) -> None:
    token_bytes = TokenBytes(smollm2_tokenizer)
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert [token_bytes(i) for i in ids] == [b"", b"user", b"\n", b"hi", b""]


def test_sentencepiece_style_tokens_with_byte_fallback() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = ["\u2581", "h", "e", "l", "o", "w", "r", "d"]
    merges = [("l", "l"), ("\u2581", "h"), ("\u2581h", "e"), ("\u2581he", "ll"),
              ("\u2581hell", "o")]
    vocab = {"<s>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in [*letters, *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True)
    raw = Tokenizer(model)
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    token_bytes = TokenBytes(tokenizer)
    assert not is_byte_level(tokenizer)
    text = "hello wörld 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert vocab["\u2581hello"] in ids and vocab["<0xC3>"] in ids
    assert b"".join(token_bytes(i) for i in ids) == b" " + text.encode()
    assert token_bytes(vocab["</s>"]) == b""


def _is_partial_utf8(piece: bytes) -> bool:
    try:
        piece.decode()
    except UnicodeDecodeError:
        return True
    return False
