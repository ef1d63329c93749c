"""Visual autoregressive models (VAR and Infinity, FoundationVision) over kvbench's KV store, with per-scale
compression.

``python -m kvbench.var model=kvbench-tiny-var task=var_class method=hack budget=0.3`` (Infinity:
``model=kvbench-tiny-infinity task=infinity_prompts``); see docs/var.md.
Modules: ``model`` / ``quant`` / ``vae`` (the networks, checkpoint-compatible names), ``generate`` (the next-scale
loop), ``cache`` (the store), ``compress`` (the per-step hook), ``hack`` / ``calibrate`` / ``baselines`` (methods),
``metrics``, ``task``, ``bundle`` (a loaded VAR or Infinity model), ``run`` (``run(cfg)``), ``table``;
``infinity/`` (Infinity's transformer, bitwise tokens, T5 condition, 2-D RoPE, schedules, sampling loop, loading).
"""
