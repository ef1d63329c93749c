"""Figures of one run directory and tables over a results root (``python -m kvbench.serve.report <root>``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kvbench.results import results_root  # noqa: E402


def cdf(ax: Any, values: list[float], label: str) -> None:
    v = np.sort(np.asarray(values, dtype=float))
    if len(v):
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)


HIGHER_IS_BETTER = {"throughput_tok_s", "decode_tok_s", "slo_attainment", "hit_ratio", "tokens_per_s", "max_batch",
                    "requests_per_s", "predictor_accuracy"}


def comparison_figure(path: Path, runs: dict[str, Any], keys: tuple[str, ...]) -> None:
    """One bar panel per headline metric: the system and each baseline, values on the bars."""
    keys = tuple(k for k in keys if any(isinstance(r.metrics.get(k), (int, float)) for r in runs.values()))
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), squeeze=False)
    names = list(runs)
    for ax, k in zip(axes[0], keys, strict=True):
        bars = ax.bar(range(len(names)), [runs[n].metrics.get(k) or 0 for n in names],
                      color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{k}\n({'higher' if k in HIGHER_IS_BETTER else 'lower'} is better)", fontsize=9)
        ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_axis(ax: Any) -> None:
    """A log x axis labelled at 1, 2 and 5 of every decade (a distribution within one decade keeps its labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def latency_figure(path: Path, runs: dict[str, Any], title: str) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, res in runs.items():
        cdf(a, [r["ttft"] for r in res.requests], name)
        cdf(b, [r["tpot"] for r in res.requests if r["tpot"] is not None], name)
    a.set(xlabel="TTFT (s)", ylabel="share of requests", title="time to first token")
    b.set(xlabel="TPOT (s)", title="time per output token")
    for ax in (a, b):
        log_axis(ax)
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_figure(path: Path, runs: dict[str, Any]) -> None:
    """Device KV over time (one line per system), or, for pooled systems (EPD), peak memory per GPU of each pool."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    pooled = {n: r.metrics["peak_mem_bytes"] for n, r in runs.items() if "peak_mem_bytes" in r.metrics}
    if pooled:
        pools = list(dict.fromkeys(p for v in pooled.values() for p in v))
        width = 0.8 / len(pooled)
        for i, (name, peaks) in enumerate(pooled.items()):
            x = [k + i * width for k, p in enumerate(pools) if p in peaks]
            bars = ax.bar(x, [peaks[p] / 2**30 for p in pools if p in peaks], width, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        names = {"E": "encode", "P": "prefill", "D": "decode", "A": "aggregated"}
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(pools))], [names.get(p, p) for p in pools])
        ax.set(ylabel="GiB per GPU", title="peak memory per GPU by pool (weights + activations + KV)")
        ax.margins(y=0.12)
    for name, res in ({} if pooled else runs).items():
        if res.iterations:
            ax.plot([row[0] for row in res.iterations], [row[4] / 2**30 for row in res.iterations], label=name, lw=0.8)
    if not pooled:
        ax.set(xlabel="time (s)", ylabel="KV held (GiB)", title="device KV memory")
    if not ax.lines and not ax.patches:
        plt.close(fig)
        return
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slo_text(slo: dict[str, Any] | None, scaled: bool = False) -> str:
    """The SLO in words: its bounds or, with ``scaled``, the unloaded latencies the scales multiply."""
    if not slo:
        return ""
    base = slo.get("unloaded") if scaled else None
    src = base or slo
    parts = [f"{k} {src[key] * f:.3g} {unit}" for k, key, f, unit in
             (("TTFT", "ttft_s", 1, "s"), ("TPOT", "tpot_s", 1000, "ms")) if src[key] is not None]
    if base is None:
        return "SLO: " + " and ".join(p.replace(" ", " <= ", 1) for p in parts)
    q = slo["request"]
    return (f"SLO = scale x {' and '.join(parts)}: {slo['reference']} serving one request alone "
            f"({q['prompt']} prompt tokens, {q['images']} images, {q['output']} output tokens)")


def run_figures(out: Path, runs: dict[str, Any], main: str, headline: tuple[str, ...] = (),
                slo: dict[str, Any] | None = None, by_scale: dict[str, Any] | None = None) -> None:
    """latency.png: TTFT and TPOT distributions of the system and its baselines; memory.png: KV bytes over time;
    comparison.png: the system's headline metrics against its baselines; for EPD slo_vs_rate.png, and for a scaled
    SLO slo_vs_scale.png."""
    comparison_figure(out / "comparison.png", runs, headline)
    if not any(res.requests for res in runs.values()):
        return
    parts = out.parts[-6:-1]  # workload | hardware | arch | kv | slo (run.run_dir)
    latency_figure(out / "latency.png", runs, f"{main}: " + " | ".join(parts))
    memory_figure(out / "memory.png", runs)
    mm = runs[main].metrics
    if "slo_vs_rate" in mm:
        panels = mm.get("slo_vs_rate_by_scale") or {"": mm["slo_vs_rate"]}
        slo_figure(out / "slo_vs_rate.png", panels, slo_text(slo, scaled="slo_vs_rate_by_scale" in mm))
    if by_scale:
        slo_scale_figure(out / "slo_vs_scale.png", by_scale, slo_text(slo, scaled=True).replace(": ", ":\n", 1))


def slo_figure(path: Path, panels: dict[str, dict[str, dict[str, float | None]]], bounds: Any = None) -> None:
    """SLO attainment vs request rate, one panel per SLO scale (``{scale: {rate: {system: attainment}}}``)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (scale, table) in zip(axes[0], panels.items(), strict=True):
        rates = sorted(table, key=float)
        for name in table[rates[0]]:
            ax.plot([float(r) for r in rates], [table[r][name] for r in rates], marker="o", label=name)
        ax.set(xlabel="request rate (req/s)", ylim=(-0.03, 1.05), title=f"SLO scale {scale}" if scale else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLO attainment")
    axes[0][0].legend()
    if bounds:
        fig.suptitle(bounds, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slo_scale_figure(path: Path, table: dict[str, dict[str, float | None]], title: str) -> None:
    """SLO attainment vs SLO scale at the workload's rate (``{scale: {system: attainment}}``)."""
    scales = sorted(table, key=float)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name in table[scales[0]]:
        ax.plot([float(s) for s in scales], [table[s][name] for s in scales], marker=".", label=name)
    ax.set(xlabel="SLO scale (at the workload's request rate)", ylabel="SLO attainment", ylim=(-0.03, 1.05),
           title=title)
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ("throughput_tok_s", "ttft_s_p50", "ttft_s_p99", "tbt_s_p99", "tpot_s_mean", "slo_attainment",
           "preemptions", "swap_bytes", "copy_calls", "max_batch")


def slo_dir(metrics_file: Path) -> str:
    """The SLO tag of a run directory (``.../slo=<tag>/seed=<s>/metrics.json``; '' for the older layout)."""
    name = metrics_file.parent.parent.name
    return name.removeprefix("slo=") if name.startswith("slo=") else ""


def load_serve(root: str | Path) -> pd.DataFrame:
    """One row per (run directory, system or baseline) under ``root``."""
    rows = []
    for f in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(f.read_text())
        if "baseline_over_system" not in m:
            continue
        for name, x in {m["system"]: m["metrics"], **m["baselines"]}.items():
            rows.append({"run": m["system"], "system": name, "workload": m["workload"], "hardware": m["hardware"],
                         "arch": m["arch"], "kv": m["kv"]["tag"], "slo": slo_dir(f), "seed": m["seed"],
                         **{c: x.get(c) for c in COLUMNS}})
    return pd.DataFrame(rows)


def kv_table(root: str | Path) -> pd.DataFrame:
    """Accuracy (from the kvbench run fed as ``kv.source``) next to serving figures, one row per simulation."""
    rows = []
    for f in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(f.read_text())
        if "baseline_over_system" not in m:
            continue
        kv, x = m["kv"], m["metrics"]
        score = next(iter((kv.get("score") or {}).values()), None)
        rows.append({"system": m["system"], "workload": m["workload"], "hardware": m["hardware"], "arch": m["arch"],
                     "kv": kv["tag"], "label": kv.get("label", kv["tag"]), "kept": kv["kept"], "score": score,
                     **{c: x.get(c) for c in ("throughput_tok_s", "ttft_s_p99", "tbt_s_p99", "max_batch")}})
    return pd.DataFrame(rows)


def kv_figure(df: pd.DataFrame, path: Path) -> None:
    """Score against throughput and P99 TTFT, one point per KV policy (a method at a budget; the full cache is
    ``fullkv``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    markers = "osD^v<>P*X"
    for ax, col in zip(axes, ("throughput_tok_s", "ttft_s_p99"), strict=True):
        for i, (_, r) in enumerate(df.iterrows()):
            ax.scatter(r[col], r["score"], marker=markers[i % len(markers)], s=40, alpha=0.8,
                       label=f"{r['label']} (kept {r['kept']:.2f})")
        ax.set(xlabel=col, ylabel="score of the kvbench run")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    root = results_root(argv[0] if argv else None)  # KVBENCH_RESULTS / paths.results, as every reader
    df = load_serve(root / "serve" if (root / "serve").exists() else root)
    if df.empty:
        print(f"no kvbench.serve runs under {root}")
        return
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "serve.csv", index=False)
    (out / "serve.md").write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(df.to_markdown(index=False, floatfmt=".4g"))
    kv = kv_table(root / "serve" if (root / "serve").exists() else root)
    if kv["score"].notna().any():
        kv.to_csv(out / "serve_kv.csv", index=False)
        (out / "serve_kv.md").write_text(kv.to_markdown(index=False, floatfmt=".4g") + "\n")
        kv_figure(kv[kv["score"].notna()], out / "serve_kv.png")
        print(kv.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main(sys.argv[1:])
