"""Traffic policy: which version answers a request that names none.

Weights become cumulative bucket bounds over BUCKETS fixed buckets; choosing a
version is one bucket number and a comparison per version (two for a canary).
Canary requests draw the bucket at random (injectable RNG). A/B requests with a
key hash it, salted per experiment, so one key always lands in one bucket; the
versions keep their order, so moving a weight from 50/50 to 60/40 moves only the
keys in the buckets between the two bounds (10%).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidInput

BUCKETS = 10_000  # 0.01% resolution

# Where an A/B request carries its key (a user, a session): the request parameter
# wins over the gRPC metadata header when both are present. Same name for both.
AB_KEY_PARAMETER = "convoy-ab-key"
AB_KEY_HEADER = "convoy-ab-key"


def bucket_of(salt: str, key: str) -> int:
    """The sticky bucket of a key: sha256, not hash(), so it is stable across processes."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class TrafficPolicy:
    versions: tuple[str, ...]  # in a fixed order: stable first
    bounds: tuple[int, ...]  # cumulative upper bucket bound per version; the last is BUCKETS
    salt: str = ""
    sticky: bool = False  # True: a request's key picks its bucket (A/B)

    @classmethod
    def from_weights(
        cls, weights: Mapping[str, float], salt: str = "", sticky: bool = False
    ) -> TrafficPolicy:
        """Weights are percents in insertion order; they must sum to 100."""
        if not weights:
            raise InvalidInput("weights: no version given")
        for version, weight in weights.items():
            if not (math.isfinite(weight) and 0.0 <= weight <= 100.0):
                raise InvalidInput(f"weights: version {version} weight {weight} is out of 0..100")
        total = sum(weights.values())
        if abs(total - 100.0) > 1e-6:
            raise InvalidInput(f"weights: they sum to {total:g}, not 100")
        bounds: list[int] = []
        running = 0.0
        for weight in weights.values():
            running += weight
            bounds.append(round(running * BUCKETS / 100.0))
        bounds[-1] = BUCKETS
        return cls(tuple(weights), tuple(bounds), salt, sticky)

    @property
    def weights(self) -> dict[str, float]:
        lower = 0
        out: dict[str, float] = {}
        for version, upper in zip(self.versions, self.bounds, strict=True):
            out[version] = (upper - lower) * 100.0 / BUCKETS
            lower = upper
        return out

    def choose(self, key: str | None, rng: random.Random) -> str:
        if self.sticky and key:
            bucket = bucket_of(self.salt, key)
        else:
            bucket = int(rng.random() * BUCKETS)  # a third of randrange's cost
        bounds = self.bounds
        for index in range(len(bounds)):
            if bucket < bounds[index]:
                return self.versions[index]
        return self.versions[-1]
