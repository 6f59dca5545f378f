"""Stage 1, the spec language: load YAML with its locations, resolve extends and --set, expand sweeps,
parse rows and expressions, validate against the schema and the registry, infer shapes. Torch-free.
"""
