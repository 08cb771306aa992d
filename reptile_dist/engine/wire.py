"""A `DeltaSum` on the wire: the one encoding that parameter-server pushes and the all-reduce use.

    vector: delta, then (carried inner state) the sum of the tasks' second-moment estimates,
            in the precision `delta_dtype` asks for (Config.wire_dtype)
    counts: float64 [tasks, loss_sum, accuracy_sum, moment_steps]

The counts stay float64 whatever the vector's precision (a 16-bit task count or loss sum would
round). Pushes travel as numpy arrays, which Ray moves without pickling them (zero-copy out of its
object store, or inside the call's message up to `engine/cluster.py` INLINE_OBJECT_BYTES); bfloat16 has no
numpy dtype, so it travels as its raw 16-bit pattern. The receiver decodes to float64, in which the
parameter server sums; the all-reduce sums the vector in the wire precision itself.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from reptile_dist.reptile import DeltaSum

COUNTS = ("tasks", "loss_sum", "accuracy_sum", "moment_steps")


@dataclass
class WireSum:
    vector: np.ndarray
    counts: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.vector.nbytes + self.counts.nbytes


class DeltaCodec:
    """Encodes and decodes the DeltaSums of one run: its parameter count, whether sums carry the
    inner estimates, and the wire precision."""

    def __init__(self, numel: int, carried: bool, dtype: str = "float64"):
        self.numel = numel
        self.carried = carried
        self.dtype = dtype
        self.torch_dtype = getattr(torch, dtype)

    def vector(self, total: DeltaSum) -> torch.Tensor:
        """The vector in the wire precision. A sum without estimates (a process with no task this
        step) sends zeros in their place, so every sender's vector has the same length."""
        pieces = [total.delta]
        if self.carried:
            pieces.append(total.moment_sum if total.moment_sum is not None
                          else torch.zeros(self.numel, dtype=torch.float64))
        return torch.cat([p.reshape(-1).to(torch.float64) for p in pieces]).to(self.torch_dtype)

    @staticmethod
    def counts(total: DeltaSum) -> torch.Tensor:
        return torch.tensor([total.tasks, total.loss_sum, total.accuracy_sum, total.moment_steps], dtype=torch.float64)

    def from_tensors(self, vector: torch.Tensor, counts: torch.Tensor) -> DeltaSum:
        vector = vector.to(torch.float64)
        tasks, loss_sum, accuracy_sum, moment_steps = counts.to(torch.float64).tolist()
        moment_sum = vector[self.numel:2 * self.numel] if self.carried else None
        return DeltaSum(vector[:self.numel], int(round(tasks)), loss_sum, accuracy_sum, moment_sum, moment_steps)

    def encode(self, total: DeltaSum) -> WireSum:
        vector = self.vector(total)
        if self.dtype == "bfloat16":
            vector = vector.view(torch.int16)
        return WireSum(vector.numpy(), self.counts(total).numpy())

    def decode(self, wire: WireSum) -> DeltaSum:
        """Without a copy where the precision is float64 already: arrays Ray hands over are
        read-only, and nothing writes into a decoded sum (every operation on it makes a new one)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's warning about read-only arrays
            vector = torch.from_numpy(wire.vector)
        if self.dtype == "bfloat16":
            vector = vector.view(torch.bfloat16)
        return self.from_tensors(vector, torch.tensor(wire.counts))
