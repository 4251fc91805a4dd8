"""The Dask executor: cluster connection, worker task functions and the driver."""
