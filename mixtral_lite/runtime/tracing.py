"""`generate --trace-routing FILE`: record every (token, layer) routing decision as jsonl.

The schema is the one of the recorded Mixtral-8x7B traces in the shared data (and what
benchmarks/replay_routing.py reads), one object per line:

    {"dataset": "mixtral-lite", "problem_id": 0, "layer": 3, "token_pos": 0, "token_idx": 17,
     "experts": [5, 2], "gating_probs": [0.71, 0.29], "next_guess": [5, 1]}

token_pos is the token's position in its forward batch (0..P-1 for a prompt of P tokens,
then 0 for every decode step); token_idx counts decode steps and is absent on prompt
records; next_guess is the prefetcher's guess for layer + 1 (absent on the last layer).
Nothing is lost: unlike the shared traces, no record is ever dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class RoutingTracer:
    """Wraps an ExpertProvider and writes its routing to a jsonl file (atomically, on close)."""

    wants_guess = True  # the guess is part of the record

    def __init__(self, inner, path: str | Path, num_layers: int, dataset: str = "mixtral-lite",
                 problem_id: int = 0):
        self.inner, self.path, self.num_layers = inner, Path(path), num_layers
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "w")  # noqa: SIM115  (closed by close())
        self._base = {"dataset": dataset, "problem_id": problem_id}
        self._decode_steps = 0
        self._prefilled = False  # the first forward is the prompt; later 1-token forwards are decode steps

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            next_guess: torch.Tensor | None) -> torch.Tensor:
        ids_h, w_h = ids.tolist(), weights.tolist()  # a second host read: tracing only
        guess_h = next_guess.tolist() if next_guess is not None else None
        decode = len(ids_h) == 1 and self._prefilled
        for t, (row, w) in enumerate(zip(ids_h, w_h, strict=True)):
            rec = {**self._base, "layer": layer, "token_pos": t, "experts": row,
                   "gating_probs": [round(v, 6) for v in w]}
            if decode:
                rec["token_idx"] = self._decode_steps
            if guess_h is not None:
                rec["next_guess"] = guess_h[t]
            self._file.write(json.dumps(rec) + "\n")
        if layer == self.num_layers - 1:
            self._decode_steps += decode
            self._prefilled = True
        inner_guess = next_guess if getattr(self.inner, "wants_guess", False) else None
        return self.inner.run(layer, x, ids, weights, inner_guess)

    def stats(self) -> dict:
        return self.inner.stats()

    def close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)


def trace_model(model, path: str | Path) -> RoutingTracer:
    """Install a tracer on a MoE model's experts; call .close() when generation ends."""
    if model.experts is None:
        raise SystemExit("error: --trace-routing: the model is dense (no routing to record)")
    tracer = RoutingTracer(model.experts, path, model.config.num_layers)
    model.experts = tracer
    return tracer
