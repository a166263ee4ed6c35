"""The store writer behind tools/quantize_experts.py: Converter (one fresh or resumed run of SRC into
DST) and convert(). See tools/quantize_experts.py for the format, the defaults and the crash safety."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import struct
import sys
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is a folder of scripts, not a package
from quantize_checks import store_differences  # noqa: E402
from store_writing import Journal, Progress, StreamWriter, atomic_copy, atomic_write  # noqa: E402

from mixtral_lite.model.checkpoint import INDEX, SINGLE, Checkpoint, check_finite, expert_name, shard_map
from mixtral_lite.model.qplan import dense_kind
from mixtral_lite.model.qstore import (
    DENSE,
    FORMAT,
    MANIFEST,
    STACK,
    VERSION,
    DenseSettings,
    expert_matrices,
    expert_tensor,
)
from offload.fused import FusedCodec
from offload.kernels import native_cpu_layout
from offload.packing import pack_into, views
from offload.prepacked import packing_name, prepack_unsupported, prepack_write_unsupported
from offload.qdense import dense_layout, quantize_dense
from offload.quant import QuantSpec, bits_per_weight, expert_layout, layout_to_dict, quantize_expert

JOURNAL = ".quantize-journal.jsonl"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


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

    def __init__(self, src: Path, dst: Path, spec: QuantSpec, dense: DenseSettings, shard_bytes: int,
                 device: str, progress: bool = True, method: str = "hqq", ckpt=None, prepack: bool = False):
        self.src, self.dst, self.spec, self.dense, self.device, self.method = src, dst, spec, dense, device, method
        # ckpt: anything with Checkpoint's interface (tools/make_synthetic_store.py passes seeded random tensors)
        self.ckpt = ckpt or Checkpoint(src)  # validates every tensor's presence and shape against config.json
        self.cfg = self.ckpt.config
        if self.cfg.tie_word_embeddings and dense.head_bits != dense.embed_bits:
            raise QuantizeError(f"{src / 'config.json'}: tie_word_embeddings: lm_head is the embedding matrix, so "
                                f"--head-bits {dense.head_bits} and --embed-bits {dense.embed_bits} must agree")
        self.matrices = expert_matrices(self.cfg) if self.cfg.is_moe else {}
        try:
            self.layout = expert_layout(self.matrices, spec) if self.cfg.is_moe else None
        except ValueError as e:
            raise QuantizeError(f"--bits {spec.bits} --group-size {spec.group_size}: experts: {e}") from None
        # --prepack: each expert is quantized into hqq's layout, then written in the CPU kernel's
        self.hqq_layout, self._prepacked = self.layout, None
        if prepack and self.layout is not None:
            why = prepack_unsupported(self.matrices, spec, "cpu", STACK) or prepack_write_unsupported()
            if why:
                raise QuantizeError(f"--prepack: {why}")
            self._prepacked = (FusedCodec(self.matrices, spec, "cpu", STACK), torch.zeros(self.layout.nbytes,
                                                                                          dtype=torch.uint8))
            self.layout = self._prepacked[0].slot_layout
        self.dense_kinds = self._dense_kinds()
        self.total = self.cfg.num_layers * self.cfg.num_experts
        self.per_shard = max(1, shard_bytes // self.layout.nbytes) if self.layout else 1
        self.num_shards = -(-self.total // self.per_shard)
        self.journal = Journal(dst / JOURNAL)
        self.progress = progress
        self._handles: dict[Path, object] = {}
        # --prepack writes this CPU's own layout (read in place here; converted at load on other CPUs)
        self.packing = packing_name(native_cpu_layout()) if self._prepacked else "hqq"
        self.head = {"settings": {"experts": spec.to_dict(), "method": method, "dense": dense.to_dict(),
                                  "packing": self.packing,
                                  "shard_bytes": shard_bytes, "device": torch.device(device).type},
                     "source": self.source_identity(),
                     # the journal only: a source rewritten in place (same shapes, new weights) must not
                     # be resumed into a half-written store of its older weights
                     "source_mtime_ns": self.source_mtimes()}

    def source_identity(self) -> dict:
        return source_identity(self.src)

    def source_mtimes(self) -> dict[str, int]:
        return {f.name: f.stat().st_mtime_ns for f in set(shard_map(self.src).values())}

    def source_tag(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype tag, shape) of a source tensor, from its header."""
        sl = self._src(name).get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def source_tensor(self, name: str) -> torch.Tensor:
        """A source tensor in its stored dtype."""
        return self._src(name).get_tensor(name)

    def _dense_kinds(self) -> dict[str, tuple[str, QuantSpec | None]]:
        out = {}
        for name in self.ckpt.names():
            kind = dense_kind(name, self.spec, self.dense)
            if kind is None:
                continue
            if kind[0] == "int4":
                flag = "--bits/--group-size" if ".mlp." in name else "--attn-bits/--attn-group-size"
                try:
                    dense_layout(kind[0], self.ckpt.shape(name), kind[1])
                except ValueError as e:
                    raise QuantizeError(f"{flag}: tensor {name!r}: {e}") from None
            out[name] = kind
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
            if name in self.dense_kinds:
                kind, spec = self.dense_kinds[name]
                n = dense_layout(kind, self.ckpt.shape(name), spec).nbytes
                plan.append((name, "U8", (n,), n))
                continue
            tag, shape = self.source_tag(name)
            if tag not in ("F32", "F16", "BF16"):
                raise QuantizeError(f"{self.ckpt.file_of(name)}: tensor {name!r} has dtype {tag}, expected a float")
            size = {"F32": 4, "F16": 2, "BF16": 2}[tag]
            plan.append((name, tag, shape, size * torch.Size(shape).numel()))
        return plan

    def write_dense(self) -> dict[str, int]:
        """Write dense.safetensors; returns the crc32 of each tensor's stored bytes."""
        plan = self._dense_plan()
        w = StreamWriter(self.dst / (DENSE + ".partial"), plan)
        crcs = {}
        for name, tag, _, _ in plan:
            t = self.source_tensor(name)
            check_finite(t, self.ckpt.file_of(name), name)  # a NaN must not become a store without a word
            if tag == "U8":
                kind, spec = self.dense_kinds[name]
                t = quantize_dense(t, kind, spec, self.device, self.method)
            crcs[name] = zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy())
            w.write(t)
        w.finish(self.dst / DENSE)
        return crcs

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
        parts = quantize_expert(mats, self.spec, self.device, self.method)
        if self._prepacked is None:
            pack_into(buf, self.layout, parts)
        else:
            fused, hqq_buf = self._prepacked
            pack_into(hqq_buf, self.hqq_layout, parts)
            fused.convert(views(hqq_buf, self.hqq_layout), views(buf, self.layout))
        return zlib.crc32(buf.numpy())

    def write_experts(self, crcs: list[int], fail_after: int | None) -> None:
        if self.layout is None:  # a dense Mistral: nothing but the dense file
            return
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
    def resume_state(self) -> tuple[list[int], dict | None]:
        """(crc32 of the experts already written, the dense crc32s if dense is done) after checking the journal
        and files."""
        recs = self.journal.read()
        if not recs or recs[0] != self.head:
            raise QuantizeError(f"{self.journal.path}: the interrupted run used other settings or another source; "
                                "resume with the same SRC and flags, or start over in an empty DST")
        self.journal.start(recs[0])  # rewrite without a line the kill may have cut
        crcs, dense = [], None
        for r in recs[1:]:
            self.journal.append(r)
            dense = r["dense"] if "dense" in r else dense
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

    def manifest(self, crcs: list[int], dense_crc: dict[str, int]) -> dict:
        e = self.cfg.num_experts
        tensors = {n: {"kind": k, **({"spec": s.to_dict()} if s else {})} for n, (k, s) in self.dense_kinds.items()}
        man = {
            "format": FORMAT, "version": VERSION,
            "source": self.head["source"],
            "quantizer": {"hqq": importlib.metadata.version("hqq"), "device": self.head["settings"]["device"],
                          "method": self.method},
            "quantization": {"experts": self.spec.to_dict(), "dense": self.dense.to_dict()},
            "dense": {"file": DENSE, "tensors": tensors, "crc32": dense_crc},
            "experts": None,
        }
        if self.layout is not None:
            man["quantization"]["experts"]["bits_per_weight"] = bits_per_weight(self.layout, self.matrices)
            man["experts"] = {
                "spec": self.spec.to_dict(), "matrices": {k: list(v) for k, v in self.matrices.items()},
                "layout": layout_to_dict(self.layout), "nbytes": self.layout.nbytes, "packing": self.packing,
                "tensor": "layers.{layer}.experts.{expert}",
                "shards": [self.shard_name(s) for s in range(self.num_shards)],
                "per_shard": self.per_shard, "checksum": "crc32",
                "crc32": [crcs[i * e : (i + 1) * e] for i in range(self.cfg.num_layers)]}
        return man

    def finish(self, crcs: list[int], dense_crc: dict[str, int]) -> None:
        self.copy_side_files()
        atomic_write(self.dst / MANIFEST, json.dumps(self.manifest(crcs, dense_crc), indent=1).encode())
        self.journal.path.unlink()

    def copy_side_files(self) -> None:
        """config.json and tokenizer.model from SRC (`generate -m DST` needs them)."""
        for name in ("config.json", "tokenizer.model"):
            if not (self.src / name).is_file():
                print(f"warning: {self.src / name} not found, not copied: `generate -m {self.dst}` "
                      "needs it", file=sys.stderr)
                continue
            atomic_copy(self.src / name, self.dst / name)


def convert(src: str | Path, dst: str | Path, spec: QuantSpec, dense: DenseSettings | None = None,
            shard_bytes: int = 2000 << 20, resume: bool = False, device: str = "cpu", fail_after: int | None = None,
            progress: bool = True, method: str = "hqq", prepack: bool = False) -> Path:
    """Quantize SRC into the store DST (see the module docstring); returns DST."""
    src, dst = Path(src), Path(dst)
    c = Converter(src, dst, spec, dense or DenseSettings(), shard_bytes, device, progress, method, prepack=prepack)
    return run_converter(c, resume, fail_after)


def run_converter(c: Converter, resume: bool = False, fail_after: int | None = None) -> Path:
    """Fresh, resumed or already-finished run of `c` into c.dst; returns c.dst."""
    dst = c.dst
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
        crcs, dense_crc = c.resume_state()
    else:
        dst.mkdir(parents=True, exist_ok=True)
        c.journal.start(c.head)
        crcs, dense_crc = [], None
    if dense_crc is None:
        dense_crc = c.write_dense()
        c.journal.append({"dense": dense_crc})
    c.write_experts(crcs, fail_after)
    c.finish(crcs, dense_crc)
    return dst
