"""The response cache's key: one digest over everything that decides an answer.

Triton hashes model name, version and inputs into 64 bits and accepts the collision
risk; a 256-bit BLAKE2b digest makes a wrong answer from a collision negligible for
the cost of a few more bytes per entry. Every variable-length field is length-prefixed
so two different requests can never feed the hasher the same byte stream.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInput
from ..tensors import Array

_PERSON = b"convoy-cache-v1"  # domain separation: a key digest is never another digest
_DIGEST_BYTES = 32
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class CacheKey:
    """Model and version travel beside the digest so entries can be counted and
    dropped per model without decoding anything."""

    model: str
    version: int
    digest: bytes


def request_key(
    model: str,
    version: int,
    inputs: Mapping[str, Array],
    outputs: Sequence[str],
    classification: Mapping[str, int] | None = None,
) -> CacheKey:
    """The key of one decoded request.

    Inputs are hashed in name order, and requested outputs as a set: the encoder
    answers in the order the request lists them, so a different order or listing
    of the same outputs is the same computation. BYTES inputs may hold bytes or
    str (text decoded for a tokenizer); both hash as their UTF-8 bytes.
    """
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=_PERSON)
    _text(h, model)
    h.update(_U64.pack(version))
    h.update(_U64.pack(len(inputs)))
    for name in sorted(inputs):
        _text(h, name)
        _array(h, name, inputs[name])
    wanted = sorted(set(outputs))
    h.update(_U64.pack(len(wanted)))
    for name in wanted:
        _text(h, name)
    ranked = sorted((classification or {}).items())
    h.update(_U64.pack(len(ranked)))
    for name, k in ranked:
        _text(h, name)
        h.update(_U64.pack(k))
    return CacheKey(model, version, h.digest())


def _text(h: hashlib.blake2b, value: str) -> None:
    data = value.encode()
    h.update(_U64.pack(len(data)))
    h.update(data)


def _array(h: hashlib.blake2b, name: str, array: Array) -> None:
    h.update(_U64.pack(array.ndim))
    h.update(struct.pack(f"<{array.ndim}Q", *array.shape))
    if array.dtype == np.object_:
        _text(h, "BYTES")
        item: object
        for item in array.reshape(-1):
            if isinstance(item, str):
                item = item.encode()
            elif not isinstance(item, bytes):
                raise InvalidInput(
                    f"input '{name}': BYTES element of type {type(item).__name__} "
                    "cannot be keyed; expected bytes or str"
                )
            h.update(_U64.pack(len(item)))
            h.update(item)
        return
    # dtype.str carries byte order and width ('<f4'): FP32 and INT32 of the same bytes
    # differ. Decoded inputs are contiguous views of the request, so this copies nothing.
    _text(h, array.dtype.str)
    data = np.ascontiguousarray(array)
    h.update(_U64.pack(data.nbytes))
    h.update(data.data)
