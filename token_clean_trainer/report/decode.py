"""The text each token id stands for, with real whitespace: what the token tables and `tokens.html` show."""

import codecs
import json
import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-character table of byte-level BPE (GPT-2): printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {char: byte for byte, char in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def special_ids(tokenizer) -> set[int]:
    """The ids of the special and added tokens (shown as their names, listed apart in the token tables)."""
    return set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)


def token_texts(tokenizer, ids: list[int]) -> tuple[list[str], list[bool]]:
    """
    The text each token contributes, with real whitespace, and whether it is a special (added) token.

    Byte-level BPE tokens (`Ġ`, `Ċ`, `Ã©`) are mapped back to their bytes and decoded incrementally as UTF-8, so a
    character split over two tokens appears on the token that completes it; a token holding only part of a character
    shows its bytes as `<e2 80>`. SentencePiece tokens get `▁` turned into a space and `<0xNN>` byte tokens decoded
    the same way.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The trainer's tokenizer.
        ids (`list[int]`):
            Token ids of one row.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    specials = special_ids(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts, special = [], []
    for token_id, token in zip(ids, tokens):
        token = "" if token is None else str(token)
        if int(token_id) in specials:
            decoder.reset()
            texts.append(token)
            special.append(True)
            continue
        match = _BYTE_TOKEN.match(token)
        if match:
            raw = bytes([int(match.group(1), 16)])
        elif byte_level and all(char in _BYTE_DECODER for char in token):
            raw = bytes(_BYTE_DECODER[char] for char in token)
        else:
            raw = token.replace("\u2581", " ").encode("utf-8")
        text = decoder.decode(raw)
        if not text and raw:
            text = "<" + " ".join(f"{b:02x}" for b in raw) + ">"
        texts.append(text)
        special.append(False)
    return texts, special
