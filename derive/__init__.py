"""derive: columnar batch derivation of audience state, metric rollups and attribution."""

__version__ = "0.1.0"
