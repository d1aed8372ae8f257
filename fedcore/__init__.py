"""fedgate's shared kernel: wire formats, crypto envelope, model spec, settings, errors.

Imports no service package (gateway, edge_runtime, trainer) and no composition root.
"""
