"""The response cache key: equal for the same computation, different for any change
that could change the answer."""

from __future__ import annotations

import numpy as np

from convoy.cache import request_key

IMAGE = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)


def key(**changes: object) -> bytes:
    args: dict[str, object] = {
        "model": "m",
        "version": 1,
        "inputs": {"INPUT": IMAGE, "MASK": np.ones((2, 4), np.int64)},
        "outputs": ("LOGITS", "EMBEDDING"),
        "classification": {},
    }
    args.update(changes)
    return request_key(**args).digest  # type: ignore[arg-type]


def test_same_request_same_key_whatever_the_order() -> None:
    reordered = {"MASK": np.ones((2, 4), np.int64), "INPUT": IMAGE.copy()}
    assert key() == key(inputs=reordered)
    assert key() == key(outputs=("EMBEDDING", "LOGITS"))  # the encoder orders the answer


def test_key_changes_with_anything_that_changes_the_answer() -> None:
    changed = {"INPUT": IMAGE.copy(), "MASK": np.ones((2, 4), np.int64)}
    changed["INPUT"][1, 2, 3] += 1e-6
    variants = [
        key(),
        key(model="other"),
        key(version=2),
        key(inputs=changed),
        key(inputs={"INPUT": IMAGE.reshape(2, 4, 3), "MASK": np.ones((2, 4), np.int64)}),
        key(inputs={"INPUT": IMAGE.view(np.int32), "MASK": np.ones((2, 4), np.int64)}),
        key(inputs={"INPUT2": IMAGE, "MASK": np.ones((2, 4), np.int64)}),
        key(inputs={"INPUT": IMAGE}),
        key(outputs=("LOGITS",)),
        key(classification={"LOGITS": 3}),
        key(classification={"LOGITS": 5}),
        key(classification={"EMBEDDING": 3}),
    ]
    assert len(set(variants)) == len(variants)


def test_bytes_inputs_hash_their_content_and_boundaries() -> None:
    def text(*items: object) -> bytes:
        return request_key("m", 1, {"TEXT": np.array(items, dtype=object)}, ("E",)).digest

    assert text(b"hello", b"world") == text("hello", "world")  # decoded for a tokenizer
    assert text("héllo") == text("héllo".encode())
    assert text(b"ab", b"c") != text(b"a", b"bc")  # element boundaries count
    assert text(b"a") != text(b"a", b"")


def test_views_and_copies_key_alike() -> None:
    strided = np.zeros((4, 6), np.float32)[:, ::2]
    assert request_key("m", 1, {"X": strided}, ("Y",)) == request_key(
        "m", 1, {"X": np.ascontiguousarray(strided)}, ("Y",)
    )


def test_model_and_version_are_readable_on_the_key() -> None:
    k = request_key("m", 3, {"X": IMAGE}, ("Y",))
    assert (k.model, k.version, len(k.digest)) == ("m", 3, 32)
