"""report_to: the trackers get the step metrics, the config and the model card, offline (no server anywhere);
metrics.jsonl stays."""

from __future__ import annotations

import json
import sqlite3

import pytest

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main


@pytest.fixture(scope="module")
def tracked_run(tiny_llama, tmp_path_factory):
    """One 3-step run reporting to TensorBoard, trackio (its local store) and MLflow (its local store)."""
    d = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRACKIO_DIR", str(d / "trackio"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_jsonl(d / "d.jsonl", airoboros_rows(8))
    out = d / "run"
    try:
        assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir",
                     str(out), "--max_steps", "3", "--per_device_train_batch_size", "2", "--eval_dataset_size", "2",
                     "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "no", "--bf16", "false",
                     "--report_to", "tensorboard", "trackio", "mlflow", "--run_name", "tiny"]) == 0
    finally:
        mp.undo()
    return out, d / "trackio"


def test_tensorboard_scalars_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tracked_run
    events = EventAccumulator(str(out / "tensorboard" / "tiny"))
    events.Reload()
    steps = read_metrics(out, "loss")
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    lr = [(e.step, e.value) for e in events.Scalars("learning_rate")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]  # the same rows as the jsonl
    assert lr == [(r["step"], pytest.approx(r["learning_rate"], rel=1e-6)) for r in steps] and len(lr) == 3
    assert [e.step for e in events.Scalars("eval_loss")] == [3]
    assert "model_card/text_summary" in events.Tags()["tensors"]


def test_trackio_keeps_the_metrics_config_and_card_locally(tracked_run):
    _, store = tracked_run
    db = sqlite3.connect(store / "qlorakit.db")
    rows = [json.loads(m) for (m,) in db.execute("select metrics from metrics order by step")]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in read_metrics(tracked_run[0], "loss")]
    assert any(r.get("model_card", "").startswith("---\nlicense:") for r in rows)
    (config,) = [json.loads(c) for (c,) in db.execute("select config from configs")]
    assert config["max_steps"] == 3 and config["report_to"] == "tensorboard,trackio,mlflow"


def test_mlflow_local_store_has_the_metrics_params_and_card(tracked_run):
    from mlflow.tracking import MlflowClient

    out, _ = tracked_run
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "qlorakit"])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == \
        pytest.approx([r["loss"] for r in read_metrics(out, "loss")])
    assert run.data.params["lora_r"] == "16" and run.info.run_name == "tiny"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["README.md"]


def test_a_tracker_that_is_not_installed_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's mark of a module that cannot be imported
    assert main(["train", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "o"),
                 "--dataset", str(write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))), "--max_steps", "1",
                 "--report_to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "error: report_to: wandb is not installed; pip install 'qlorakit[wandb]'" in err and "Traceback" not in err
    assert "no-model" not in err  # said before the model was looked for
