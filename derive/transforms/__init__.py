"""Pure transforms: Polars frames in, Polars frames out. No I/O, no clock, no logging."""
