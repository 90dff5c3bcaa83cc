"""The PyTorch backend.

Modules: :mod:`.backend` (:class:`TorchBackend`, the protocol of :mod:`mcu.backends.base`), :mod:`.twin` (every
dropout site switched on, on a parameter-sharing twin of the model), :mod:`.split` (prefix caching on a
``torch.fx`` trace), :mod:`.kernels` (the suffix's fast dropout and channel-dropout + convolution tables),
:mod:`.masks` (exact per-sample dropout masks), :mod:`.attention` (sdpa attention
dropout with masks from the call's stream), :mod:`.memory` (activation metering, buffer reuse).
"""

from mcu.backends.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
