"""Where the stages run: one placement-group bundle per GPU, one stage actor per bundle.

``PACK`` (the default) puts all bundles on as few nodes as possible: on one six-GPU node every
stage shares the node's host memory and activations cross between stages through the node's
shared-memory object store. When no node has enough GPUs, ``PACK`` lets the group span nodes
(consecutive stages stay together where they fit); the activations of each micro-batch then cross
the network once per node boundary per iteration (``bench/results/scaling`` gives the bytes).
``STRICT_PACK`` refuses to span nodes; ``SPREAD`` puts stages on different nodes on purpose.
"""

from __future__ import annotations

import logging
import uuid

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


class PlacementError(RuntimeError):
    pass


def stage_placement_group(gpus: int, strategy: str = "PACK", timeout_s: float = 60.0) -> PlacementGroup:
    """Reserve ``gpus`` one-GPU bundles, or say clearly why they cannot be had."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: the pipeline needs at least one GPU")
    have = ray.cluster_resources().get("GPU", 0)
    if have < gpus:
        raise PlacementError(
            f"the pipeline asks for {gpus} GPUs but the Ray cluster has {have:g}; start Ray with more "
            "(on a CPU machine: declared GPUs, e.g. `ray start --head --num-gpus N`) or lower --gpus"
        )
    pg = placement_group([{"GPU": 1}] * gpus, strategy=strategy, name=f"expertmap-stages-{uuid.uuid4().hex[:8]}")
    if not pg.wait(timeout_s):
        remove_placement_group(pg)
        raise PlacementError(
            f"could not place {gpus} one-GPU bundles with strategy {strategy} within {timeout_s:.0f} s "
            "(are the GPUs held by another application?)"
        )
    return pg


def bundle_strategy(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def bundle_nodes(pg: PlacementGroup) -> list[str]:
    """The node id of each bundle (after ``wait``)."""
    table = ray.util.placement_group_table(pg)
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]
