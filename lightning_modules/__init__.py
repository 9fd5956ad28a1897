"""The compression workbench: compress networks and compare them across model x method x hardware.

Where things live (see ../shared/ARCHITECTURE.md of the project):
    contract.py      the names code, scripts, notebooks and tests agree on (metrics, tags, artifacts)
    experiment.py    run_experiment(cfg): baseline -> compress -> finalize -> evaluate -> track
    data.py          DataModules (bundled mnist5k/digits, torchvision downloads)
    models/          architectures
    task.py          ClassificationTask (the LightningModule)
    compression/     one module per method family, each method a Lightning callback; base.py holds
                     the protocol and the shared kit (argument checks, select_layers, masks)
    evaluation/      accuracy, size, MACs, latency of the finalized artifact
    layers.py        layer helpers both sides use (weighted layers, per-layer table, parameter counts, fx)
    deployable_int8.py  the int8 model quantization builds and evaluation runs (custom ops, ONNX, PT2E)
    tracking.py      the MLflow store, runs, baseline lookup
    sweep.py         the Hydra callback around a multirun (parent run, validation, grid table), job lookups
    config.py        validation of a composed config before any work
Imports run one way: compression/ never imports evaluation/, tracking, experiment or sweep (what it
needs from them, the timing of min_speedup, is handed over: CompressionCallback.attach_timer).
"""
