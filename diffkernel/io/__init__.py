"""Reading and writing: FITS and NDData inputs, Zarr image groups and result stores."""
