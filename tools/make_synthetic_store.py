"""Write a quantized store of a Mixtral-shaped model straight from seeded random weights: no 93 GB source.

    python tools/make_synthetic_store.py DST --preset mixtral-8x7b [--bits 4|2] [--group-size G]
                                         [--method rtn|hqq] [--seed 0] [--threads N] [--resume]

The weights are exactly those tools/make_synthetic_checkpoint.py would write for the same preset and seed
(bf16, each tensor from its own generator seeded by (seed, tensor index), so the result does not depend
on order), made one tensor at a time when the writer asks for it. Everything else is
tools/quantize_experts.py's Converter: the same quantizer (round-to-nearest by default: hqq's
optimiser would take hours per full-size store on a CPU), the same streamed shards, journal, --resume,
manifest v2 with a crc32 per expert and per dense tensor, so every loader path that reads DST is the
real one. `quantize_experts.py CKPT DST2 --method rtn` on the checkpoint of the same preset and seed gives
byte-identical experts and dense tensors (tests/test_synthetic_store.py checks it at tiny shapes).

Peak memory is one tensor (an expert's three matrices, or the embeddings) in float32 plus its packed
bytes: about 2 GB for mixtral-8x7b, whose 4-bit store is ~24 GB (2-bit g32: ~14 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from importlib.resources import files
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is a folder of scripts, not a package
from make_synthetic_checkpoint import DTYPES, PRESETS, hf_config, make_tensor, tensor_specs  # noqa: E402
from quantize_experts import DEFAULT_GROUP  # noqa: E402
from store_converter import Converter, QuantizeError, run_converter  # noqa: E402
from store_writing import Progress, atomic_copy  # noqa: E402

from mixtral_lite.model.checkpoint import CheckpointError, expected_shapes
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.model.qstore import DenseSettings
from offload.quant import METHODS, QuantSpec


class SyntheticSource:
    """Checkpoint's interface (config, names, shape, file_of, get) over seeded random tensors made on demand."""

    def __init__(self, preset: str, seed: int = 0, dtype: str = "bfloat16"):
        if preset not in PRESETS or dtype not in DTYPES:
            raise QuantizeError(f"--preset must be one of {sorted(PRESETS)} and --dtype one of {sorted(DTYPES)}")
        self.preset, self.seed, self.dtype = preset, seed, dtype
        self.raw_config = hf_config(PRESETS[preset], dtype)
        self.config = ModelConfig.from_dict(self.raw_config, f"preset {preset}")
        self._specs = {s.name: (k, s) for k, s in enumerate(tensor_specs(PRESETS[preset]))}
        self._expected = expected_shapes(self.config)  # the order Checkpoint.names() gives
        missing = set(self._expected) ^ set(self._specs)
        if missing:  # the preset's tensor list and the config's shapes must describe one model
            raise QuantizeError(f"preset {preset}: tensors {sorted(missing)[:3]} disagree with its config")
        self.path = Path(f"<synthetic {preset} seed {seed}>")  # what error messages name as the file

    def names(self) -> list[str]:
        return list(self._expected)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._expected[name]

    def file_of(self, name: str) -> Path:
        return self.path

    def raw(self, name: str) -> torch.Tensor:
        """The tensor in the checkpoint's dtype, as make_synthetic_checkpoint writes it."""
        k, spec = self._specs[name]
        return make_tensor(spec, k, self.seed, DTYPES[self.dtype][0])

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return self.raw(name).to(device=device, dtype=dtype)

    def identity(self) -> dict:
        """What the manifest records as the source (a resume checks it): preset, seed, dtype, config hash."""
        cfg = json.dumps(self.raw_config, sort_keys=True).encode()
        return {"synthetic": self.preset, "seed": self.seed, "dtype": self.dtype,
                "config_sha256": hashlib.sha256(cfg).hexdigest()}


class SyntheticConverter(Converter):
    """Converter whose source is a SyntheticSource: same quantizer, writer, journal and manifest."""

    def __init__(self, source: SyntheticSource, dst: Path, spec: QuantSpec, dense: DenseSettings,
                 shard_bytes: int, progress: bool = True, method: str = "rtn", reuse: bool = False,
                 prepack: bool = False):
        self.synthetic, self.reuse, self._first = source, reuse, None
        super().__init__(source.path, dst, spec, dense, shard_bytes, "cpu", progress, method, ckpt=source,
                         prepack=prepack)
        if reuse:  # another store than the distinct-experts one: a resume must not mix the two
            self.head["source"] = self.head["source"] | {"reuse_experts": True}

    def quantize_one(self, index: int, buf: torch.Tensor) -> int:
        """--reuse-experts: layer 0 expert 0's packed bytes for every expert (disk-write time, not compute)."""
        if not self.reuse:
            return super().quantize_one(index, buf)
        if self._first is None:
            crc = super().quantize_one(0, buf)
            self._first = (buf.clone(), crc)
        buf.copy_(self._first[0])
        return self._first[1]

    def source_identity(self) -> dict:
        return self.synthetic.identity()

    def source_mtimes(self) -> dict[str, int]:
        return {}  # nothing on disk can change under a resumed run: the seed is the source

    def source_tag(self, name: str) -> tuple[str, tuple[int, ...]]:
        return DTYPES[self.synthetic.dtype][1], self.synthetic.shape(name)

    def source_tensor(self, name: str) -> torch.Tensor:
        return self.synthetic.raw(name)

    def copy_side_files(self) -> None:
        (self.dst / "config.json").write_text(json.dumps(self.synthetic.raw_config, indent=2) + "\n")
        tokenizer = Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))  # the real Mixtral one
        atomic_copy(tokenizer, self.dst / "tokenizer.model")


def make_store(dst: str | Path, preset: str, spec: QuantSpec, dense: DenseSettings | None = None, seed: int = 0,
               shard_bytes: int = 2000 << 20, resume: bool = False, method: str = "rtn", progress: bool = True,
               fail_after: int | None = None, reuse: bool = False, prepack: bool = False) -> Path:
    """Write (or resume, or confirm) the synthetic store DST; returns DST."""
    c = SyntheticConverter(SyntheticSource(preset, seed), Path(dst), spec, dense or default_dense(), shard_bytes,
                           progress, method, reuse, prepack)
    return run_converter(c, resume, fail_after)


def default_dense() -> DenseSettings:
    """quantize_experts.py's defaults: attention int4 g64, lm_head and embeddings int8 per row."""
    return DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dst", type=Path, help="output store folder (empty, or an interrupted run with --resume)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="expert weight bits (default 4)")
    p.add_argument("--group-size", type=int, help="weights per scale/zero (default: 2->32, 3->128, 4->64, 8->128)")
    p.add_argument("--method", choices=METHODS, default="rtn", help="rtn (default: seconds per expert) or hqq")
    p.add_argument("-s", "--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, default=2000, help="expert shard size (default 2000 MB)")
    p.add_argument("-t", "--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DST")
    p.add_argument("--reuse-experts", action="store_true",
                   help="quantize one expert and write its bytes for all of them: a store for loader, memory and "
                        "disk benchmarks in about the time the disk takes to write it (outputs are meaningless)")
    p.add_argument("--prepack", action="store_true",
                   help="experts in the CPU int4 kernel's own layout (quantize_experts.py --prepack)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    group = DEFAULT_GROUP[a.bits] if a.group_size is None else a.group_size
    try:
        if group < 1 or a.shard_mb < 1:
            raise QuantizeError("--group-size and --shard-mb must be positive integers")
        make_store(a.dst, a.preset, QuantSpec(a.bits, group), seed=a.seed, shard_bytes=a.shard_mb << 20,
                   resume=a.resume, method=a.method, reuse=a.reuse_experts, prepack=a.prepack)
    except (QuantizeError, CheckpointError, ValueError, OSError) as e:
        print(("\n" if Progress.line_open else "") + f"error: {e}", file=sys.stderr)
        return 2
    finally:
        Progress.line_open = False
    print(f"wrote {a.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
