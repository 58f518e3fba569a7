"""dist-free: "Adversarial Training for Free!" (Shafahi et al., NeurIPS 2019) at ImageNet scale."""

__version__ = "0.1.0"
