"""Random keys on the TensorFlow path: per-pass keys as tensors, and the seed generators' states of a pass.

:class:`TensorKeyStream` hands out the keys of :class:`.switches.KeyStream` as ``(1,)`` uint64 tensors (the
traced functions' key argument); :func:`seed_values` derives the model's seed-generator states from such a key
inside a traced pass (Philox), for :func:`.switches.active`.
"""

from __future__ import annotations

import tensorflow as tf

from mcu.backends.keras import switches as _switches

__all__ = ["TensorKeyStream", "seed_values"]

_PHILOX = 1  # tf.random.Algorithm.PHILOX
_SEED_REGION = 1  # Philox counter block of a pass key for the seed generators (the fast masks use 4 * i, 4 * i + 2)


def seed_values(key: tf.Tensor | None, sites: _switches.Sites) -> tf.Tensor | None:
    """``(len(sites.generators), 2)`` int64 seed-generator states in ``[0, 2**31)`` from a ``(1,)`` uint64 pass
    key (Philox); None without a key or without seed generators (their current states are used)."""
    count = len(sites.generators)
    if key is None or not count:
        return None
    words = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[2 * count], key=key, counter=tf.constant([0, _SEED_REGION], tf.uint64), alg=_PHILOX, dtype=tf.uint32)
    return tf.reshape(tf.cast(tf.bitwise.bitwise_and(words, 0x7FFFFFFF), tf.int64), [count, 2])


class TensorKeyStream(_switches.KeyStream):
    """A :class:`.switches.KeyStream` whose :meth:`next_key` hands out tensors from blocks converted at once (a
    conversion per pass would cost more than a small model's pass)."""

    BLOCK = 64

    def __init__(self, seed: int | None) -> None:
        super().__init__(seed)
        self._ready: list[tf.Tensor] = []

    def next_key(self) -> tf.Tensor:
        """The next key as a ``(1,)`` uint64 tensor."""
        with self._lock:
            if not self._ready:
                with tf.init_scope():  # eager tensors, also when asked while a function is traced
                    self._ready = tf.unstack(tf.constant(self._keys(self.BLOCK).reshape(-1, 1)))[::-1]
            return self._ready.pop()
