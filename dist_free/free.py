"""The README's path to the free trainer; it lives in dist_free.engine.free."""

from dist_free.engine.free import FreeAdversarialTrainer, free_update

__all__ = ["FreeAdversarialTrainer", "free_update"]
