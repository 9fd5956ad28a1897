"""The real configs compose, and every bad value fails before any work with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules.config import ConfigError, validate
from tests.conftest import CONF, FAST, all_runs, compose_config, run_train


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "method", "hardware", "trainer", "tracking", "experiment"])
def test_every_option_of_every_group_composes_and_validates(group: str) -> None:
    options = _options(group)
    assert options, f"conf/{group}/ has no options"
    for option in options:
        cfg = compose_config([f"{group}={option}"])
        if group == "hardware" and cfg.hardware.device == "cuda" and not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="needs a CUDA GPU"):
                validate(cfg)
            continue
        validate(cfg)


def test_method_entries_land_under_method_callbacks() -> None:
    cfg = compose_config(["method=magnitude", "method.sparsity=0.6"])
    assert cfg.method.callbacks.prune._target_.endswith("pruning.MagnitudePruning")
    assert cfg.method.callbacks.prune.sparsity == 0.6  # follows the shared sweep axis


def test_hardware_files_are_deltas_on_cpu() -> None:
    cfg = compose_config(["hardware=cpu_1t"])
    assert cfg.hardware.threads == 1
    assert list(cfg.hardware.latency.batch_sizes) == [1, 32]  # inherited from cpu.yaml


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["seed=-1"], r"seed=-1 is not valid; allowed: an integer >= 0"),
        (["hardware.device=tpu"], r"hardware.device='tpu' is not valid; allowed: cpu, cuda"),
        (["hardware.threads=0"], r"hardware.threads=0 is not valid; allowed: an integer >= 1 or null"),
        (["hardware.runtime=tensorrt"], r"hardware.runtime='tensorrt' is not valid; allowed: torch"),
        (["hardware.latency.batch_sizes=[]"], r"hardware.latency.batch_sizes=.* allowed: a non-empty list"),
        (["hardware.latency.batch_sizes=[1,0]"], r"hardware.latency.batch_sizes\[1\]=0 is not valid"),
        (["hardware.latency.repeats=0"], r"hardware.latency.repeats=0 is not valid; allowed: an integer >= 1"),
        (["data.name=imagenet"], r"data.name='imagenet' is not valid; allowed: mnist5k, digits, mnist, fashion_mnist, cifar10"),
        (["data.batch_size=0"], r"data.batch_size=0 is not valid"),
        (["baseline.epochs=0"], r"baseline.epochs=0 is not valid; allowed: an integer >= 1"),
        (["baseline.optimizer._target_=torch.optim.Nope"], r"baseline.optimizer._target_='torch.optim.Nope' cannot be imported"),
        (["model.net._target_=nowhere.Net"], r"model.net._target_='nowhere.Net' cannot be imported"),
        (["method=magnitude", "method.sparsity=1.5"],
         r"method.callbacks.prune: sparsity=1.5 is not valid; allowed: a fraction in \[0, 1\)"),
        (["method=magnitude", "method.callbacks.prune.scope=row"],
         r"method.callbacks.prune: scope='row' is not valid; allowed: global, layer"),
        (["method=magnitude", "method.callbacks.prune.criterion=taylorr"],
         r"method.callbacks.prune: criterion='taylorr' is not valid; allowed: magnitude, random"),
        (["method=magnitude", "method.fine_tune.epochs=-1"], r"method.fine_tune.epochs=-1 is not valid; allowed: an integer >= 0"),
        (["method=magnitude", "method.callbacks.prune._target_=torch.nn.Linear"], r"method.callbacks.prune"),
        (["tracking.baseline_wait_s=-5"], r"tracking.baseline_wait_s=-5 is not valid; allowed: a number of seconds >= 0"),
        (["tracking.experiment="], r"tracking.experiment=.* allowed: a non-empty MLflow experiment name"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"hardware=cuda needs a CUDA GPU.*choose hardware=cpu or hardware=cpu_1t"):
        validate(compose_config(["hardware=cuda"]))


@pytest.mark.slow
def test_unknown_group_option_lists_the_choices_and_writes_nothing(tmp_path: Path, store_uri: str) -> None:
    result = run_train(["model=lenet7", *FAST], tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/lenet7'" in result.stderr
    assert "lenet300" in result.stderr and "resnet20" in result.stderr  # Hydra lists the options
    assert all_runs(store_uri) == []


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_stops_it_before_any_job(tmp_path: Path, store_uri: str) -> None:
    result = run_train(["-m", *FAST, "method=baseline", "seed=0,-1"], tmp_path)
    assert result.returncode != 0
    assert "seed=-1 is not valid; allowed: an integer >= 0" in result.stderr
    assert not (tmp_path / "store" / "mlflow.db").exists()  # nothing trained, nothing half-written


def test_a_method_value_beside_a_method_sweep_is_set_in_each_job() -> None:
    import train

    argv = ["train.py", "-m", "method=agp,channel", "method.sparsity=0.9", "method.fine_tune.epochs=5",
            "method.sparsity_list=[1,2]", "++method.x=1", "model=lenet5", "method.rank=0.1,0.2"]
    assert train.method_values_per_job(argv) == [
        "train.py", "-m", "method=agp,channel", "method.sparsity=choice(0.9)", "method.fine_tune.epochs=choice(5)",
        "method.sparsity_list=choice([1,2])", "++method.x=1", "model=lenet5", "method.rank=0.1,0.2"]
    assert train.method_values_per_job(["train.py", "method=agp", "method.sparsity=0.9"]) == [
        "train.py", "method=agp", "method.sparsity=0.9"]  # a single run composes its own method


@pytest.mark.slow
def test_a_method_value_beside_a_method_sweep_is_refused_only_for_the_job_that_lacks_it(tmp_path: Path) -> None:
    """Hydra composed the sweep's base config with the baseline, which has no sparsity: it failed there with
    "use +method.sparsity", which then fails on agp. Now each job gets the value, and ptq_static, which
    has no sparsity, is named before anything runs."""
    result = run_train(["-m", *FAST, "method=agp,ptq_static", "method.sparsity=0.9"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "method=ptq_static" in result.stderr and "Could not override 'method.sparsity'" in result.stderr
    assert "model=lenet5 method=agp" not in result.stderr  # the agp job composes
    assert not (tmp_path / "store" / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "env", "expected"),
    [
        (["tracking.uri=sqlite:////cli/mlflow.db"], "sqlite:////env/mlflow.db", "sqlite:////cli/mlflow.db"),
        (["++tracking.uri=sqlite:////cli/mlflow.db"], "sqlite:////env/mlflow.db", "sqlite:////cli/mlflow.db"),
        (["tracking=server"], "sqlite:////env/mlflow.db", "sqlite:////env/mlflow.db"),  # the file's uri: env wins
        (["tracking=server"], None, "http://127.0.0.1:5000"),
        ([], "sqlite:////env/mlflow.db", "sqlite:////env/mlflow.db"),
        (["tracking.store_dir=/default"], None, "sqlite:////default/mlflow.db"),
    ],
)
def test_the_command_line_wins_over_the_environment_which_wins_over_the_config(
        overrides: list[str], env: str | None, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a Hydra app sees it: the command line's overrides are in HydraConfig (what train.py and the
    sweep's jobs read), and given explicitly (what the sweep's launcher passes)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lightning_modules.contract import URI_ENV
    from lightning_modules.tracking import Store

    if env is None:
        monkeypatch.delenv(URI_ENV, raising=False)
    else:
        monkeypatch.setenv(URI_ENV, env)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert Store.from_config(cfg.tracking, overrides).uri == expected
    HydraConfig.instance().set_config(cfg)
    try:
        assert Store.from_config(cfg.tracking).uri == expected
    finally:
        HydraConfig.instance().cfg = None


def test_the_command_line_wins_over_workbench_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_ROOT", "/from/env")
    assert compose_config([]).paths.root == "/from/env"
    assert compose_config(["paths.root=/from/cli"]).paths.root == "/from/cli"
