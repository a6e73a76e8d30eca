"""LESS (Xia et al., 2024): the pure scoring core (:mod:`.core`) and its backends on top, the one-process stream
(:mod:`.stream`) and Dask (:mod:`.dask`)."""
