"""The workbench's Optuna sweeper for Hydra (`hydra/sweeper=optuna`, conf/hydra/sweeper/optuna.yaml).

Ours rather than hydra-optuna-sweeper 1.3.0: that plugin requires optuna>=2.10,<3, and Optuna 2.10's
RDB storage fails on the SQLAlchemy 2 that MLflow 3 brings (a study in SQLite could not persist, so a
killed search could not resume); it also has no way to record a constraint from the job's metrics.
The search itself is lightning_modules/search.py; this package only wires it to Hydra.
"""
