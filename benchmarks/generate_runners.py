"""The measured side of bench_generate.py: one configuration, run in its own process.

`child(job)` loads the model a job describes (mixtral-lite resident / offloaded / naive
streamer, or transformers), warms up once, times `repeats` generations and returns the raw
timestamps' summaries, the generated ids and the offload counters over the timed runs.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

PROMPT_LEN = 64


def source_stamp(src) -> str:
    """12 hex digits naming a checkpoint's current files (names, sizes, mtimes).

    Artefacts derived from a checkpoint (its GGUF, its quantized stores) carry this in their
    file names, so a checkpoint rewritten in place (a training run's later snapshot) is never
    measured through an artefact of its older weights.
    """
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for f in sorted(Path(src).glob("*.safetensors")) + [Path(src) / "config.json"]:
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]


def prompts(count: int, vocab: int) -> list[list[int]]:
    """Deterministic prompts of PROMPT_LEN ids (BOS + a different stride each)."""
    return [[1] + [(1000 + 37 * (i + 1) * j) % (vocab - 3) + 3 for j in range(PROMPT_LEN - 1)] for i in range(count)]


def default_dtype(device):
    """fp32 on the CPU (its bf16 matmuls are slow), bf16 on CUDA (what users run; fp32 rows would say
    nothing about a GPU, and hid the naive streamer's mixed-dtype index_add_)."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class NaiveStreamer:
    """The baseline with no cache and no prefetch: each chosen expert is copied, then computed.

    Built from offload's own store, transfer and codec, so only the caching differs.
    """

    wants_guess = False

    def __init__(self, host, codec, expert_fn, device, num_experts: int):
        import torch

        from offload.codec import slot_layout
        from offload.packing import views
        from offload.transfer import make_transfer

        self.host, self.codec, self.fn = host, codec, expert_fn
        self.transfer = make_transfer(device, num_experts, host.layout.nbytes)
        layout = slot_layout(codec)  # what a slot holds (the engine's rule)
        self.converting = layout != host.layout
        self.bufs = [torch.empty(layout.nbytes, dtype=torch.uint8, device=device) for _ in range(num_experts)]
        self.views = [views(b, layout) for b in self.bufs]
        self.tokens = self.loads = 0

    def run(self, layer, x, ids, weights, next_guess=None):
        # x [T, D]; ids, weights [T, A]
        import torch

        from offload.engine import group_by_expert, index_tensors, load_expert

        out = torch.zeros_like(x)
        groups = group_by_expert(ids.tolist())
        index = index_tensors(groups, x.device)  # one pinned async copy, not two syncs per expert
        for slot, e in enumerate(groups):
            load_expert(self.transfer, self.host, self.codec, self.converting, layer, e, self.bufs[slot],
                        self.views[slot], slot)  # releases the expert's pages once read
            self.transfer.wait(slot)
            t, c = index[e]
            y = self.fn(x[t], *self.codec.decode(self.views[slot]))
            self.transfer.release(slot)
            # the fp32 product cast to x's dtype before it is added (index_add_ refuses mixed dtypes)
            out.index_add_(0, t, (weights[t, c].unsqueeze(1) * y).to(x.dtype))
            self.loads += 1
        self.tokens += x.shape[0] if layer == 0 else 0
        return out

    def stats(self) -> dict:
        return {"device_expert_bytes": sum(b.numel() for b in self.bufs)}  # read by runstats.device_bytes

    def counters(self) -> dict:
        return {
            "hits": 0,
            "misses": self.loads,
            "bytes": self.transfer.bytes_copied,
            "stall_s": self.transfer.stall_seconds(),
            "tokens": self.tokens,
        }


def _engine_counters(provider) -> dict:
    eng = provider.engine
    p = eng.prefetcher
    return {
        "hits": eng.counters.hits,
        "misses": eng.counters.misses,
        "bytes": eng.transfer.bytes_copied,
        "stall_s": eng.transfer.stall_seconds(),
        "tokens": eng.counters.tokens,
        "recall_hits": p.recall_hits,
        "recall_total": p.recall_total,
        "prefetch_issued": p.issued,
        "prefetch_used": p.used,
    }


def build_runner(job: dict):
    """(run(prompt, n) -> (timestamps, ids), counters() -> dict | None, model) for one configuration."""
    import torch

    from mixtral_lite.generation.decode import generate_stream
    from mixtral_lite.runtime.load import load_model
    from mixtral_lite.runtime.offloading import make_factory, open_experts

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"]) if job.get("dtype") else default_dtype(device)
    if job["kind"] == "transformers":
        return _transformers_runner(job, device, dtype)
    if job["kind"] == "llama.cpp":
        return _llama_runner(job)
    factory = None
    if job["kind"] == "offload":
        factory = make_factory(slots=job["k"], store=job["store"], prefetch=job["prefetch"], policy=job["policy"])
    elif job["kind"] == "naive":
        from mixtral_lite.model.experts import expert_function

        def factory(cfg, ckpt, dev, dt):
            host, codec = open_experts(cfg, ckpt, job["store"], torch.device(dev), dt)
            return NaiveStreamer(host, codec, expert_function(codec), dev, cfg.num_experts)

    model = load_model(job["model"], device=device, dtype=dtype, experts=factory)
    window = model.config.sliding_window or job["window"]

    def run(prompt: list[int], n: int):
        ts, ids = [time.perf_counter()], []
        for tok in generate_stream(model, [prompt], n, window=window, temperature=0.0):
            ids.append(int(tok[0]))  # the host sync a user's loop has too
            ts.append(time.perf_counter())
        return ts, ids

    counters = None
    if isinstance(model.experts, NaiveStreamer):
        counters = model.experts.counters
    elif hasattr(model.experts, "engine"):
        counters = lambda: _engine_counters(model.experts)  # noqa: E731
    return run, counters, model


def _transformers_runner(job: dict, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).to(device).eval()
    for param in model.parameters():  # out of the mmapped file into ordinary memory, as ours are
        param.data = param.data.clone()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.ts, self.ids, self.first = [], [], True

        def put(self, value):
            if self.first:  # generate() first puts the prompt itself
                self.first = False
                return
            self.ids.append(int(value.reshape(-1)[0]))
            self.ts.append(time.perf_counter())

        def end(self):
            pass

    def run(prompt: list[int], n: int):
        x = torch.tensor([prompt], device=device)
        s = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                streamer=s,
            )
        return [t0, *s.ts], s.ids

    return run, None, model


def _llama_runner(job: dict):
    """llama.cpp (llama-cpp-python) on a GGUF of the same weights (benchmarks/gguf_export.py, f32)."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from llama_cpp import Llama

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_export import export

    src = Path(job["model"])
    workdir = Path(job.get("workdir") or Path(os.environ.get("TMPDIR", "/tmp")) / "mixtral-lite-bench")
    gguf = workdir / f"{src.name}-{source_stamp(src)}-f32.gguf"
    if not gguf.is_file():
        export(src, gguf, "f32")
    f32 = 0  # GGML_TYPE_F32: an fp32 KV cache, like ours
    llm = Llama(
        model_path=str(gguf),
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_ctx=PROMPT_LEN + job["tokens"] + 8,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )

    def run(prompt: list[int], n: int):
        llm.reset()
        ts, ids = [time.perf_counter()], []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            ids.append(int(tok))
            ts.append(time.perf_counter())
            if len(ids) == n:
                break
        return ts, ids

    return run, None, SimpleNamespace(config=SimpleNamespace(vocab_size=llm.n_vocab()), parameters=lambda: [])


def _timings(ts: list[float]) -> dict:
    lat = [b - a for a, b in zip(ts[1:-1], ts[2:], strict=True)]  # per decoded token, after the first
    q = statistics.quantiles(lat, n=10) if len(lat) >= 2 else lat * 9
    return {
        "ttft_s": ts[1] - ts[0],
        "decode_tokens_per_s": len(lat) / (ts[-1] - ts[1]) if lat else 0.0,
        "p50_s": statistics.median(lat) if lat else 0.0,
        "p90_s": q[8] if lat else 0.0,
        "total_s": ts[-1] - ts[0],
    }


def child(job: dict) -> dict:
    """One configuration in this process: load, warm up, time the runs."""
    import torch

    from mixtral_lite.model.kv_cache import kv_cache_bytes
    from mixtral_lite.runtime.runstats import device_bytes, peak_rss_bytes

    torch.set_num_threads(job["threads"])
    if job["kind"] == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return {**job, "skipped": "llama-cpp-python is not importable"}
    t0 = time.perf_counter()
    run, counters, model = build_runner(job)
    load_s = time.perf_counter() - t0
    ps = prompts(job["repeats"] + 1, model.config.vocab_size)
    run(ps[0], job["tokens"])  # warm-up
    before = counters() if counters else None
    timed = [run(p, job["tokens"]) for p in ps[1:]]
    delta = {k: v - before[k] for k, v in counters().items()} if counters else None
    device = torch.device(job["device"])
    if device.type == "cuda":
        dev = torch.cuda.max_memory_allocated(device)
    elif job["kind"] == "transformers":
        dev = sum(p.numel() * p.element_size() for p in model.parameters())  # + its KV cache, not counted
    elif job["kind"] == "llama.cpp":
        dev = None  # llama.cpp's own allocations: not visible from here
    else:
        c = model.config
        dev = device_bytes(model, kv_cache_bytes(c, job["window"], model.embed.weight.dtype), device)
    return {
        **job,
        "load_s": load_s,
        "runs": [_timings(ts) for ts, _ in timed],
        "ids": [i for _, i in timed],
        "peak_rss_bytes": peak_rss_bytes(),
        "device_bytes": dev,
        "device_measured": device.type == "cuda",
        "counters": delta,
        "loadavg_1m": os.getloadavg()[0],  # the CPU is shared: how busy it was
    }
