"""Convert a GGUF's experts once into this CPU's int4 kernel layout, beside the file, for CPU runs to read in place.

    python tools/gguf_prepack.py FILE.gguf [--force]

Writes FILE.gguf.int4-cpu-<layout>.safetensors (mixtral_lite/gguf/prepacked.py): what a CPU run of
`-m FILE.gguf` otherwise converts at every load of an expert (every miss, or every expert at start-up).
Later CPU runs find it and read it in place as they read a --prepack store. Its size: 5 bits a weight of
the experts (4-bit codes, bf16 scale and zero per 32), 28.2 GiB for Mixtral-8x7B. A GPU run does not use
it (the GGUF's own blocks cross the bus: fewer bytes, converted on the device). Errors are one line.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path, help="the GGUF file (Mixtral, any block types mixtral-lite reads)")
    p.add_argument("--force", action="store_true", help="write it again even where a current one exists")
    args = p.parse_args(argv)
    from mixtral_lite.model.checkpoint import CheckpointError
    from mixtral_lite.model.gguf import prepacked
    from mixtral_lite.model.gguf.checkpoint import GGUFCheckpoint

    try:
        if not args.gguf.is_file():
            raise CheckpointError(f"{args.gguf}: no such file")
        ckpt = GGUFCheckpoint(args.gguf, device="cpu")
        if not ckpt.config.is_moe:
            raise CheckpointError(f"{args.gguf}: a dense model (no experts to convert)")
        if ckpt.prepacked and not args.force:
            print(f"{ckpt.prepacked[0]} is current; nothing to do (--force writes it again)", file=sys.stderr)
            return 0
        need = ckpt.config.num_layers * ckpt.config.num_experts * ckpt.ggml_codec("cpu").slot_layout.nbytes
        free = shutil.disk_usage(args.gguf.resolve().parent).free
        if need > free:
            raise CheckpointError(f"{args.gguf.parent}: {need / 2**30:.1f} GiB needed beside the GGUF, "
                                  f"{free / 2**30:.1f} GiB free")
        out = prepacked.write(ckpt)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nerror: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
