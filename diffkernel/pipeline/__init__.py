"""The pipeline's stages and the two executors: in memory (MakeKernelTask) and Dask."""
