"""Stage 2, the dependency graph of a validated spec (networkx), its picture, and the front half of
the pipeline (`load_spec`: load -> resolve -> validate -> graph). Torch-free.
"""
