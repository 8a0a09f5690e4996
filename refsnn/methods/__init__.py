"""The registry of training methods: name -> Method (imported on first use)."""

from ..errors import ConfigError
from .base import Method, Params, Ref, Trace, load_method, param

METHODS = {
    "stbp": Ref("refsnn.methods.stbp", "STBP"),
    "hm2bp": Ref("refsnn.methods.hm2bp", "HM2BP"),
    "tsslbp": Ref("refsnn.methods.tsslbp", "TSSLBP"),
    "spikebp": Ref("refsnn.methods.spikebp", "SpikeBP"),
    "bpsta": Ref("refsnn.methods.bpsta", "BPSTA"),
}


def get_method(name: str) -> Method:
    """The Method called ``name``; a ConfigError lists the valid names otherwise."""
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return load_method(METHODS[key])


__all__ = ["METHODS", "Method", "Params", "Trace", "get_method", "param"]
