"""The Dask executor: cluster, runner, tasks, checks, pre-fit work, fitting, provenance, driver."""
