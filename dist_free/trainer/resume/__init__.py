"""Resuming somewhere else: on another world size, the per-rank perturbations re-dealt
(redeal.py); on other data, refused unless accepted (data_guard.py)."""
