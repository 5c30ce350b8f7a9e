"""Bad data is reported before any model weights are touched: with the embedded default (a GGUF whose weights are
converted once into a cache folder), a bad row ends the run in one line and nothing was converted."""

from __future__ import annotations

from helpers import write_jsonl
from qlorakit.cli import main


def test_bad_row_is_reported_before_the_default_model_is_converted(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "qlorakit-cache"
    monkeypatch.setenv("QLORAKIT_CACHE", str(cache))  # no converted default model here
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    assert main(["train", "--dataset", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "bad.jsonl:2: missing field 'response'" in err
    assert not (cache / "models").exists()  # the weights were never converted
