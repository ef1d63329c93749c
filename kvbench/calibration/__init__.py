"""Offline calibrations some methods need (computed by ``scripts/calibrate_*.py``, shipped per model in assets)."""
