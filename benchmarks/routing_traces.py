"""Routing traces (the jsonl of ../shared/data/routing/mixtral-8x7b-instruct/) as per-layer sequences.

Record: {"problem_id", "layer", "experts": [top-1, top-2], "gating_probs", and "token_idx"
(decode traces) or "token_pos" (prefill-and-decode traces)}.

Gaps (the recorder dropped every (token, layer) whose weights were exactly 0.5/0.5, so some
layers have one or a few records fewer, and token_idx shifts by one after each gap):
  * Each (trace, problem, layer) is replayed on its own, in token order (token_idx, or file
    order for token_pos traces), through its own policy. Policies only ever see their own
    layer's ids, so misalignment between layers changes nothing; a dropped record simply
    is a step that layer's cache never saw (a 1-2% shorter sequence). We do not guess the
    missing experts.
  * Gaps are counted per (problem, layer) as the problem's largest count minus the layer's,
    and printed; hit rate = hits / accesses over the records that exist.
  * Misses per token extrapolate each layer's misses to the problem's full length
    (misses * T / records), summed over layers, so a gap does not look like a saved miss.
Prefill (token_pos traces only): each layer's leading run of increasing token_pos is the
prompt; its records drive the policy and cache token by token as a warm-up but are not
counted (a batched prefill loads whatever it needs once; only decode hit rates matter
here). Decode records follow (token_pos 0 each). Decode-only traces start cold.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Seq:
    key: tuple  # (trace, problem, layer)
    prefill: list[list[int]]
    decode: list[list[int]]


def records(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                r["problem_id"], r["layer"], r["experts"] = int(r["problem_id"]), int(r["layer"]), r["experts"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: not a routing record ({e}); need problem_id, layer, experts") from None
            out.append(r)
    if not out:
        raise SystemExit(f"{path}: no routing records")
    return out


def _split_prefill(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """token_pos traces: the leading strictly increasing run of token_pos is the prompt."""
    last, n = -1, 0
    while n < len(rows) and rows[n]["token_pos"] > last:
        last, n = rows[n]["token_pos"], n + 1
    return rows[:n], rows[n:]


def read_trace(path: str, limit: int | None = None) -> tuple[list[Seq], dict]:
    """Sequences per (problem, layer) and a gap report; `limit` keeps the first decode steps."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records(path):
        groups[(r["problem_id"], r["layer"])].append(r)
    seqs = []
    for (prob, layer), rows in sorted(groups.items()):
        if "token_pos" in rows[0]:
            pre, dec = _split_prefill(rows)  # file order is execution order
        else:
            pre, dec = [], sorted(rows, key=lambda r: r.get("token_idx", 0))  # stable
        ids = [[list(dict.fromkeys(r["experts"])) for r in part] for part in (pre, dec)]
        seqs.append(Seq((path, prob, layer), ids[0], ids[1][:limit] if limit else ids[1]))
    return seqs, _gaps(seqs)


def _gaps(seqs: list[Seq]) -> dict:
    full = problem_lengths(seqs)
    pre_full: dict[int, int] = defaultdict(int)
    for s in seqs:
        pre_full[s.key[1]] = max(pre_full[s.key[1]], len(s.prefill))
    missing = {s.key: full[s.key[1]] - len(s.decode) for s in seqs}
    pre_missing = sum(pre_full[s.key[1]] - len(s.prefill) for s in seqs)
    return {
        "sequences": len(seqs),
        "decode_records": sum(len(s.decode) for s in seqs),
        "decode_gaps": sum(missing.values()),
        "prefill_gaps": pre_missing,
        "aligned_layers": sum(1 for v in missing.values() if v == 0),
        "tokens_per_problem": {str(p): n for p, n in sorted(full.items())},
    }


def problem_lengths(seqs: list[Seq], by_trace: bool = False) -> dict:
    """Decode tokens per problem: its longest layer (keyed by problem, or (trace, problem))."""
    full: dict = defaultdict(int)
    for s in seqs:
        key = s.key[:2] if by_trace else s.key[1]
        full[key] = max(full[key], len(s.decode))
    return full
