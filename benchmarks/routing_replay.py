"""Benchmarks only: make a Mixtral model route as a recorded Mixtral-8x7B run did.

    replay = RoutingReplay.from_trace(path)   # ../shared/data/routing/mixtral-8x7b-instruct/*.jsonl
    replay.install(model)                     # prints that the generated text is not the model's

Synthetic weights route almost at random, which understates what a cache, the bus and the CPU see on
real Mixtral. Installed, every MoE block's router still runs (its cost stays in the step), but its
choice is replaced by the trace's: the recorded top-2 ids and their recorded `gating_probs`, which are
the renormalised top-2 weights (they sum to 1), exactly what MoE.route returns. The one hook is
`MoE.replay` (mixtral_lite/model/transformer.py), which both the eager step and the static
(device-routed, CUDA-graph) step call through MoE.route; nothing in mixtral_lite sets it.

Tokens: the trace's tokens are replayed in order from a counter on the model's device (so a CUDA graph
replays the trace too). Row r of a call with N rows takes token counter + r, and the counter moves on by
N after the last layer: a prompt of P tokens takes P consecutive trace tokens, a decoding step of one
row takes the next one. A batch of B decoding rows takes B consecutive tokens of the one recorded
sequence (neighbours, not independent requests). At the end the trace starts over.

Gaps (../shared/data/README.md: the recorder dropped every 0.5/0.5 (token, layer), and token_idx runs
on without it, so where a layer lost a record is unknown): each layer replays its own records in order
(token_idx order; file order for token_pos traces, prompt first) up to the problem's shortest layer, so
every replayed choice is a recorded one, none is guessed; the longer layers' last records are not
replayed (`dropped`). After a gap, a layer runs up to a few tokens ahead of the others.

Not replayed: the eager step's prefetch guess (the next layer's router on this layer's residual) is
still the synthetic model's, so under replay it guesses no better than random routing would.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_traces import records  # noqa: E402

WEIGHTS = "recorded gating_probs (the renormalised top-2 weights, summing to 1)"


class RoutingReplay:
    """A recorded run's choices: ids [L, N, A] and weights [L, N, A] for L layers and N tokens."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, source: str, problem: int,
                 gaps: int = 0, dropped: int = 0):
        self.ids, self.weights = ids.long(), weights.float()
        self.layers, self.n, self.top_k = ids.shape
        self.source, self.problem, self.gaps, self.dropped = source, problem, gaps, dropped
        self.step = torch.zeros(1, dtype=torch.long)  # the next trace token; on the model's device once installed
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows -> (arange, this step's tokens)

    @classmethod
    def from_trace(cls, path: str | Path, problem: int | None = None) -> RoutingReplay:
        """One problem of a routing trace (default: the one with the most tokens on every layer)."""
        by_problem: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in records(str(path)):
            if "gating_probs" not in r or len(r["gating_probs"]) != len(r["experts"]):
                raise SystemExit(f"{path}: problem {r['problem_id']} layer {r['layer']}: a record without "
                                 "gating_probs for each of its experts")
            by_problem[r["problem_id"]][r["layer"]].append(r)
        if problem is None:
            problem = max(by_problem, key=lambda p: min(len(v) for v in by_problem[p].values()))
        if problem not in by_problem:
            raise SystemExit(f"{path}: no problem {problem} (it has {sorted(by_problem)})")
        layers = by_problem[problem]
        if sorted(layers) != list(range(len(layers))):
            raise SystemExit(f"{path}: problem {problem} has records for layers {sorted(layers)}, not 0..L-1")
        seqs = [_in_order(layers[layer]) for layer in range(len(layers))]
        n, longest = min(map(len, seqs)), max(map(len, seqs))
        widths = {len(r["experts"]) for s in seqs for r in s}
        if len(widths) != 1:
            raise SystemExit(f"{path}: records choose {sorted(widths)} experts; replay needs one top-k")
        ids = torch.tensor([[r["experts"] for r in s[:n]] for s in seqs])
        weights = torch.tensor([[r["gating_probs"] for r in s[:n]] for s in seqs])
        return cls(ids, weights, str(path), problem, gaps=sum(longest - len(s) for s in seqs),
                   dropped=sum(len(s) - n for s in seqs))

    def install(self, model, quiet: bool = False) -> RoutingReplay:
        """Route every MoE block of `model` from the trace (an error naming the file if they do not fit)."""
        cfg = model.config
        if not cfg.is_moe:
            raise SystemExit(f"{self.source}: the model is dense; there is no routing to replay")
        for what, have, want in (("layers", self.layers, cfg.num_layers), ("experts per token", self.top_k,
                                                                              cfg.experts_per_tok)):
            if have != want:
                raise SystemExit(f"{self.source}: routing recorded for {have} {what}, the model has {want}; "
                                 "a replay needs the same count")
        if int(self.ids.max()) >= cfg.num_experts:
            raise SystemExit(f"{self.source}: expert id {int(self.ids.max())} recorded, the model has "
                             f"{cfg.num_experts} experts")
        device = model.embed.weight.device
        self.ids, self.weights, self.step = self.ids.to(device), self.weights.to(device), self.step.to(device)
        self._rows.clear()
        for block in model.layers:
            block.moe.replay = partial(self.choice, block.index)
        if not quiet:
            print(f"routing replayed from {self.source} (problem {self.problem}, {self.n} tokens): the experts "
                  "are a recorded Mixtral-8x7B run's choice, so the generated text is not the model's",
                  file=sys.stderr)
        return self

    def choice(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """weights [rows, A] fp32 and ids [rows, A] of this step's trace tokens at `layer`."""
        if rows not in self._rows:
            arange = torch.arange(rows, device=self.step.device)
            self._rows[rows] = (arange, torch.empty_like(arange))
        arange, tokens = self._rows[rows]
        if layer == 0:  # in place, on the device: a CUDA graph replays it
            torch.remainder(self.step + arange, self.n, out=tokens)
        if layer == self.layers - 1:
            torch.remainder(self.step + rows, self.n, out=self.step)
        return self.weights[layer].index_select(0, tokens), self.ids[layer].index_select(0, tokens)

    def summary(self) -> dict:
        return {"trace": self.source, "problem": self.problem, "tokens": self.n, "gaps": self.gaps,
                "dropped": self.dropped, "weights": WEIGHTS}


def uninstall(model) -> None:
    """The model's own routing again."""
    for block in model.layers:
        if block.moe is not None:
            block.moe.replay = None


def _in_order(rows: list[dict]) -> list[dict]:
    """A layer's records in token order: token_idx order, else file order (token_pos traces: prompt first)."""
    return sorted(rows, key=lambda r: r["token_idx"]) if all("token_idx" in r for r in rows) else rows
