"""The experts of one decoding step on CUDA in two kernels, each expert found through a table of addresses.

    table  int64 [L * E]: the address of expert (l, e)'s buffer (int4-rows layout, offload/rows.py):
           a device slot when the expert is cached, else its pinned host copy, which the kernel reads
           over the bus in place (UVA: a pinned host address is valid on the device).

For T tokens with A chosen experts each (ids [T, A], already offset by l * E; weights [T, A] fp32):

    gate_up   grid (T*A, I/BN): h[t*A + a] = silu(x[t] W1^T) * (x[t] W3^T)      [T*A, I] bf16
    down      grid (T, D/BN):   out[t] = res[t] + sum_a weights[t, a] * (h[t*A + a] W2^T)   [T, D] bf16

Nothing is read by the host: ids, weights and the table stay on the device, so the whole step can be
captured in a CUDA graph and replayed with no host round trip; the host changes what the table points
at (stream-ordered) when it moves an expert into or out of a slot.

Rounding follows the eager reference (offload/kernels.py's products are bf16, SwiGLU in bf16, each
expert's weighted output rounded to bf16 and summed in bf16): sums are taken in fp32 inside a kernel
and rounded at the same points. `self_check` compares both kernels with a dequantized reference once
per device before a run may use them.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernels are CUDA's
    triton = tl = None


def shape_unsupported(dim: int, inter: int, group: int) -> str | None:
    """Why experts of this shape cannot run on the kernels (None: they can)."""
    if group & (group - 1) or not 32 <= group <= 256:
        return f"group size {group}: the table kernels take powers of two from 32 to 256"
    for name, k in (("hidden size", dim), ("intermediate size", inter)):
        if k % 256 or k % group:
            return f"{name} {k} is not a multiple of 256 and of the group size"
    return None


def available(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on device (None: they can)."""
    device = torch.device(device)
    if triton is None:
        return "triton is not installed"
    if device.type != "cuda" and not _interpreted():
        return f"the table kernels run on CUDA ({device.type} given)"
    return None


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _dot_rows(w, sz, rows, k0, xe, xo, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        # sum over input columns k0 .. k0 + BLOCK_K of W[rows, k] x[k] in fp32, a group at a time:
        # sum_k ((q - 8) s + z) x_k = s * sum_k (q - 8) x_k + z * sum_k x_k   (one scale and zero per group)
        c = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns: codes 2c (low nibble) and 2c + 1 (high)
        b = tl.load(w + rows[:, None] * (K // 2) + c[None, :])
        lo = (b & 15).to(tl.float32) - 8.0
        hi = (b >> 4).to(tl.float32) - 8.0
        part = tl.reshape(lo * xe[None, :] + hi * xo[None, :], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2))
        per_group = tl.sum(part, axis=2)  # [BLOCK_N, groups in the block]
        x_group = tl.sum(tl.reshape(xe + xo, (BLOCK_K // GROUP, GROUP // 2)), axis=1)
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        meta = (rows[:, None] * (K // GROUP) + g[None, :]) * 2
        s = tl.load(sz + meta).to(tl.float32)
        z = tl.load(sz + meta + 1).to(tl.float32)
        return tl.sum(per_group * s + z * x_group[None, :], axis=1)

    @triton.jit
    def _gate_up(x_ptr, table_ptr, ids_ptr, h_ptr, I, W_OFF, SZ_OFF, E_BASE,  # noqa: E741
                 K: tl.constexpr, TOPK: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        a = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + a) + E_BASE
        base = tl.load(table_ptr + e).to(tl.pointer_type(tl.uint8))
        w = base + W_OFF
        sz = (base + SZ_OFF).to(tl.pointer_type(tl.bfloat16))
        x = x_ptr + (a // TOPK) * K
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            xe = tl.load(x + 2 * c).to(tl.float32)
            xo = tl.load(x + 2 * c + 1).to(tl.float32)
            acc_g += _dot_rows(w, sz, rows, k0, xe, xo, K, GROUP, BLOCK_N, BLOCK_K)
            acc_u += _dot_rows(w, sz, rows + I, k0, xe, xo, K, GROUP, BLOCK_N, BLOCK_K)
        gate = acc_g.to(tl.bfloat16).to(tl.float32)
        up = acc_u.to(tl.bfloat16).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)
        tl.store(h_ptr + a * I + rows, (act * up).to(tl.bfloat16))

    @triton.jit
    def _down(h_ptr, table_ptr, ids_ptr, wts_ptr, res_ptr, out_ptr, D, W_OFF, SZ_OFF, E_BASE,
              K: tl.constexpr, TOPK: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr):
        t = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.bfloat16)
        for j in tl.static_range(TOPK):
            a = t * TOPK + j
            e = tl.load(ids_ptr + a) + E_BASE
            base = tl.load(table_ptr + e).to(tl.pointer_type(tl.uint8))
            w = base + W_OFF
            sz = (base + SZ_OFF).to(tl.pointer_type(tl.bfloat16))
            h = h_ptr + a * K
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                he = tl.load(h + 2 * c).to(tl.float32)
                ho = tl.load(h + 2 * c + 1).to(tl.float32)
                part += _dot_rows(w, sz, rows, k0, he, ho, K, GROUP, BLOCK_N, BLOCK_K)
            wt = tl.load(wts_ptr + a)
            acc = (acc.to(tl.float32) + (wt * part.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)).to(tl.bfloat16)
        if HAS_RES:
            acc = (tl.load(res_ptr + t * D + rows).to(tl.float32) + acc.to(tl.float32)).to(tl.bfloat16)
        tl.store(out_ptr + t * D + rows, acc)


def _block(n: int, k: int, group: int, programs: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) dividing n and k: rows per program (the largest that still gives about `programs`
    programs, e.g. two per multiprocessor of an H100/H200), input columns per step (whole groups)."""
    fits = [b for b in (32, 16, 8, 4, 2, 1) if n % b == 0]
    bn = next((b for b in fits if n // b >= programs), fits[-1])
    bk = next(b for b in (256, 512, 1024) if k % b == 0 and b % group == 0)
    return bn, bk


class TableMoE:
    """The two kernels for one expert shape: w13 [2I, D] and w2 [D, I] at byte offsets inside an expert buffer."""

    def __init__(self, dim: int, inter: int, group: int, offsets: dict[str, int], top_k: int, programs: int = 264):
        why = shape_unsupported(dim, inter, group)
        if why:
            raise ValueError(why)
        self.d, self.i, self.group, self.top_k = dim, inter, group, top_k
        self.off = offsets  # "w13.w", "w13.sz", "w2.w", "w2.sz" -> byte offset in the expert's buffer
        # one token: gate_up has top_k experts' rows to share out, down only D rows; `programs`: about two
        # per multiprocessor of an H100/H200
        self.blocks_up = _block(inter, dim, group, programs // top_k)
        self.blocks_down = _block(dim, inter, group, programs)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                 e_base: int, h: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        """out [T, D] = residual + MoE(x) (see the module docstring); h [T*A, I] bf16 scratch."""
        t = x.shape[0]
        bn, bk = self.blocks_up
        _gate_up[(t * self.top_k, self.i // bn)](
            x, table, ids, h, self.i, self.off["w13.w"], self.off["w13.sz"], e_base,
            K=self.d, TOPK=self.top_k, GROUP=self.group, BLOCK_N=bn, BLOCK_K=bk)
        bn, bk = self.blocks_down
        _down[(t, self.d // bn)](
            h, table, ids, weights, residual if residual is not None else out, out, self.d,
            self.off["w2.w"], self.off["w2.sz"], e_base,
            K=self.i, TOPK=self.top_k, GROUP=self.group, BLOCK_N=bn, BLOCK_K=bk, HAS_RES=residual is not None)


def reference(x: torch.Tensor, mats: list[tuple], ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What TableMoE computes, with torch ops on dequantized matrices: mats[e] = (W13, W2) bf16."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for a in range(ids.shape[1]):
            w13, w2 = mats[int(ids[t, a])]
            gate, up = (x[t : t + 1].float() @ w13.float().t()).to(torch.bfloat16).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ w2.t()
            y = (y.float().to(torch.bfloat16).float() * weights[t, a]).to(torch.bfloat16)
            out[t] += y[0]
    return out


@functools.cache
def self_check(device: torch.device) -> str | None:
    """Why the kernels do not compute the dequantized reference on device (None: they do)."""
    why = available(device)
    if why:
        return why
    from offload.packing import Layout, views
    from offload.rows import RowsMat, pack_rows_codes, pack_rows_meta, rows_specs

    gen = torch.Generator().manual_seed(4)
    d, i, g, e, top = 256, 256, 64, 3, 2
    layout = Layout.plan(rows_specs("w13", 2 * i, d, g) + rows_specs("w2", d, i, g))
    bufs, mats = [], []
    for _ in range(e):
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        v = views(buf, layout)
        for name, (n, k) in (("w13", (2 * i, d)), ("w2", (d, i))):
            pack_rows_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen).to(device), v[f"{name}.w"])
            pack_rows_meta((torch.rand(n, k // g, generator=gen) * 0.02 + 0.01).to(device),
                           (torch.rand(n, k // g, generator=gen) * 16).to(device), v[f"{name}.sz"])
        scratch = torch.empty(3 * 2 * i * d, dtype=torch.uint8, device=device)
        mats.append(tuple(RowsMat(v[f"{m}.w"], v[f"{m}.sz"], scratch).dequantize().clone() for m in ("w13", "w2")))
        bufs.append(buf)
    table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=device)
    x = torch.randn(2, d, generator=gen).to(device, torch.bfloat16)
    ids = torch.tensor([[2, 0], [1, 2]], device=device)
    weights = torch.tensor([[0.7, 0.3], [0.55, 0.45]], device=device)
    offsets = {en.name: en.offset for en in layout.entries}
    out = torch.empty_like(x)
    h = torch.empty(2 * top, i, dtype=torch.bfloat16, device=device)
    try:
        # few, wide programs in the interpreter (it runs them one by one on the CPU)
        TableMoE(d, i, g, offsets, top, programs=8 if _interpreted() else 264)(x, ids, weights, table, 0, h, out)
    except Exception as exc:  # a compiler or driver failure: the run must not use these kernels
        return f"the table kernels failed on {device} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
    want = reference(x, mats, ids, weights)
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    # Triton's interpreter (tests without a GPU) truncates to bf16 where CUDA rounds to nearest: ~1% more
    if not err < (0.05 if _interpreted() else 0.02):
        return f"the table kernels compute a product {err:.3f} away (relative) from the dequantized reference"
    return None
