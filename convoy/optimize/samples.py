"""The sample both versions are compared on (and static INT8 is calibrated with):
the user's .npz, checked against the model file's inputs, or seeded data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelSpec
from ..tensors import Array
from .plan import OptimizeRefused
from .runners import InputSpec

DYNAMIC_DIM = 16  # a dynamic dim past the batch (tokens, pixels) in seeded data


@dataclass(frozen=True)
class Sample:
    inputs: dict[str, Array]  # every array has the same first (batch) dim
    rows: int
    source: str  # where it came from, for the report


def load_calibration(path: Path, inputs: tuple[InputSpec, ...], batched: bool) -> Sample:
    """The .npz arrays, one per model input and named after it; OptimizeRefused
    ('calibration_mismatch') naming the first input whose name, dtype or shape is off."""

    def refuse(problem: str) -> OptimizeRefused:
        return OptimizeRefused("calibration_mismatch", f"{path}: {problem}")

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise refuse(f"not a readable .npz ({exc})") from None
    expected = {i.name for i in inputs}
    missing, extra = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing or extra:
        raise refuse(
            f"arrays must be named after the model file's inputs {sorted(expected)}; "
            f"missing {missing}, unexpected {extra}"
        )
    rows: int | None = None
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype != spec.dtype:
            raise refuse(f"'{spec.name}' is {array.dtype}, the model takes {spec.dtype}")
        if array.ndim != len(spec.dims) or any(
            d is not None and d != s for d, s in zip(spec.dims, array.shape, strict=False)
        ):
            want = ["?" if d is None else d for d in spec.dims]
            raise refuse(f"'{spec.name}' has shape {list(array.shape)}, the model takes {want}")
        count = array.shape[0] if batched and array.ndim else 1
        if rows is not None and count != rows:
            raise refuse(f"'{spec.name}' has {count} rows, other inputs {rows}")
        rows = count
    if not rows:
        raise refuse("holds no rows")
    return Sample(arrays, rows, f"calibration file {path.name} ({rows} rows)")


def seeded_sample(
    spec: ModelSpec, inputs: tuple[InputSpec, ...], version_dir: Path, rows: int, seed: int
) -> Sample:
    """Seeded data shaped like the inputs. A model with a tokenizer gets real token ids
    of seeded word sequences; random ids would exercise no real attention pattern."""
    rng = np.random.default_rng(seed)
    if not spec.batched:
        rows = 1
    if spec.options.text is not None:
        return _seeded_text(spec, inputs, version_dir, rows, rng)
    arrays: dict[str, Array] = {}
    for i in inputs:
        dims = [DYNAMIC_DIM if d is None else d for d in i.dims]
        if spec.batched:
            dims[0] = rows
        shape = tuple(dims)
        if i.dtype.kind == "f":
            arrays[i.name] = rng.standard_normal(shape).astype(i.dtype)
        elif i.dtype.kind == "b":
            arrays[i.name] = rng.random(shape) < 0.5
        elif "mask" in i.name.lower():
            arrays[i.name] = np.ones(shape, i.dtype)
        else:
            arrays[i.name] = rng.integers(0, 100, shape).astype(i.dtype)
    return Sample(arrays, rows, f"seeded data (seed {seed}, {rows} rows)")


def _seeded_text(
    spec: ModelSpec,
    inputs: tuple[InputSpec, ...],
    version_dir: Path,
    rows: int,
    rng: np.random.Generator,
) -> Sample:
    from tokenizers import Tokenizer

    assert spec.options.text is not None
    tokenizer = Tokenizer.from_file(str(version_dir / spec.options.text.tokenizer))
    tokenizer.enable_truncation(max_length=spec.options.text.max_length)
    tokenizer.enable_padding()
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    texts = [" ".join(rng.choice(words, int(rng.integers(4, 40)))) for _ in range(rows)]
    encodings = tokenizer.encode_batch(texts)
    by_name = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    arrays = {i.name: np.array(by_name[i.name], dtype=i.dtype) for i in inputs}
    return Sample(arrays, rows, f"seeded text ({rows} sequences of 4-40 vocabulary words)")


def rows_of(sample: Sample, start: int, end: int, batched: bool) -> dict[str, Array]:
    if not batched:
        return sample.inputs
    return {n: a[start:end] for n, a in sample.inputs.items()}


def batch_of(sample: Sample, size: int, batched: bool) -> dict[str, Array]:
    """`size` rows, the sample's repeated as needed (throughput needs full batches)."""
    if not batched:
        return sample.inputs
    reps = -(-size // sample.rows)
    return {
        n: np.concatenate([a] * reps)[:size] if reps > 1 else a[:size]
        for n, a in sample.inputs.items()
    }
