"""Stage 3, the spec compiled to torch: layers and priors, expression ops, the Model with its
per-phase step plans and optimisers, CUDA-graph replay, and the processes of a distributed run.
"""
