"""cellmorph: learn which perturbation a cell population received, from Cell Painting images."""

__version__ = "0.1.0"
