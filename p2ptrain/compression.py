"""What ``--compression`` sends through averaging rounds, and a working 8-bit codec for hivemind 1.1.12.

hivemind's ``Uniform8BitQuantization`` cannot decode under NumPy 2 (``int()`` of a one-element array is an
error there) and quantizes through ``torch.quantize_per_tensor``, which torch deprecates. :class:`Uniform8Bit`
keeps its wire format (``UNIFORM_8BIT``: codebook size, 256 bucket means, one byte per value) and replaces
the broken parts; importing this module registers it as hivemind's ``UNIFORM_8BIT`` codec, in every
process that imports p2ptrain's trainer, so peers decode what peers send.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.compression import Float16Compression, NoCompression, serialization
from hivemind.compression.quantization import Uniform8BitQuantization, average_buckets
from hivemind.proto import runtime_pb2


class Uniform8Bit(Uniform8BitQuantization):
    """256 equal buckets over mean +- 3 standard deviations; each value is sent as its bucket's index
    and decoded as the mean of the values that fell into that bucket."""

    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        tensor = tensor.detach().to(torch.float32).reshape(-1)
        centered = tensor - tensor.mean()
        std = centered.norm() / math.sqrt(max(centered.numel() - 1, 1))
        scale = max(float(self.RANGE_IN_SIGMAS * std / self.n_bins), 1e-30)
        quantized = torch.clamp(torch.round(centered / scale) + self.n_bins // 2, 0, self.n_bins - 1).to(torch.uint8)
        lookup = average_buckets(tensor, quantized, self.n_bins)
        return quantized.numpy(), lookup.numpy().astype(self.codebook_dtype)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()

# gradients (or pseudo-gradients) travel as chosen; parameters (state averaging) never go below 16 bits
GRADIENTS = {"none": NoCompression(), "fp16": Float16Compression(), "8bit": Uniform8Bit()}
STATE = {"none": NoCompression(), "fp16": Float16Compression(), "8bit": Float16Compression()}
