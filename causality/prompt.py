"""Prompts: read them (text, file or standard input), turn them into token ids with the checks a user
needs, and turn ids back into short labels for plot axes.

Every problem is a DataError or ValueError with a one-line message; the recoverable ones (an empty
prompt, a prompt longer than the context) are logged warnings and handled as documented.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

from data.config import DataError
from data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def read_prompt(prompt: str, prompt_file: str | None, stdin: TextIO) -> str:
    """The prompt text: `prompt`, or the contents of `prompt_file`, or standard input for prompt="-"."""
    if prompt_file:
        if prompt:
            raise ValueError("give prompt=... or prompt_file=..., not both")
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise ValueError(f"prompt_file {path} does not exist")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt_file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    if prompt == "-":
        return stdin.read()
    return prompt


def start_token(tokenizer: Tokenizer) -> int:
    """What an empty prompt starts from: the end-of-text token, else the newline token (char models)."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    try:
        ids = tokenizer.encode("\n")
    except DataError:
        ids = []
    if len(ids) != 1:
        raise DataError("the prompt is empty and this tokenizer has neither an end-of-text nor a newline token "
                        "to start from; give a prompt")
    return ids[0]


def unknown_characters(tokenizer: Tokenizer, text: str) -> list[str]:
    """The distinct characters of text that the tokenizer cannot encode, in sorted order."""
    unknown = []
    for ch in sorted(set(text)):
        try:
            tokenizer.encode(ch)
        except DataError:
            unknown.append(ch)
    return unknown


def encode_prompt(tokenizer: Tokenizer, text: str, block_size: int) -> list[int]:
    """Prompt text -> ids, at least one and at most block_size of them.

    An empty prompt starts from the end-of-text (or newline) token; a prompt longer than the
    context keeps its last block_size tokens, since those are all the model can see."""
    if text == "":
        tok = start_token(tokenizer)
        log.warning("empty prompt: starting from token %d (%s)", tok, label(tokenizer, tok))
        return [tok]
    try:
        ids = tokenizer.encode(text)
    except DataError as e:
        if tokenizer.kind != "char":
            raise
        bad = unknown_characters(tokenizer, text)
        if not bad:
            raise
        names = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in bad)
        raise DataError(f"the prompt has {len(bad)} character(s) outside the model's char vocabulary: {names}; "
                        "remove or replace them") from e
    unk_id = getattr(tokenizer, "unk_id", None)
    if unk_id is not None and unk_id in ids:
        log.warning("%d prompt character(s) are outside the char vocabulary and were read as <unk>",
                    ids.count(unk_id))
    if len(ids) > block_size:
        log.warning("the prompt is %d tokens, longer than the model's context of %d: keeping the last %d",
                    len(ids), block_size, block_size)
        ids = ids[-block_size:]
    return ids


def label(tokenizer: Tokenizer | None, token_id: int, max_len: int = 10) -> str:
    """A short, visible label for one token: whitespace shown (space as a middle dot, newline as \\n),
    long tokens cut; the id itself when there is no tokenizer."""
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "\u00b7")
    return text if len(text) <= max_len else text[: max_len - 1] + "\u2026"


def labels(tokenizer: Tokenizer | None, ids: list[int]) -> list[str]:
    return [label(tokenizer, i) for i in ids]
