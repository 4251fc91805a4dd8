"""The numerical core: kernel bases, candidate statistics, fits, clipping, the spatial
model, convolution and subtraction. Pure functions on arrays; no I/O, no Dask."""
