"""detectron2's ``launch`` for SPADE's entry points, with bad input reported as in one process.

With ``--num-gpus N > 1`` (or several machines) detectron2.engine.launch runs ``main`` in spawned
workers, and an exception there reaches the parent as torch's ``ProcessRaisedException`` carrying
the worker's whole traceback. Here the worker turns a bad-input error (``BAD_INPUT_ERRORS`` of
:mod:`spade.engine.defaults`) into a :class:`WorkerInputError` holding its one-line message, and
:func:`launch_main` raises that error again in the parent, so ``run_cli`` ends the command with
``<prog>: error: <message>`` and exit status 2 whatever the number of processes (``--debug``: the
worker's traceback, as torch reports it).
"""

import logging
import os
import re
import sys

import torch.distributed as dist
from detectron2.engine import launch
from torch.multiprocessing import ProcessRaisedException

from .defaults import BAD_INPUT_ERRORS, _one_line

__all__ = ["WorkerInputError", "launch_main", "finish_process_group", "exit_worker"]


def finish_process_group(wait: bool = True) -> None:
    """End this worker's process groups while the interpreter is fully alive.

    detectron2's launch returns from a worker without ``destroy_process_group``; GLOO's threads
    may then still hold work when the interpreter is torn down, and the worker dies with SIGABRT
    ("terminate called without an active exception"). ``wait``: first a barrier, so no rank leaves
    while another still talks to it (skip it on an error path, where a peer may never arrive)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def exit_worker() -> None:
    """End a spawned worker that finished its work: its process groups (barrier first), then the
    process itself, after flushing logs and stdio, without the interpreter's teardown.

    Even after ``destroy_process_group`` a GLOO worker intermittently aborts in C++ static
    destruction ("terminate called without an active exception", SIGABRT; 4 of 6 runs of the
    distributed evaluator test on 2 cores), which the parent reports as a failed run although the
    work was done. Nothing is left to clean up at this point, so the worker exits with status 0
    directly. In a single process (no group of several ranks) this only ends the groups."""
    spawned = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    finish_process_group()
    if not spawned:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


class WorkerInputError(ValueError):
    """A bad-input error of a launched ``main``; the message is already one line."""


class _OneLineInputErrors:
    """``main`` wrapped for the workers: bad input becomes a :class:`WorkerInputError`."""

    def __init__(self, main):
        self.main = main

    def __call__(self, args):
        try:
            result = self.main(args)
        except BAD_INPUT_ERRORS as e:
            finish_process_group(wait=False)
            if getattr(args, "debug", False) or isinstance(e, WorkerInputError):
                raise
            raise WorkerInputError(_one_line(e)) from None
        exit_worker()  # returns only in a single process (no spawned workers)
        return result


# the last line of the worker traceback that torch hands to the parent
_WORKER_LINE = re.compile(rf"^{re.escape(__name__)}\.WorkerInputError: (.*)$", re.MULTILINE)


def launch_main(main, args):
    """``main(args)`` through detectron2's launch with ``args.num_gpus`` processes per machine
    (``args.num_machines``, ``args.machine_rank``, ``args.dist_url``); a bad input in any worker
    is a :class:`WorkerInputError` (a ValueError) in this process, with the worker's message."""
    try:
        return launch(
            _OneLineInputErrors(main),
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessRaisedException as e:
        found = _WORKER_LINE.findall(str(e))
        if not found:
            raise
        raise WorkerInputError(found[-1]) from None
