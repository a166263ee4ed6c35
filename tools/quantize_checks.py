"""What tools/quantize_experts.py checks before it writes: flags, device, DST, and a finished store's settings.

Every check fails with a ValueError whose message names the flag, file or setting; the
quantizer prints it as one line `error: ...` and exits 2, before any folder is created.
"""

from __future__ import annotations

import torch


def store_differences(man: dict, c) -> list[str]:
    """What differs between a complete store's manifest and the run Converter `c` would make (empty: nothing)."""
    experts, quant = man.get("experts") or {}, man.get("quantization") or {}
    quantizer = man.get("quantizer") or {}
    ours = {"expert quantization": c.spec.to_dict() if c.layout else None,
            "dense quantization (--attn-bits, --head-bits, --embed-bits)": c.dense.to_dict(),
            "method (--method)": c.method,
            "expert layout (--prepack)": c.packing if c.layout else None,
            "experts per shard (--shard-mb)": c.per_shard if c.layout else None,
            "quantizer device": c.head["settings"]["device"], "source checkpoint": c.head["source"]}
    theirs = {"expert quantization": experts.get("spec"),
              "dense quantization (--attn-bits, --head-bits, --embed-bits)": quant.get("dense"),
              "method (--method)": quantizer.get("method"),
              "expert layout (--prepack)": experts.get("packing", "hqq") if experts else None,
              "experts per shard (--shard-mb)": experts.get("per_shard"),
              "quantizer device": quantizer.get("device"), "source checkpoint": man.get("source")}
    out = []
    for key, want in ours.items():
        if theirs[key] != want:
            out.append(f"{key}: store {_brief(theirs[key])}, now {_brief(want)}" if key != "source checkpoint"
                       else "source checkpoint: another config.json, tensor listing or file sizes")
    return out


def _brief(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def check_flags(a) -> None:
    """Before anything is created: flags, the device, and DST itself."""
    for flag, value in (("--group-size", a.group_size), ("--attn-group-size", a.attn_group_size),
                        ("--shard-mb", a.shard_mb)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    try:
        dev = torch.device(a.device)
    except RuntimeError:
        raise ValueError(f"--device {a.device!r} is not a device (cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (try --device cpu)")
    if a.dst.exists() and not a.dst.is_dir():
        raise ValueError(f"{a.dst}: is a file; DST must be a folder (empty, or an interrupted run with --resume)")
    if not a.src.is_dir():
        what = "a GGUF file" if a.src.suffix.lower() == ".gguf" else "not a folder" if a.src.exists() else None
        raise ValueError(f"{a.src}: {'is ' + what if what else 'does not exist'} "
                         "(SRC is a Hugging Face checkpoint folder: config.json, tokenizer.model, *.safetensors)")
    if (a.src / "manifest.json").is_file():
        raise ValueError(f"{a.src} is already a quantized store (it has manifest.json), not a Hugging Face "
                         "checkpoint: it runs as it is (python -m mixtral_lite.generate -m "
                         f"{a.src}); to re-quantize, give the downloaded checkpoint as SRC")
    if a.method == "hqq" or (a.method == "hqq-fast" and a.axis == 0):
        try:
            import hqq.core.quantize  # noqa: F401  (hqq's optimiser: only this method needs it)
        except ImportError as e:
            raise ValueError(f"--method {a.method} needs the hqq package ({e}): pip install "
                             "'mixtral-lite[quantize]', or use --method hqq-fast (the same optimiser in chunks) or "
                             "--method rtn, which need nothing more") from None
