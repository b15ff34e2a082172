"""runtime: running a model's levels (level switches, sparse kernels, the runnable ``LoadedModel``)."""
