"""How many processes train one LoRA, and how they agree: the one piece of the training loop
that differs between a single process and data-parallel training under ``accelerate launch``.

:class:`SingleProcess` is what the tab, the API and a plain headless run use: no accelerate,
nothing shared. Inside A1111 it must stay so: accelerate's ``AcceleratorState`` is one per
process, and accelerate 0.21.0 refuses a second ``Accelerator`` with another
``mixed_precision`` ("AcceleratorState has already been initialized and cannot be changed"),
so an Accelerator made by a run, or by another extension, would break the next one.

:class:`DataParallel` is accelerate's own machinery, one process per device: the adapters' and
the pivotal embedding's parameters are put under ``torch.nn.parallel.DistributedDataParallel``
by ``Accelerator.prepare``, which averages their gradients in ``backward`` (``no_sync`` for the
micro-batches before a step's last); losses and the stop decision are averaged / summed with
``Accelerator.reduce``. Every process draws the same data and noise for the whole global
micro-batch (``batch_size`` × processes samples) and trains on its own share of it, so the
run sees the samples, latents' noise and timesteps of one process at that batch size.
Precision stays the loop's (the config's ``precision``): the Accelerator runs with
``mixed_precision="no"`` whatever ``accelerate launch`` was told.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, Optional

import torch


class SingleProcess:
    """One process: the loop's own arithmetic, nothing shared."""

    num_processes = 1
    process_index = 0
    is_main = True
    device: Optional[torch.device] = None  # the model's own device

    def prepare(self, parameters: list[torch.nn.Parameter]) -> None:
        """Take the trainable parameters (adapters, pivotal embedding) before the first step."""

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One micro-batch's loss, ``compute()``, run where gradients get averaged."""
        return compute()

    def accumulating(self, last: bool) -> ContextManager:
        """Context of a micro-batch's forward and backward; ``last``: the step's last one,
        after whose backward the gradients are those of the whole step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the processes."""
        return value

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process (all processes get the same answer)."""
        return flag

    def wait(self) -> None:
        """Until every process is here."""

    def close(self) -> None:
        """Release what the processes share (the process group)."""


class _Trainable(torch.nn.Module):
    """The trainable parameters as one module for DDP. They stay where they are in the model;
    ``forward`` runs the loss computation that uses them, so DDP sees each forward and
    averages the gradients those parameters get in the backward after it."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        super().__init__()
        self.trained = torch.nn.ParameterList(parameters)

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


class DataParallel(SingleProcess):
    """One of ``accelerate launch``'s processes (see the module doc)."""

    def __init__(self) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        # find_unused_parameters: a micro-batch may leave some trainable parameter unused
        # (a pivotal vector whose trigger a tag dropout removed); DDP then averages a zero.
        self.accelerator = Accelerator(
            mixed_precision="no", kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self._module: Optional[torch.nn.Module] = None

    def prepare(self, parameters: list[torch.nn.Parameter]) -> None:
        self._module = self.accelerator.prepare(_Trainable(parameters))

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._module(compute)

    def accumulating(self, last: bool) -> ContextManager:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self._module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # gradient_accumulation_steps is 1: the loop divides

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.to(self.device).reshape(1), reduction="mean")[0]

    def any(self, flag: bool) -> bool:
        votes = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(votes, reduction="sum").item() > 0)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` (or torchrun)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return False


def for_this_process() -> SingleProcess:
    """:class:`DataParallel` when launched as one of several processes, else :class:`SingleProcess`."""
    return DataParallel() if launched() else SingleProcess()
