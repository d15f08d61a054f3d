"""Which replica polls which ingestion id, when several exporters split the ids between them.

There is no coordinator: every replica computes the same answer from the id alone. A 64-bit
key is taken from BLAKE2b (not the built-in `hash()`, which is salted per process), and Jump
Consistent Hash (Lamping & Veach, 2014, https://arxiv.org/abs/1406.2294) maps it to a shard.
Growing from n to n+1 shards moves only about 1/(n+1) of the ids, all of them to the new
shard; shrinking moves only the ids of the removed shard. Kubernetes supplies the index: a
StatefulSet pod's hostname ends in its ordinal (`index_from_hostname`).

This module decides ownership only; it neither filters ids nor reads the config.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["Shard", "index_from_hostname", "jump_hash", "shard_of"]

_MASK64 = (1 << 64) - 1
_LCG_MULTIPLIER = 2862933555777941757  # the paper's 64-bit linear congruential generator
# A StatefulSet pod is <name>-<ordinal>, the ordinal in plain decimal (no leading zeros).
# Nine digits at most: far beyond any replica count, and int() never meets a huge string.
_ORDINAL_SUFFIX = re.compile(r".+-(0|[1-9][0-9]{0,8})")


def jump_hash(key: int, buckets: int) -> int:
    """Jump Consistent Hash: the bucket in [0, buckets) of a 64-bit unsigned `key`.

    The paper's C++ function step for step; Python floats are IEEE doubles everywhere, so
    the division gives the same result as the C++ double arithmetic.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    if not 0 <= key <= _MASK64:
        raise ValueError("key must be a 64-bit unsigned integer")
    bucket, jump = -1, 0
    while jump < buckets:
        bucket = jump
        key = (key * _LCG_MULTIPLIER + 1) & _MASK64
        jump = int((bucket + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return bucket


def _key(ingestion_id: str) -> int:
    # surrogatepass: a lone surrogate (refused as an id elsewhere) still gets a stable key
    # rather than an exception here.
    digest = hashlib.blake2b(ingestion_id.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def shard_of(ingestion_id: str, total: int) -> int:
    """The shard in [0, total) that owns `ingestion_id`.

    Stable across processes, machines and Python versions (NOT the salted `hash()`): the
    first 8 bytes of `hashlib.blake2b(id.encode("utf-8", "surrogatepass"), digest_size=8)`
    read big-endian as the key, mapped with Jump Consistent Hash, so that changing `total`
    from n to n+1 moves only ~1/(n+1) of the ids, and only to the new shard.
    """
    if total < 1:
        raise ValueError(f"total must be at least 1, got {total}")
    if total == 1:
        return 0
    return jump_hash(_key(ingestion_id), total)


@dataclass(frozen=True, slots=True)
class Shard:
    """This replica's place among `total` replicas: it polls the ids with `shard_of == index`."""

    index: int = 0
    total: int = 1

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"total must be at least 1, got {self.total}")
        if not 0 <= self.index < self.total:
            raise ValueError(f"index must be from 0 to {self.total - 1}, got {self.index}")

    def owns(self, ingestion_id: str) -> bool:
        """Whether this replica polls `ingestion_id`; a single replica owns every id."""
        return self.total == 1 or shard_of(ingestion_id, self.total) == self.index


def index_from_hostname(hostname: str) -> int | None:
    """A StatefulSet pod's ordinal from its hostname, or None if it has none.

    "catalog-upload-exporter-3" -> 3. With `setHostnameAsFQDN` the hostname is the pod's
    FQDN, so only the part before the first "." is read. A name that does not end in
    -<digits> gives None. A Deployment's pod name ends in a random suffix that is all digits
    now and then, so the caller must still check the ordinal against the replica count.
    """
    match = _ORDINAL_SUFFIX.fullmatch(hostname.split(".", 1)[0])
    return int(match.group(1)) if match else None
