"""Classify a VAR or Infinity model's heads for HACK (attention variance, ``kvbench.var.calibrate``) and write the
file ``method=hack`` loads:

    python scripts/calibrate_hack.py                          # kvbench-tiny-var -> kvbench/assets/kvbench-tiny-var/
    python scripts/calibrate_hack.py --model kvbench-tiny-infinity       # text prompts (its own calibration set)
    python scripts/calibrate_hack.py --out /tmp/c.json --figure heads.png   # and every head's attention map
    python scripts/calibrate_hack.py --model var-d30 --pretrained /ckpt/var_d30.pth --vae /ckpt/vae_ch160v4096z32.pth \
        --depth 30 --out /ckpt/hack/var-d30.json              # then method.calibration=/ckpt/hack/var-d30.json

Calibration images use their own classes / prompts and seeds (9001 on), not the evaluation task's. The model's
``conf/model/<model>.yaml`` is read when there is one (its ``arch`` decides classes or prompts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kvbench.var.bundle import load_bundle
from kvbench.var.cache import scale_spans
from kvbench.var.calibrate import VarianceProbe, calibrate_bundle, draw, dumps, record
from kvbench.var.hack import CALIBRATION_FILE
from kvbench.var.load import ASSETS

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PROMPTS = ["a green apple on a white plate", "a city street at night in the rain", "a small wooden boat on a lake",
           "a portrait of an old man with a beard", "a field of sunflowers under a blue sky", "a cup of coffee"]
DEFAULTS = {"var": {"cfg": 1.5, "top_k": 900, "top_p": 0.96},
            "infinity": {"cfg": 4.0, "tau": 0.5, "top_k": 900, "top_p": 0.97}}


def model_spec(args: argparse.Namespace):
    """conf/model/<model>.yaml when it exists, with the checkpoint arguments on top."""
    spec = OmegaConf.load(CONF / f"{args.model}.yaml") if (CONF / f"{args.model}.yaml").exists() else \
        OmegaConf.create({"pretrained": f"embedded:{args.model}", "arch": "var"})
    for key in ("pretrained", "vae", "depth"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description="HACK head calibration for a VAR model")
    ap.add_argument("--model", default="kvbench-tiny-var", help="the model's name (what method.model holds)")
    ap.add_argument("--pretrained", default=None, help="var_d*.pth (default: embedded:<model>)")
    ap.add_argument("--vae", default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], help="VAR models")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS, help="Infinity models")
    ap.add_argument("--seeds", type=int, nargs="+", default=[9001, 9002])
    ap.add_argument("--min-step", type=int, default=2, help="first scale step whose attention is measured")
    ap.add_argument("--cfg", type=float, default=None, help="default: VAR 1.5, Infinity 4")
    ap.add_argument("--tau", type=float, default=None, help="Infinity only (default 0.5)")
    ap.add_argument("--top-k", type=int, default=None, help="default 900")
    ap.add_argument("--top-p", type=float, default=None, help="default: VAR 0.96, Infinity 0.97")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (tiny models: 1 is fastest)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--figure", default=None, help="also draw every head's last-step attention map to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(model_spec(args), args.device)
    given = {"cfg": args.cfg, "tau": args.tau, "top_k": args.top_k, "top_p": args.top_p}
    sampling = {k: v if given[k] is None else given[k] for k, v in DEFAULTS[bundle.arch].items()}
    conditions = args.classes if bundle.condition == "classes" else args.prompts
    probe = VarianceProbe(args.min_step)
    stat = calibrate_bundle(bundle, conditions, args.seeds, args.min_step, sampling, probe)
    settings = {bundle.condition: conditions, "seeds": args.seeds, "min_step": args.min_step, **sampling,
                "statistic": "var_j(n * mean_i A_ij), current-scale queries, full cache, mean over streams"}
    data = record(args.model, bundle.transformer, stat, settings)
    out = args.out or ASSETS / args.model / CALIBRATION_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(data))
    for b, row in enumerate(data["labels_gap"]):
        cells = zip(row, data["statistic"][b], strict=True)
        print(f"block {b}: " + "  ".join(f"{lab[:4]} {s:.3g}" for lab, s in cells))
    print(f"wrote {out}")
    if args.figure:
        draw(probe.maps, data, scale_spans(bundle.shape[2]), args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
