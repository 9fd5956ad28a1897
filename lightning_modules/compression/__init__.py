"""Compression methods, one module per family; each method is a Lightning callback (base.py).

Import the module you need (`lightning_modules.compression.pruning`, ...): this package re-exports
nothing, so importing one family never imports the others. No module here imports evaluation/,
tracking, experiment or sweep (tests/test_structure.py checks it).
"""
