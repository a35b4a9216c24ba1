"""This process's place among the processes `accelerate launch` (or torchrun) started: one process otherwise.

    with Processes() as procs:
        mine = procs.share(items)          # this process's part (accelerate's split_between_processes)
        ...                                # work on procs.device
        everything = procs.gather(results) # every process's results, on every process

On a machine without CUDA the processes join a gloo group on the CPU (`PartialState(cpu=True)`); without
that flag each would silently run alone as rank 0 of 1. Leaving the block waits for every process and
ends the process group that it started (a barrier first: gloo can abort at exit without one).
"""

from __future__ import annotations

import os
from datetime import timedelta

WAIT = timedelta(days=7)  # how long a finished process waits for the others (gloo's default is 30 minutes)


def launched_processes() -> int:
    """How many processes the launcher started (1 when not launched by accelerate or torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class Processes:
    """See the module's docstring. `rank`, `count`, `is_main`, and `device` (None: each job chooses)."""

    def __init__(self):
        self.state = None
        self.rank, self.count, self.device = 0, 1, None
        self._owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> "Processes":
        if launched_processes() > 1:
            import torch
            import torch.distributed as dist
            from accelerate import PartialState

            self._owns_group = not dist.is_initialized()
            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
            self.rank, self.count = self.state.process_index, self.state.num_processes
            self.device = str(self.state.device)
        return self

    def __exit__(self, kind, error, trace):
        if self.state is None:
            return
        import torch.distributed as dist

        if kind is None:
            self.state.wait_for_everyone()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def wait(self) -> None:
        """Wait until every process gets here (what the main process wrote is then there for all)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, items: list) -> list:
        """This process's contiguous part of `items`: every item goes to exactly one process."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as part:
            return list(part)

    def gather(self, items: list) -> list:
        """The lists of every process, joined in rank order, on every process."""
        if self.state is None:
            return list(items)
        import torch.distributed as dist

        parts: list = [None] * self.count
        dist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]


def launch(processes: int, arguments: list[str]) -> int:
    """Run `python -m morphkit <arguments>` in `processes` processes through `accelerate launch`; its exit status.

    On CUDA one process per GPU (at most as many as there are); without CUDA, processes on the CPU joined
    by gloo. For several machines, or a saved accelerate config, call `accelerate launch` yourself.
    """
    import socket
    import subprocess
    import sys

    import torch

    from .errors import ConfigError

    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"--processes must be a whole number, 1 or more; got {processes!r}.")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and processes > gpus:
        raise ConfigError(f"--processes {processes} asks for more processes than this machine's {gpus} GPUs; give "
                          f"at most {gpus}, or launch on several machines with accelerate launch --num_machines.")
    with socket.socket() as s:  # a free port, so that two batches on one machine do not meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "morphkit", *arguments]
    env = dict(os.environ, **({} if gpus else {"ACCELERATE_USE_CPU": "true"}))
    return subprocess.run(command, env=env).returncode
