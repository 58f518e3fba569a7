"""The public loader's old path: every exported MODEL_CARD.md embeds
`from dist_free.models import from_checkpoint`. The architectures live in dist_free.engine.models,
the loading in dist_free.publish.load."""

from dist_free.engine.models import available_models, build_model
from dist_free.publish.load import from_checkpoint

__all__ = ["available_models", "build_model", "from_checkpoint"]
