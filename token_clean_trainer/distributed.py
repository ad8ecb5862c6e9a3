"""Collective-safe building blocks for scoring under `accelerate launch` (DDP, FSDP2, ZeRO-2/3).

Under FSDP2 and ZeRO-3 every forward is a collective: a process that runs one forward more than another, or that
raises while the others go on, leaves them waiting forever. Every decision that changes what a process does next
(cache hit or miss, free space, an error) is therefore taken once, on the main process, and broadcast, and an error
raised on one process is raised on all of them with the same message.

A block that itself runs collectives (sharded forwards, the gathers of scored losses) cannot report an error that way:
a process that failed mid-forward and then entered a gather to say so would meet the others inside the forward's
all-gather, and every process would wait until `ddp_timeout`. There the failing process writes its error to the
run's `torch.distributed` store instead, a key every other process polls from a thread while it is inside the block
(see [`FailureWatch`]); a process that reads it prints the failing rank and error and exits at once. The store is
the one the process group was made with (served by the launcher's agent under torchrun, else by rank 0), a plain TCP
channel apart from gloo's and NCCL's own, so the message gets through whichever backend is stuck.
"""

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

# Store keys of a failure inside a block of collectives: its message, and how many processes have read it.
FAILURE_KEY = "token_clean_trainer/failure"
FAILURE_SEEN_KEY = "token_clean_trainer/failure_seen"
# How often a process inside such a block reads the store, and how long a failing process waits for the others to
# read its message before it raises (the store may live in its own process, see `announce_failure`).
POLL_SECONDS = 0.5
ANNOUNCE_WAIT_SECONDS = 10.0


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

    def together(self, fn: Callable[[], T], *, runs_collectives: bool = False) -> T:
        """
        Run `fn` on every process; if it raises on any, raise on all. The failing process re-raises its own error,
        the others a [`CollectiveError`] naming the rank and its message, so no process is left waiting in the next
        collective while another one has stopped.

        With `runs_collectives=True` (`fn` runs collectives itself: sharded forwards, gathers), an error cannot be
        exchanged in a collective; the failing process announces it through the store and raises, and every other
        process prints it and exits with code 1 within about `POLL_SECONDS` (see the module docstring). No process
        leaves the block before every process has finished `fn`.
        """
        if runs_collectives and self.world > 1:
            return self._together_watched(fn)
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

    def _together_watched(self, fn: Callable[[], T]) -> T:
        store = run_store()
        watch = FailureWatch(store, self.rank, self.world) if store is not None else None
        try:
            try:
                result = fn()
            except Exception as error:
                if watch is not None:
                    watch.stop()  # before announcing: this process must not read its own message
                announce_failure(store, self.rank, self.world, error)
                raise
            # Still watched: a process that finished may otherwise wait here for one that fails later.
            self.barrier()
        finally:
            if watch is not None:
                watch.stop()
        return result

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to create a folder), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def run_store():
    """The store the default process group was made with, or None where torch does not expose it."""
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def failure_message(rank: int, world: int, error: BaseException) -> str:
    return f"Process {rank} of {world} failed while running collectives: {type(error).__name__}: {error}"


def announce_failure(store, rank: int, world: int, error: BaseException) -> None:
    """
    Print the failing process's error with its rank and write it to the store for the others (a [`FailureWatch`] on
    each), then wait until they have read it, at most `ANNOUNCE_WAIT_SECONDS`: where rank 0 serves the store, its
    exit would take the message with it.
    """
    message = failure_message(rank, world, error)
    sys.stderr.write(f"[token_clean_trainer] {message}. The other processes stop now.\n")
    sys.stderr.flush()
    if store is None:
        return  # the launcher ends the others when this process exits
    try:
        store.set(FAILURE_KEY, message)
        # Every process counts itself once: the others when they read the message, each failing one here.
        store.add(FAILURE_SEEN_KEY, 1)
        deadline = time.monotonic() + ANNOUNCE_WAIT_SECONDS
        while store.add(FAILURE_SEEN_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception as gone:  # noqa: BLE001 - the launcher ends the others when this process exits
        sys.stderr.write(f"[token_clean_trainer] Could not tell the other processes through the store: {gone}\n")


class FailureWatch:
    """
    While a process is inside a block of collectives: a daemon thread that reads the store every `POLL_SECONDS` and,
    once another process has announced a failure ([`announce_failure`]), prints it and ends this process with exit
    code 1. The main thread may be blocked inside a collective that will never complete, and only an exit ends that
    (an exception cannot reach it). An unreachable store ends the process the same way: the process serving it has
    died.
    """

    def __init__(self, store, rank: int, world: int):
        self.store = store
        self.rank = rank
        self.world = world
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="token_clean_trainer-failure-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_SECONDS):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                message = self.store.get(FAILURE_KEY).decode()
                self.store.add(FAILURE_SEEN_KEY, 1)
            except Exception as error:  # noqa: BLE001 - reported below, then the process ends
                if self._stopped.is_set():
                    return
                message = f"The run's store stopped answering ({type(error).__name__}: {error}): a process has died"
            sys.stderr.write(
                f"[token_clean_trainer] {message}. Process {self.rank} of {self.world} stops too (exit code 1) rather "
                "than wait inside a collective until `ddp_timeout`.\n"
            )
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
            return  # (only where `os._exit` is replaced, in tests)


def decide_on_main(collective: Collective, decide: Callable[[], T]) -> T:
    """`decide()` on the main process only, its result (or its error) on every process."""

    def run() -> Any:
        return decide() if collective.is_main else None

    return collective.broadcast_object(collective.together(run))
