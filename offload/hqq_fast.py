"""hqq's half-quadratic optimiser (its default, `optimize_weights_proximal_legacy`), run in cache-sized chunks.

hqq runs each of its up to 20 iterations over the whole matrix: at Mixtral's 14336x4096 every pass
streams ~10 temporaries of 235 MB through memory, 26-98 s per matrix on a small CPU. With groups along
one axis (axis=1: a group is g consecutive weights of a row) the groups are independent, so the same
iterations can run on `chunk` groups at a time that stay in the L2 cache. The one thing that couples
groups in hqq is its early stop (it stops when the MEAN error over the whole matrix stops falling); here
each chunk stops on its own mean error, which can only keep an iteration hqq's global test would have
thrown away for that chunk. With `chunk` >= all groups the arithmetic is hqq's, step for step.

`iters` caps the iterations (hqq: 20); fewer trade quality for time (benchmarks/quant_speed.py).
"""

from __future__ import annotations

import torch

LP_NORM, BETA = 0.7, 10.0  # hqq's defaults for its proximal step
DEFAULT_CHUNK = 4096  # groups per chunk: 4096 x 64 float32 = 1 MiB, a few such temporaries fit in L2


def _shrink(x: torch.Tensor) -> torch.Tensor:
    """hqq's shrink_lp_op: sign(x) * relu(|x| - |x|^(p-1) / beta), in place on |x|."""
    out = x.abs()
    out.sub_(out.pow(LP_NORM - 1).mul_(1.0 / BETA)).clamp_min_(0.0)
    return out.mul_(torch.sign(x))


def _optimise_chunk(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_v: int, iters: int) -> torch.Tensor:
    """hqq's loop on one chunk: w [c, g], scale/zero [c, 1] (hqq's inverted scale: q = w * scale + zero)."""
    best = float("inf")
    for _ in range(iters):
        wq = (w * scale + zero).round_().clamp_(0, max_v)
        wr = (wq - zero) / scale
        err = float((w - wr).abs_().mean())
        zero = torch.mean(wq - (w - _shrink(w - wr)) * scale, dim=1, keepdim=True)
        if err < best:
            best = err
        else:
            break  # as hqq: the zero of the step that did not improve is kept
    return zero


@torch.inference_mode()
def hqq_axis1(w: torch.Tensor, bits: int, group_size: int, round_zero: bool, iters: int = 20,
              chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [M, 1] of W's groups (axis 1), scale NOT inverted: W ~ (q - zero) * scale, as hqq returns."""
    wg = w.float().reshape(-1, group_size)  # [M, g]
    max_v = 2**bits - 1
    lo, hi = torch.aminmax(wg, dim=1, keepdim=True)
    denom = hi - lo
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), max_v / denom).clamp_(max=2e4)  # hqq's init
    zero = -lo * inv
    if round_zero:
        zero = zero.round()
    out = torch.empty_like(zero)
    for r in range(0, wg.shape[0], chunk):
        out[r : r + chunk] = _optimise_chunk(wg[r : r + chunk], inv[r : r + chunk], zero[r : r + chunk], max_v, iters)
    return 1.0 / inv, out
