"""Config: YAML then flags (flags win), types checked, every problem reported at once, by name."""

from __future__ import annotations

import pytest

from qlorakit.cli import main
from qlorakit.config import ConfigError, build_config


def test_defaults_are_the_embedded_job():
    cfg = build_config([])
    assert cfg.model_name_or_path == "default" and cfg.dataset == "default"
    assert (cfg.bits, cfg.quant_type, cfg.double_quant, cfg.lora_modules) == (4, "nf4", True, "all")


def test_yaml_then_flags(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("learning_rate: 0.001\nlora_r: 8\ngroup_by_length: true\nlora_modules: [q_proj, v_proj]\n")
    cfg = build_config([str(y), "--lora_r", "32", "--bf16", "false"])
    assert cfg.learning_rate == 0.001 and cfg.lora_r == 32 and cfg.bf16 == "false" and cfg.group_by_length is True
    assert cfg.lora_modules == "q_proj,v_proj"


def test_mpt_flag_accepted():
    assert build_config(["--mpt", "true"]).mpt is True


def test_every_problem_reported_at_once(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("lerning_rate: 0.1\nbits: 3\n")
    with pytest.raises(ConfigError) as e:
        build_config([str(y), "--bf16", "maybe", "--optim", "adam", "--per_device_train_batch_size", "0"])
    msg = str(e.value)
    for part in ("lerning_rate", "did you mean 'learning_rate'", "bits", "bf16", "'maybe'", "optim",
                 "per_device_train_batch_size", str(y)):
        assert part in msg, part


def test_cli_reports_config_error_in_one_line(capsys):
    assert main(["train", "--no_such_key", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_key" in err and "Traceback" not in err


def test_bad_yaml_names_line(tmp_path, capsys):
    y = tmp_path / "broken.yaml"
    y.write_text("lora_r: 8\nlearning_rate: [1,\n")
    assert main(["train", str(y)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml:" in err and "Traceback" not in err


def test_nproc_starts_torchrun_with_the_other_arguments(monkeypatch, tmp_path):
    """``train --nproc N`` hands every other argument, unchanged, to the torchrun workers; N = 1 trains here."""
    from qlorakit import cli

    started = []
    monkeypatch.setattr(cli, "_torchrun", lambda n, argv: started.append((n, argv)) or 0)
    y = tmp_path / "run.yaml"
    y.write_text("lora_r: 8\n")
    assert main(["train", str(y), "--nproc", "2", "--max_steps", "3", "--learning-rate=0.01"]) == 0
    assert main(["train", "--nproc=4", "--fsdp", "true"]) == 0
    assert started == [(2, [str(y), "--max_steps", "3", "--learning-rate=0.01"]), (4, ["--fsdp", "true"])]
    assert cli.train_args(["--max_steps", "3", "--nproc", "1"])[1] == 1
    with pytest.raises(ConfigError, match="unknown key 'nproc'"):
        build_config(["--nproc", "2"])  # a launcher option, not a key of the run's config


def test_nproc_reports_a_bad_dataset_before_starting_torchrun(monkeypatch, tmp_path, capsys):
    """One line from the launcher, not one per worker."""
    from qlorakit import cli

    started = []
    monkeypatch.setattr(cli, "_torchrun", lambda n, argv: started.append((n, argv)) or 0)
    for spec, want in [("a.jsonl:wieght=2", "unknown option 'wieght'"),
                       (str(tmp_path / "gone.jsonl"), "gone.jsonl: no such file")]:
        assert main(["train", "--nproc", "2", "--dataset", spec]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err, err
    assert started == []


def test_a_fraction_for_an_integer_key_is_an_error(tmp_path):
    """YAML's 2.5 for an integer key is refused with the key and the file, not cut to 2; 2.0 is 2."""
    y = tmp_path / "run.yaml"
    y.write_text("max_steps: 2.5\nlora_r: 8.0\n")
    with pytest.raises(ConfigError) as e:
        build_config([str(y)])
    assert "max_steps: 2.5 (from" in str(e.value) and str(y) in str(e.value) and "not an integer" in str(e.value)
    y.write_text("max_steps: 2.0\n")
    assert build_config([str(y)]).max_steps == 2


MIXTURE_YAML = """datasets:
  - path: a.jsonl
    weight: 0.7
  - path: b.parquet
    format: alpaca
    max_rows: 500
    columns: {instruction: question}
eval_datasets:
  - path: e.csv
"""


def test_a_yaml_datasets_list_is_read_saved_and_loaded_with_the_run(tmp_path):
    from qlorakit.config import load_run_config, save_config

    y = tmp_path / "run.yaml"
    y.write_text(MIXTURE_YAML)
    cfg = build_config([str(y), "--data_num_proc", "2", "--data_cache_dir", str(tmp_path / "cache")])
    assert cfg.datasets == [{"path": "a.jsonl", "weight": 0.7},
                            {"path": "b.parquet", "format": "alpaca", "max_rows": 500,
                             "columns": {"instruction": "question"}}]
    assert cfg.eval_datasets == [{"path": "e.csv"}] and cfg.dataset == "default"
    assert (cfg.data_num_proc, cfg.data_cache_dir) == (2, str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "qlorakit_config.yaml")
    assert load_run_config(run) == cfg
    # the same list as a flag, in YAML flow style; a defaulted config keeps an empty list of its own
    flag = build_config(["--datasets", "[{path: a.jsonl, weight: 0.7}, {path: b.parquet}]"])
    assert flag.datasets == [{"path": "a.jsonl", "weight": 0.7}, {"path": "b.parquet"}]
    assert build_config([]).datasets == [] and build_config([]).datasets is not build_config([]).datasets


def test_data_given_twice_or_malformed_is_one_line_naming_it(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text(MIXTURE_YAML + "dataset: c.jsonl\n")
    with pytest.raises(ConfigError, match="dataset and datasets are both set; give the data as dataset"):
        build_config([str(y)])
    # a flag giving the data in one form replaces the file's other form
    assert build_config([str(y), "--datasets", "[{path: d.jsonl}]"]).dataset == "default"
    only = tmp_path / "only.yaml"
    only.write_text(MIXTURE_YAML)
    flagged = build_config([str(only), "--dataset", "d.jsonl:0.5"])
    assert flagged.dataset == "d.jsonl:0.5" and flagged.datasets == [] and flagged.eval_datasets == [{"path": "e.csv"}]
    for value, want in [("a.jsonl:0.7", "is not a non-empty list of datasets"), ("[3]", "datasets[0]: 3"),
                        ("[{path: a", "is not a YAML list")]:
        with pytest.raises(ConfigError, match=want.replace("[", r"\[")):
            build_config(["--datasets", value])
    for spec, want in [("a.jsonl:wieght=2", "dataset 'a.jsonl:wieght=2': unknown option 'wieght'"),
                       ("a.jsonl:0.5:max_rows=3", "dataset 'a.jsonl:0.5:max_rows=3': give a weight or max_rows"),
                       ("a.jsonl,,b.jsonl", "has an empty dataset entry")]:
        assert main(["train", "--dataset", spec, "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err and "Traceback" not in err, err
    y.write_text("datasets:\n  - path: a.jsonl\n    wieght: 2\n")
    assert main(["train", str(y), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "datasets[0]: wieght: unknown key" in err, err


def test_train_help_shows_the_data_keys(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for key in ("--datasets YAML_LIST", "--eval_datasets YAML_LIST", "--data_cache_dir TEXT", "--data_num_proc N",
                "auto|airoboros|alpaca|messages|sharegpt", "a.jsonl:0.7,b.parquet:max_rows=500 or"):
        assert key in out, key
