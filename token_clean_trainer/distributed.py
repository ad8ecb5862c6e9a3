"""Collective-safe building blocks for scoring under `accelerate launch` (DDP, FSDP2, ZeRO-2/3).

Under FSDP2 and ZeRO-3 every forward is a collective: a process that runs one forward more than another, or that
raises while the others go on, leaves them waiting forever. Every decision that changes what a process does next
(cache hit or miss, free space, an error) is therefore taken once, on the main process, and broadcast, and an error
raised on one process is raised on all of them with the same message.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """Raised on every process when one process failed inside a [`Collective.together`] block."""


class Collective:
    """
    The processes of one run, as `torch.distributed` sees them (one process: every call is local and free).

    Args:
        device (`torch.device`):
            Where tensors go for a collective: the process's accelerator under NCCL, the CPU under gloo.
    """

    def __init__(self, device: torch.device | None = None):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world = torch.distributed.get_world_size() if distributed else 1
        self.rank = torch.distributed.get_rank() if distributed else 0
        if device is None or (distributed and torch.distributed.get_backend() == "gloo"):
            device = torch.device("cpu")
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj: T) -> T:
        """The main process's `obj` on every process (picklable objects; small ones: decisions, lists, messages)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_to_main(self, values: np.ndarray) -> list[np.ndarray] | None:
        """
        Every process's 1-D float32 array, in rank order, on the main process (None elsewhere). Only the main process
        receives them, so the others never hold more than their own part.
        """
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.world == 1:
            return [values]
        local = torch.from_numpy(values).to(self.device)
        size = torch.tensor([local.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        padded = torch.zeros(longest, dtype=torch.float32, device=self.device)
        padded[: local.numel()] = local
        buffers = [torch.empty(longest, dtype=torch.float32, device=self.device) for _ in range(self.world)]
        torch.distributed.gather(padded, buffers if self.is_main else None, dst=0)
        if not self.is_main:
            return None
        return [buffer[:n].cpu().numpy() for buffer, n in zip(buffers, sizes)]

    def broadcast_array(self, array: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        """The main process's 1-D array on every process (the others pass None)."""
        if self.world == 1:
            return np.asarray(array, dtype=dtype)
        size = self.broadcast_object(int(array.size) if self.is_main else None)
        torch_dtype = {
            np.dtype(np.float32): torch.float32,
            np.dtype(np.uint8): torch.uint8,
            np.dtype(np.int64): torch.int64,
        }[np.dtype(dtype)]
        if self.is_main:
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(self.device)
        else:
            tensor = torch.empty(size, dtype=torch_dtype, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return tensor.cpu().numpy()

    def broadcast_bools(self, mask: np.ndarray | None) -> np.ndarray:
        """A flat bool array from the main process on every process, sent packed (one bit per entry)."""
        size = self.broadcast_object(int(mask.size) if self.is_main else None)
        packed = self.broadcast_array(np.packbits(mask) if self.is_main else None, np.uint8)
        return np.unpackbits(packed, count=size).view(bool)  # 0/1 bytes: a bool view, no second copy

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def together(self, fn: Callable[[], T]) -> T:
        """
        Run `fn` on every process; if it raises on any, raise on all. The failing process re-raises its own error,
        the others a [`CollectiveError`] naming the rank and its message, so no process is left waiting in the next
        collective while another one has stopped.
        """
        error: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every process
            error = caught
        if self.world == 1:
            if error is not None:
                raise error
            return result
        messages = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message]
        if failed:
            rank, message = failed[0]
            raise CollectiveError(f"Process {rank} of {self.world} failed, so every process stops: {message}")
        return result

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to create a folder), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def decide_on_main(collective: Collective, decide: Callable[[], T]) -> T:
    """`decide()` on the main process only, its result (or its error) on every process."""

    def run() -> Any:
        return decide() if collective.is_main else None

    return collective.broadcast_object(collective.together(run))
