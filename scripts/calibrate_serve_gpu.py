"""Measure a GPU's operator rates for a serving hardware profile (run on the GPU node).

    python scripts/calibrate_serve_gpu.py --profile a100-80gb --out results/serve/calibration/a100-80gb.json
    python -m kvbench.serve hardware=a100-80gb +hardware.calibration=results/serve/calibration/a100-80gb.json

GEMM, prefill and decode attention and device -> pinned-host copies are measured with the arch's shapes
(:mod:`kvbench.serve.gpubench`); the per-iteration overheads stay the profile's assumptions. Without CUDA it
stops with a message (``--device cpu --small`` runs the same code on CPU, for checking it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from kvbench.serve.arch import arch_from_cfg
    from kvbench.serve.gpubench import calibration
    from kvbench.serve.hardware import hardware_from_cfg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="a100-80gb")
    ap.add_argument("--arch", default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (a quick check, not a calibration)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("calibrate_serve_gpu: no CUDA device here; run it on the GPU node (or --device cpu --small)")
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "serve"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hardware={args.profile}", f"arch={args.arch}"])
    base = vars(hardware_from_cfg(cfg.hardware)).copy()
    data = calibration(base, arch_from_cfg(cfg.arch), args.device, args.small)
    out = Path(args.out or ROOT / "results" / "serve" / "calibration" / f"{args.profile}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    spec = {k: base[k] for k in data["measured"]}
    for k, v in data["measured"].items():
        print(f"{k:12s} measured {v:.4g}   profile {spec[k]:.4g}   ratio {v / spec[k]:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
