"""Hugging Face Mixtral checkpoint -> quantized store that `generate -m DST` runs directly.

    python tools/quantize_experts.py SRC DST --bits 3 --group-size 128 [--attn-bits 4] [--resume]

Experts are quantized one at a time with hqq's half-quadratic optimiser (offload/quant.py)
and streamed into safetensors shards of about --shard-mb MB: peak memory is one expert's
source tensors plus its packed bytes, never the checkpoint. Every packed expert has the
same size, so a shard's header is known up front and is written first, then the experts.

Crash safety: files are written under temporary names (*.partial) and renamed when
complete; a journal (.quantize-journal.jsonl) records each expert once its bytes are
flushed; manifest.json is written last, atomically, and only it makes DST a store.
`--resume` checks the journal's settings and source identity (files' sizes and mtimes), truncates the partial shard
after the last journaled expert (checking the kept experts' crc32) and continues. Output is
deterministic: an interrupted then resumed run gives the same bytes as an uninterrupted one.

Dense tensors (embeddings, norms, routers, lm_head, and attention unless --attn-bits < 16)
are copied in their source dtype, bytes unchanged (bf16 for the real Mixtral).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is a folder of scripts, not a package
from quantize_checks import check_flags, store_differences  # noqa: E402
from store_writing import Journal, Progress, StreamWriter, atomic_write  # noqa: E402

from mixtral_lite.checkpoint import INDEX, SINGLE, Checkpoint, CheckpointError, expert_name, shard_map
from mixtral_lite.qstore import DENSE, FORMAT, MANIFEST, VERSION, expert_matrices, expert_tensor
from offload.packing import pack_into
from offload.quant import QuantSpec, bits_per_weight, expert_layout, layout_to_dict, quantize_expert

JOURNAL = ".quantize-journal.jsonl"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_GROUP = {2: 32, 3: 128, 4: 64, 8: 128}  # <= 3.0, <= 3.5, 4.27, 8.25 bits/weight with 8-bit meta
ST_TAG = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}


class QuantizeError(ValueError):
    """Bad input to the quantizer; the message names the flag, file or tensor."""


class InjectedFailure(RuntimeError):
    """Raised by `convert(fail_after=N)`: simulates a run killed after N experts (tests)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_identity(src: Path) -> dict:
    """Config hash + index (or single-file header) hash + file sizes: cheap, changes with the weights' layout."""
    files = sorted(set(shard_map(src).values()))
    if (src / INDEX).is_file():
        listing = (src / INDEX).read_bytes()
    else:
        with open(src / SINGLE, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            listing = f.read(n)
    return {"config_sha256": _sha256((src / "config.json").read_bytes()), "listing_sha256": _sha256(listing),
            "files": {f.name: f.stat().st_size for f in files}}


class Converter:
    """One quantization run (fresh or resumed) of SRC into DST."""

    def __init__(self, src: Path, dst: Path, spec: QuantSpec, attn_spec: QuantSpec | None, shard_bytes: int,
                 device: str, progress: bool = True):
        self.src, self.dst, self.spec, self.attn_spec, self.device = src, dst, spec, attn_spec, device
        self.ckpt = Checkpoint(src)  # validates every tensor's presence and shape against config.json
        self.cfg = self.ckpt.config
        if not self.cfg.is_moe:
            raise QuantizeError(f"{src / 'config.json'}: not a Mixtral (no experts to quantize)")
        self.matrices = expert_matrices(self.cfg)
        try:
            self.layout = expert_layout(self.matrices, spec)
        except ValueError as e:
            raise QuantizeError(f"--bits {spec.bits} --group-size {spec.group_size}: experts: {e}") from None
        self.attn_layouts = self._attn_layouts()
        self.total = self.cfg.num_layers * self.cfg.num_experts
        self.per_shard = max(1, shard_bytes // self.layout.nbytes)
        self.num_shards = -(-self.total // self.per_shard)
        self.journal = Journal(dst / JOURNAL)
        self.progress = progress
        self._handles: dict[Path, object] = {}
        self.head = {"settings": {"experts": spec.to_dict(), "attention": attn_spec and attn_spec.to_dict(),
                                  "shard_bytes": shard_bytes, "device": torch.device(device).type},
                     "source": source_identity(src),
                     # the journal only: a source rewritten in place (same shapes, new weights) must not
                     # be resumed into a half-written store of its older weights
                     "source_mtime_ns": {f.name: f.stat().st_mtime_ns for f in set(shard_map(src).values())}}

    def _attn_layouts(self) -> dict[str, object]:
        if self.attn_spec is None:
            return {}
        out = {}
        for name in self.ckpt.names():
            if name.endswith(tuple(f"self_attn.{p}.weight" for p in ATTN)):
                shape = self.ckpt.shape(name)
                try:
                    out["x".join(map(str, shape))] = expert_layout({"w": shape}, self.attn_spec)
                except ValueError as e:
                    raise QuantizeError(f"--attn-bits {self.attn_spec.bits} --attn-group-size "
                                        f"{self.attn_spec.group_size}: tensor {name!r}: {e}") from None
        return out

    def _src(self, name: str):
        """safe_open handle of the source file holding `name` (opened once per file)."""
        file = self.ckpt.file_of(name)
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def shard_name(self, i: int) -> str:
        return f"experts-{i + 1:05d}-of-{self.num_shards:05d}.safetensors"

    # ---- dense ---------------------------------------------------------------------------
    def _dense_plan(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        plan = []
        for name in self.ckpt.names():
            if ".experts." in name:
                continue
            key = "x".join(map(str, self.ckpt.shape(name)))
            if key in self.attn_layouts and ".self_attn." in name:
                n = self.attn_layouts[key].nbytes
                plan.append((name, "U8", (n,), n))
                continue
            sl = self._src(name).get_slice(name)
            tag, shape = sl.get_dtype(), tuple(sl.get_shape())
            if tag not in ("F32", "F16", "BF16"):
                raise QuantizeError(f"{self.ckpt.file_of(name)}: tensor {name!r} has dtype {tag}, expected a float")
            size = {"F32": 4, "F16": 2, "BF16": 2}[tag]
            plan.append((name, tag, shape, size * torch.Size(shape).numel()))
        return plan

    def write_dense(self) -> None:
        plan = self._dense_plan()
        w = StreamWriter(self.dst / (DENSE + ".partial"), plan)
        for name, tag, _, _ in plan:
            t = self._src(name).get_tensor(name)
            if tag == "U8":
                layout = self.attn_layouts["x".join(map(str, t.shape))]
                buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
                pack_into(buf, layout, quantize_expert({"w": t}, self.attn_spec, self.device))
                t = buf
            w.write(t)
        w.finish(self.dst / DENSE)

    # ---- experts -------------------------------------------------------------------------
    def _shard_writer(self, shard: int, done: int) -> StreamWriter:
        first = shard * self.per_shard
        count = min(self.per_shard, self.total - first)
        n = self.layout.nbytes
        names = [expert_tensor(*divmod(first + k, self.cfg.num_experts)) for k in range(count)]
        return StreamWriter(self.dst / (self.shard_name(shard) + ".partial"),
                            [(nm, "U8", (n,), n) for nm in names], keep=done - first)

    def quantize_one(self, index: int, buf: torch.Tensor) -> int:
        layer, e = divmod(index, self.cfg.num_experts)
        mats = {w: self.ckpt.get(expert_name(layer, e, w), torch.float32, "cpu") for w in self.matrices}
        pack_into(buf, self.layout, quantize_expert(mats, self.spec, self.device))
        return zlib.crc32(buf.numpy())

    def write_experts(self, crcs: list[int], fail_after: int | None) -> None:
        done, n = len(crcs), self.layout.nbytes
        buf = torch.zeros(n, dtype=torch.uint8)  # zeros: alignment padding is never written, stays 0
        bar = Progress(self.total, done, self.progress)
        writer, shard = None, -1
        for index in range(done, self.total):
            if index // self.per_shard != shard:
                shard = index // self.per_shard
                writer = self._shard_writer(shard, index)
            crcs.append(self.quantize_one(index, buf))
            writer.write(buf)
            writer.sync()
            self.journal.append({"expert": index, "crc32": crcs[-1]})
            if index + 1 == min((shard + 1) * self.per_shard, self.total):
                writer.finish(self.dst / self.shard_name(shard))
            bar.update(index + 1, f"layer {index // self.cfg.num_experts} expert {index % self.cfg.num_experts}")
            if fail_after is not None and index + 1 - done >= fail_after:
                raise InjectedFailure(f"injected failure after {fail_after} experts")

    # ---- resume and finish ---------------------------------------------------------------
    def resume_state(self) -> tuple[list[int], bool]:
        """(crc32 of the experts already written, dense done?) after checking the journal and files."""
        recs = self.journal.read()
        if not recs or recs[0] != self.head:
            raise QuantizeError(f"{self.journal.path}: the interrupted run used other settings or another source; "
                                "resume with the same SRC and flags, or start over in an empty DST")
        self.journal.start(recs[0])  # rewrite without a line the kill may have cut
        crcs, dense = [], False
        for r in recs[1:]:
            self.journal.append(r)
            dense = dense or bool(r.get("dense"))
            if "expert" in r:
                if r["expert"] != len(crcs):
                    raise QuantizeError(f"{self.journal.path}: expert {r['expert']} out of order")
                crcs.append(r["crc32"])
        for s in range(self.num_shards):
            first, end = s * self.per_shard, min((s + 1) * self.per_shard, self.total)
            if first >= len(crcs) or (end <= len(crcs) and (self.dst / self.shard_name(s)).is_file()):
                continue
            part = self.dst / (self.shard_name(s) + ".partial")
            if not part.is_file():
                raise QuantizeError(f"{part}: missing, but the journal lists its experts as written")
            w = self._shard_writer(s, min(end, len(crcs)))
            for k in range(min(end, len(crcs)) - first):
                if zlib.crc32(w.read_back(k)) != crcs[first + k]:
                    layer, e = divmod(first + k, self.cfg.num_experts)
                    raise QuantizeError(f"{part}: layer {layer} expert {e} does not match its journaled "
                                        "checksum; start over in an empty DST")
            if end <= len(crcs):
                w.finish(self.dst / self.shard_name(s))
            else:
                w.f.close()
        return crcs, dense

    def manifest(self, crcs: list[int]) -> dict:
        e, att = self.cfg.num_experts, None
        if self.attn_spec is not None:
            att = {"spec": self.attn_spec.to_dict(),
                   "layouts": {k: layout_to_dict(v) for k, v in self.attn_layouts.items()}}
        quantized = [n for n, tag, _, _ in self._dense_plan() if tag == "U8"]
        return {
            "format": FORMAT, "version": VERSION,
            "source": self.head["source"],
            "quantizer": {"hqq": importlib.metadata.version("hqq"), "device": self.head["settings"]["device"]},
            "quantization": {
                "experts": {**self.spec.to_dict(), "bits_per_weight": bits_per_weight(self.layout, self.matrices)},
                "attention": self.attn_spec.to_dict() if self.attn_spec else "source dtype, unchanged",
                "dense": "source dtype, unchanged (embeddings, norms, routers, lm_head)"},
            "dense": {"file": DENSE, "quantized": quantized},
            "attention": att,
            "experts": {"spec": self.spec.to_dict(), "matrices": {k: list(v) for k, v in self.matrices.items()},
                        "layout": layout_to_dict(self.layout), "nbytes": self.layout.nbytes,
                        "tensor": "layers.{layer}.experts.{expert}",
                        "shards": [self.shard_name(s) for s in range(self.num_shards)],
                        "per_shard": self.per_shard, "checksum": "crc32",
                        "crc32": [crcs[i * e : (i + 1) * e] for i in range(self.cfg.num_layers)]},
        }

    def finish(self, crcs: list[int]) -> None:
        for name in ("config.json", "tokenizer.model"):
            if not (self.src / name).is_file():
                print(f"warning: {self.src / name} not found, not copied: `generate -m {self.dst}` "
                      "needs it", file=sys.stderr)
                continue
            tmp = self.dst / (name + ".partial")
            shutil.copyfile(self.src / name, tmp)
            os.replace(tmp, self.dst / name)
        atomic_write(self.dst / MANIFEST, json.dumps(self.manifest(crcs), indent=1).encode())
        self.journal.path.unlink()


def convert(src: str | Path, dst: str | Path, spec: QuantSpec, attn_spec: QuantSpec | None = None,
            shard_bytes: int = 2000 << 20, resume: bool = False, device: str = "cpu", fail_after: int | None = None,
            progress: bool = True) -> Path:
    """Quantize SRC into the store DST (see the module docstring); returns DST."""
    src, dst = Path(src), Path(dst)
    c = Converter(src, dst, spec, attn_spec, shard_bytes, device, progress)
    if dst.is_dir() and any(dst.iterdir()):
        if not resume:
            raise QuantizeError(f"{dst}: not empty; pass --resume to continue an interrupted run "
                                "or choose an empty folder")
        if (dst / MANIFEST).is_file():
            differs = store_differences(json.loads((dst / MANIFEST).read_text()), c)
            if differs:
                raise QuantizeError(f"{dst}: a complete store made with other settings ({'; '.join(differs)}); "
                                    "choose an empty DST to quantize again")
            c.journal.path.unlink(missing_ok=True)  # killed after the manifest, before this cleanup
            print(f"{dst}: already a complete store with these settings; nothing to do", file=sys.stderr)
            return dst
        if not c.journal.path.is_file():
            raise QuantizeError(f"{dst}: has files but no {JOURNAL}: not an interrupted quantization")
        crcs, dense_done = c.resume_state()
    else:
        dst.mkdir(parents=True, exist_ok=True)
        c.journal.start(c.head)
        crcs, dense_done = [], False
    if not dense_done:
        c.write_dense()
        c.journal.append({"dense": True})
    c.write_experts(crcs, fail_after)
    c.finish(crcs)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="Hugging Face Mixtral checkpoint folder")
    p.add_argument("dst", type=Path, help="output store folder (empty, or an interrupted run with --resume)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True, help="expert weight bits")
    p.add_argument("--group-size", type=int, help="weights per scale/zero (default: 2->32, 3->128, 4->64, 8->128)")
    p.add_argument("--axis", type=int, choices=(0, 1), default=0, help="hqq grouping axis (default 0)")
    p.add_argument("--meta-bits", type=int, choices=(8, 16), default=8,
                   help="scale/zero storage: 8 = quantized (default), 16 = hqq's fp16")
    p.add_argument("--attn-bits", type=int, choices=(16, 8, 4), default=16,
                   help="attention projections: 16 = keep source dtype (default)")
    p.add_argument("--attn-group-size", type=int, default=64)
    p.add_argument("--shard-mb", type=int, default=2000, help="expert shard size (default 2000 MB)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DST")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for hqq's optimiser (default: cuda if available, else cpu)")
    a = p.parse_args(argv)
    try:
        return _run(a)
    finally:
        Progress.line_open = False


def _run(a) -> int:
    try:
        check_flags(a)
        group = DEFAULT_GROUP[a.bits] if a.group_size is None else a.group_size  # 0 is an error, not "default"
        spec = QuantSpec(a.bits, group, a.axis, a.meta_bits)
        attn = None if a.attn_bits == 16 else QuantSpec(a.attn_bits, a.attn_group_size, 0, 16)
        convert(a.src, a.dst, spec, attn, a.shard_mb << 20, a.resume, a.device)
    except (QuantizeError, CheckpointError, ValueError) as e:
        _error(str(e))
        return 2
    except OSError as e:  # disk full, permissions: the journal keeps what was done
        where = f"{e.filename}: " if e.filename else f"writing {a.dst}: "
        _error(f"{where}{e.strerror or e}; fix it and run the same command with --resume to continue "
               "(finished experts are kept)")
        return 2
    except KeyboardInterrupt:
        _error(f"interrupted; run the same command with --resume to continue in {a.dst}")
        return 130
    print(f"wrote {a.dst}", file=sys.stderr)
    return 0


def _error(message: str) -> None:
    print(("\n" if Progress.line_open else "") + f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
