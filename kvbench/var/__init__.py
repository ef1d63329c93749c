"""Visual autoregressive models (VAR, FoundationVision/VAR) over kvbench's KV store, with per-scale compression.

``python -m kvbench.var model=kvbench-tiny-var task=var_class method=hack budget=0.3``; see docs/var.md.
Modules: ``model`` / ``quant`` / ``vae`` (the networks, checkpoint-compatible names), ``generate`` (the next-scale
loop), ``cache`` (the store), ``compress`` (the per-step hook), ``hack`` / ``calibrate`` / ``baselines`` (methods),
``metrics``, ``task``, ``run`` (``run(cfg)``), ``table``.
"""
