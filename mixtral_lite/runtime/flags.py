"""The expert-offloading flags of `generate`, defined without importing torch (fast --help)."""

from __future__ import annotations

import argparse

from offload.miss_policy import MISS_POLICIES
from offload.policy import POLICIES, make_policy

from ..cli.front_door import POSITIVE, positive_float


def live_policies() -> list[str]:
    """Policies a live cache can run (replay-only ones, like belady, need the future and refuse)."""
    names = []
    for name in sorted(POLICIES):
        try:
            make_policy(name, 2, 1)
        except (ValueError, TypeError):
            continue
        names.append(name)
    return names


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading")
    g.add_argument("--experts-per-layer", type=POSITIVE, metavar="K",
                   help="device slots per layer for experts (default: all, i.e. no offloading; on CUDA the "
                        "shipped model uses 4); fewer than the model's experts turns offloading on")
    g.add_argument("--store", choices=["ram", "mmap"],
                   help="host home of the experts: ram (loaded once, pinned on CUDA) or mmap (read in place)")
    g.add_argument("--prefetch", choices=["off", "next"], default="next",
                   help="load the next layer's guessed experts while this layer computes")
    g.add_argument("--device-memory", type=positive_float, metavar="GB",
                   help="device budget in GiB; the expert slots get what dense weights, KV cache and "
                        "activations leave (instead of --experts-per-layer)")
    g.add_argument("--cache-policy", choices=live_policies(), default="lru", help="expert eviction policy")
    g.add_argument("--miss-policy", choices=MISS_POLICIES,
                   help="where a missed expert runs: copied into a slot (copy), on the CPU from the host store "
                        "(cpu), or per layer whichever ends the layer sooner by a cost model measured at start-up "
                        "(auto; the default on CUDA; on the CPU device copy)")
    g.add_argument("--cpu-threads", type=POSITIVE, metavar="N",
                   help="threads for the experts run on the host while the GPU computes (CUDA; on the CPU "
                        "device -t sets them)")
