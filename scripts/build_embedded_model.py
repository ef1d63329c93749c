"""Build the embedded kvbench-tiny model (analytic induction-head Llama) and its tokenizer.

    python scripts/build_embedded_model.py --seed 0 --out kvbench/assets/kvbench-tiny

Writes config.json, generation_config.json, model.safetensors, tokenizer files and a model card (README.md).
Deterministic: the same seed gives a byte-identical model.safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbench.embedded import DEFAULT_DIR, save_embedded_model  # noqa: E402


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build, and print the written files with sizes and the weights' sha256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random (non-circuit) weights and codes")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="output directory")
    args = parser.parse_args(argv)
    out = save_embedded_model(args.out, seed=args.seed)
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>10}  {f}")
    print(f"sha256(model.safetensors) = {sha256(out / 'model.safetensors')}")


if __name__ == "__main__":
    main()
