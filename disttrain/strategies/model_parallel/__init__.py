"""``strategy=model_parallel``: the user's model split into stages, over the devices of one process
or as a pipeline over processes on ``torch.distributed.pipelining``, composed with data parallelism.

The parts, each small (docs/model_parallel.md):

* ``options``: the strategy's options, checked against the job before any process group;
* ``placement``: where layers live (the user's module names, resolved and checked);
* ``cost`` and ``autoplace``: ``placement: auto`` by measured cost and a schedule simulation;
* ``stage_module``: this rank's part of the user's model and optimizer, initialised by the user's code;
* ``tracing`` and ``runner``: stages cut by torch's tracing front end, run by torch's schedules;
* ``schedules``: the schedule names, their torch classes, constraints and formulas;
* ``grad_sync``: each stage's gradients averaged over its data-parallel replicas;
* ``stats`` and ``report``: bubble, busy time, per-stage memory, predicted vs measured;
* ``checkpointing``: every rank writes its own stages (DCP), export gathers the whole model;
* ``pipeline`` (several processes) and ``local`` (one process): the two roles;
* ``strategy``: the thin Strategy that holds one of them.
"""

from disttrain.strategies.model_parallel.local import schedule_order
from disttrain.strategies.model_parallel.schedules import SCHEDULES
from disttrain.strategies.model_parallel.strategy import ModelParallelStrategy

__all__ = ["SCHEDULES", "ModelParallelStrategy", "schedule_order"]
