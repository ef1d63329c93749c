"""lm-eval task configs shipped with kvbench (``--include_path kvbench/lmeval_tasks``)."""
