"""cmpipe: consistency models (Song et al. 2023) as a reproducible DVC pipeline."""
__version__ = "0.1.0"
