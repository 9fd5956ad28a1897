"""The compression workbench: compress networks and compare them across model x method x hardware.

Where things live (see ../shared/ARCHITECTURE.md of the project):
    contract.py      the names code, scripts, notebooks and tests agree on (metrics, tags, artifacts)
    experiment.py    run_experiment(cfg): baseline -> compress -> finalize -> evaluate -> track
    data.py          DataModules (bundled mnist5k/digits, torchvision downloads)
    models/          architectures
    task.py          ClassificationTask (the LightningModule)
    compression/     one module per method family, each method a Lightning callback
    evaluation/      accuracy, size, MACs, latency of the finalized artifact
    tracking.py      the MLflow store, runs, baseline lookup
    sweep.py         the Hydra callback around a multirun (parent run, validation, grid table), job lookups
    config.py        validation of a composed config before any work
"""
