"""dist-free: "Adversarial Training for Free!" (Shafahi et al., NeurIPS 2019) at ImageNet scale."""

import importlib.util
from pathlib import Path

__version__ = "0.1.0"


def _check_pipelines_is_ours() -> None:
    """The input pipelines ship as a top-level package named `pipelines`, a generic name: PyPI has
    an unrelated `pipelines` too. Installed together, whichever comes first on sys.path wins (and
    site-packages comes before an editable install's finder), so check that the `pipelines` Python
    would import is the one installed beside this package, without importing it."""
    spec = importlib.util.find_spec("pipelines")
    ours = Path(__file__).resolve().parents[1] / "pipelines" / "__init__.py"
    found = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if found != ours:
        raise ImportError(
            f"dist-free's input pipelines should be {ours}, but Python finds 'pipelines' at "
            f"{found or 'nowhere'}: another distribution's top-level 'pipelines' package shadows "
            "it. Uninstall that distribution (`pip show -f <name>` names its files) or use a "
            "separate virtual environment, then reinstall dist-free.")


_check_pipelines_is_ours()
