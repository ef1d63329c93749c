"""lm-eval bridge: any lm-evaluation-harness task under any kvbench method and budget.

Registers the lm-eval model ``kvbench`` (``lm_eval.api.registry.register_model``), which runs every request
through the same engine and budget semantics as ``python -m kvbench`` (``kvbench.engine.Engine``,
``kvbench.pipeline``): the prompt is prefilled, every layer is compressed to the budget by the method and
allocator, and the answer is decoded greedily over the compressed cache. ``model_args`` are kvbench overrides::

    python -m kvbench.lmeval --model kvbench --tasks gsm8k \\
        --model_args model=hf,model.pretrained=Qwen/Qwen2.5-7B-Instruct,method=snapkv,budget=0.2
    python -m kvbench.lmeval --model kvbench --model_args pretrained=kvbench-tiny,method=adakv,budget=0.1 \\
        --include_path my_tasks/ --tasks my_task

(``python -m kvbench.lmeval`` is lm-eval's own CLI with this model registered; in Python, import this module
and pass ``KVBenchLM(...)`` or ``model="kvbench"`` to ``lm_eval.simple_evaluate``.)

Request types:
  * ``generate_until``: greedy only (``do_sample: true`` is refused). Stop strings, the EOS stop and the
    ``max_gen_toks`` default (256) follow lm-eval's ``HFLM``; the output is cut at the first stop string and not
    stripped, as HFLM does.
  * ``loglikelihood`` (multiple choice): the context is compressed (once for all its choices), then each
    continuation is scored token by token over the compressed cache (it is never compressed itself).
  * ``loglikelihood_rolling`` (perplexity) is refused: with compression it depends on where one compresses.

Protocols: ``query_aware`` (default) compresses the whole prompt, so the observation window holds its end (the
question, for the usual ``...Question: ...\\nAnswer:`` templates), as the SnapKV/PyramidKV LongBench scripts do.
``query_agnostic`` needs ``split=<marker>``: the prompt is cut at the marker's last occurrence, the part before it
is compressed alone and the rest (question) is appended uncompressed, as in kvbench's query-agnostic runs.

``kvbench/lmeval_tasks/`` holds an example task (``--include_path kvbench/lmeval_tasks --tasks kvbench_synth``):
kvbench's embedded retrieval suite, built offline, scored as lm-eval scores free-form answers (strip, exact match).
``python -m kvbench.lmeval`` checks kvbench's ``--model_args`` before lm-eval indexes its task configs (a minute),
and loads torch only then, so ``--help`` and a bad method or budget answer in seconds.

Deviations from ``HFLM``: prompts are tokenized as kvbench does (tokenizer's default special tokens, contexts
longer than ``model.max_length`` cut in the middle, where HFLM cuts on the left), one request at a time
(``batch_size`` is accepted and ignored), and no sampling.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.cli import CONF_DIR, GROUPS, unknown_option
from kvbench.errors import UsageError
from kvbench.validate import check_config

MODEL = "kvbench.lmeval_model:KVBenchLM"  # loaded (with torch) when lm-eval builds the model, not for --help


def _override(key: str, value: Any) -> str:
    """One Hydra override from an lm-eval model argument (lm-eval has already turned "0.2" into 0.2)."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "null"
    return f"{key}={value}"


def compose_config(overrides: dict[str, Any]):
    """kvbench's composed config (``conf/config.yaml``) with these overrides, validated like a run."""
    args = [_override(k, v) for k, v in overrides.items()]
    if (unknown := unknown_option(args, CONF_DIR, GROUPS)) is not None:
        raise UsageError(unknown)  # the option and the valid ones in one line, as `python -m kvbench` says it
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("config", overrides=args)
        except Exception as err:  # Hydra's errors name the bad key/option and list the valid ones
            raise UsageError(f"invalid kvbench model_args for lm-eval: {err}") from err
    check_config(cfg)
    if OmegaConf.is_list(cfg.budget):
        raise UsageError(f"the lm-eval bridge runs one budget at a time, got budget={list(cfg.budget)}")
    return cfg


def model_config(pretrained: Any = None, split: str | None = None, **overrides: Any):
    """The checked kvbench config of ``KVBenchLM(pretrained, split=split, **overrides)`` (a string ``pretrained``
    is a ``conf/model`` option or a hub id / directory); also what the CLI checks before lm-eval loads its tasks."""
    if isinstance(pretrained, str):
        options = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
        overrides = ({"model": pretrained} if pretrained in options
                     else {"model": "hf", "model.pretrained": pretrained}) | overrides
    cfg = compose_config(overrides)
    if str(cfg.protocol) == "query_agnostic" and not split:
        raise UsageError("protocol=query_agnostic needs split=<marker> (e.g. split='Question:'): the prompt part "
                         "before the marker's last occurrence is compressed before the question is seen")
    return cfg


def lmeval_device(device: str | None) -> str | None:
    """lm-eval's device for kvbench: its CLI asks for ``cuda:0`` by default; without CUDA, fall back to the CPU
    (as its HFLM does) with one warning."""
    import torch  # here, not at the top: --help and the option checks run without torch

    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn("CUDA is not available: kvbench runs on the CPU", stacklevel=3)
        return "cpu"
    return device


def __getattr__(name: str) -> Any:
    """``kvbench.lmeval.KVBenchLM``: the model class, imported on first use (it loads torch and the engine)."""
    if name == "KVBenchLM":
        from kvbench.lmeval_model import KVBenchLM

        return KVBenchLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the lm-eval model ``kvbench`` lazily (lm-eval imports :data:`MODEL` when it is asked for)."""
    from lm_eval.api.registry import model_registry

    model_registry.register("kvbench", target=MODEL)


def check_model_args(args: Any) -> None:
    """The kvbench part of a parsed lm-eval command line, checked before lm-eval indexes its task configs: a bad
    method, budget or protocol answers at once (the same checks the model runs when lm-eval builds it)."""
    options = vars(args)
    if options.get("model") != "kvbench":
        return
    own = ("tokenizer", "max_gen_toks", "batch_size", "max_batch_size", "device", "model_caps")  # not overrides
    model_config(**{k: v for k, v in (options.get("model_args") or {}).items() if k not in own})


def main() -> None:
    """lm-eval's CLI with the ``kvbench`` model registered (``python -m kvbench.lmeval --model kvbench ...``)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    try:
        check_model_args(args)
    except UsageError as err:
        print(f"kvbench.lmeval: error: {err}", file=sys.stderr)
        sys.exit(2)
    parser.execute(args)


register()

if __name__ == "__main__":
    main()
