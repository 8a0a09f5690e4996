"""refsnn: a float64 reference engine for five published SNN backpropagation methods."""

__version__ = "0.1.0"
