"""Text hooks for the text drift test: token and unknown-token counts from the model's
own tokenizer, so that "unknown" means what the model cannot represent."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .detectors import Tokenizer


def tokenizer_hook(path: Path) -> Tokenizer:
    """A hook from a Hugging Face tokenizer.json (e.g. the MiniLM example's): tokens
    without special tokens, and how many of them are the model's unknown token."""
    from tokenizers import Tokenizer as HfTokenizer

    try:
        tokenizer = HfTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise ConfigError(str(path), "<file>", f"not a tokenizer.json: {exc}") from None
    # Padding and truncation would change the lengths the test compares.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    unk_token = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk_token) if unk_token else None

    def count(text: bytes) -> tuple[int, int]:
        ids = tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False).ids
        return len(ids), (ids.count(unk_id) if unk_id is not None else 0)

    return count
