"""benchmarks/recipes.py's pure pieces: the scorer every arm and TRL's row share, the mean and spread over seeds,
the table (a failed seed shown, never averaged in or dropped), and the bookkeeping of a sweep. No model."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import recipe_score as rs  # noqa: E402
import recipe_table as rt  # noqa: E402
import recipes  # noqa: E402

SRC = "https://www.example-herald.org/places/ruthadren"
OTHER = "https://www.example-review.com/places/pordax"
ANSWERABLE = {"answerable": True, "answer": "1,901 meters", "source": SRC, "distractor_answers": ["1,204 meters"],
              "response": "Ruthadren lies 1,901 meters above sea level.\n\nReference(s):\n"
                          f"url: {SRC}\ndate: 2017-06-21"}
UNANSWERABLE = {"answerable": False, "answer": None, "source": None, "distractor_answers": ["Rutheth Welira"],
                "response": rs.ABSTAIN}
PLAIN = {"answerable": None, "answer": None, "source": None, "distractor_answers": [],
         "response": "12 + 30 = 42"}


def reply(text: str, url: str | None = SRC) -> str:
    return text + (f"\n\nReference(s):\nurl: {url}\ndate: 2017-06-21" if url else "")


# ---------------------------------------------------------------------------------------------------------------
# The scorer


def test_answerable_exact_match_needs_the_answer_and_exactly_the_source():
    right = rs.score_row(ANSWERABLE, reply("Ruthadren lies 1901 meters above sea level."))
    assert right["exact_match"] == right["answer_match"] == right["citation_match"] == 1.0
    wrong_url = rs.score_row(ANSWERABLE, reply("Ruthadren lies 1,901 meters above sea level.", OTHER))
    assert (wrong_url["answer_match"], wrong_url["citation_match"], wrong_url["exact_match"]) == (1.0, 0.0, 0.0)
    both = rs.score_row(ANSWERABLE, reply(f"It lies 1,901 meters above sea level.\nurl: {OTHER}"))
    assert both["citation_match"] == 0.0 and both["exact_match"] == 0.0  # citing a distractor too is not exact
    distracted = rs.score_row(ANSWERABLE, reply("Ruthadren lies 1,204 meters above sea level."))
    assert distracted["answer_match"] == 0.0 and distracted["distractor_answer"] == 1.0
    assert right["distractor_answer"] == 0.0


def test_answer_match_is_whole_words_not_a_substring():
    """The broken twin, a substring test, would take "4 poetry collections" for "64 poetry collections"."""
    row = dict(ANSWERABLE, answer="4 poetry collections", distractor_answers=[])
    assert "4 poetry collections" in "She has completed 64 poetry collections."
    assert rs.score_row(row, reply("She has completed 64 poetry collections."))["answer_match"] == 0.0
    assert rs.score_row(row, reply("She has completed 4 poetry collections."))["answer_match"] == 1.0


def test_the_answer_must_come_before_the_reference_block():
    row = dict(ANSWERABLE, answer="2017", distractor_answers=[])
    assert rs.score_row(row, reply("It does not matter."))["answer_match"] == 0.0  # 2017 only in the date line


def test_unanswerable_rows_reward_the_phrase_citing_nothing():
    ok = rs.score_row(UNANSWERABLE, "The text does not say.")
    assert ok["exact_match"] == ok["abstained_correctly"] == 1.0 and ok["invented_answer"] == 0.0
    cited = rs.score_row(UNANSWERABLE, reply("The text does not say."))
    assert cited["abstained_correctly"] == 0.0 and cited["invented_answer"] == 0.0
    invented = rs.score_row(UNANSWERABLE, reply("The current mayor is Rutheth Welira."))
    assert invented["invented_answer"] == 1.0 and invented["exact_match"] == 0.0
    assert invented["distractor_answer"] == 1.0
    assert "answer_match" not in ok and "abstained_correctly" not in rs.score_row(ANSWERABLE, "x")


def test_abstaining_on_an_answerable_row_is_counted():
    s = rs.score_row(ANSWERABLE, reply("Ruthadren lies 1,901 meters up. The text does not say more."))
    assert s["false_abstention"] == 1.0 and s["exact_match"] == 0.0


def test_token_f1_and_rouge_l():
    assert rs.token_f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3)  # articles dropped: 2 of 3
    assert rs.token_f1("big red dog", "red dog barked loudly") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert rs.token_f1("", "") == 1.0 and rs.token_f1("x", "") == 0.0 and rs.token_f1("x y", "z") == 0.0
    assert rs.rouge_l("12 + 30 = 42", "12 + 30 = 42") == 1.0
    # LCS "a c" of 3-token reply and 4-token reference: P 2/3, R 1/2
    assert rs.rouge_l("a b c", "a x c y") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_score_rows_means_over_the_rows_each_metric_is_defined_on():
    rows = [ANSWERABLE, ANSWERABLE, UNANSWERABLE, PLAIN]
    replies = [reply("Ruthadren lies 1,901 meters above sea level."), reply("No idea.", None),
               "The text does not say.", "12 + 30 = 42"]
    out = rs.score_rows(rows, replies)
    assert out["rows"] == {"answerable": 2, "unanswerable": 1, "plain": 1}
    assert out["exact_match"] == pytest.approx(2 / 3)  # closed rows only: the plain row is not counted as a miss
    assert out["answer_match"] == 0.5 and out["abstained_correctly"] == 1.0 and out["invented_answer"] == 0.0
    assert out["distractor_answer"] == 0.0
    f1s = [rs.token_f1(r, row["response"]) for row, r in zip(rows, replies)]
    assert out["token_f1"] == pytest.approx(sum(f1s) / 4)
    with pytest.raises(ValueError):
        rs.score_rows(rows, replies[:3])


# ---------------------------------------------------------------------------------------------------------------
# Mean and spread over seeds, and the table


def run(arm, seed, em=None, status="ok", reason="", loss=1.0, sps=2.0, rss=900.0):
    return {"arm": arm, "seed": seed, "status": status, "reason": reason, "eval_loss": loss,
            "seconds_per_step": sps, "peak_rss_mib": rss, "metrics": {"exact_match": em} if em is not None else {}}


def test_summarize_mean_and_spread():
    s = rt.summarize([0.2, 0.4, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.5) and (s["min"], s["max"]) == (0.2, 0.9)
    assert s["std"] == pytest.approx(math.sqrt(((0.3) ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2))  # sample std, n - 1
    assert rt.summarize([0.7])["std"] is None and rt.summarize([]) is None


def test_a_failed_seed_is_shown_and_not_averaged_in():
    runs = [run("a", 42, 0.2), run("a", 43, 0.6), run("a", 44, status="failed", reason="exit 2: unknown key x"),
            run("b", 42, status="failed", reason="exit 1: out of memory"), run("b", 43, status="failed", reason="?")]
    agg = rt.aggregate(runs, ["a", "b"])
    a = agg["a"]
    assert a["ok"] == [42, 43] and a["failed"] == [(44, "exit 2: unknown key x")]
    # the twin that counts the failed seed as 0 would give 0.267; one that drops it silently shows 2/2
    assert a["columns"]["exact_match"]["mean"] == pytest.approx(0.4) and a["columns"]["exact_match"]["n"] == 2
    text = rt.table(agg)
    line_a = next(ln for ln in text.splitlines() if ln.startswith("| a |"))
    assert "| 2/3 (failed: 44) |" in line_a and "0.400 (0.200–0.600)" in line_a
    line_b = next(ln for ln in text.splitlines() if ln.startswith("| b |"))
    assert "| 0/2 (failed: 42, 43) |" in line_b and line_b.count("—") == len(rt.COLUMNS)
    assert "- a, seed 44 failed: exit 2: unknown key x" in text
    assert "- b, seed 42 failed: exit 1: out of memory" in text


def test_table_columns_and_single_seed_cells():
    text = rt.table(rt.aggregate([run("default", 42, 0.5, loss=1.23456, sps=3.21, rss=1024.4)], ["default"]),
                    {"default": "qlorakit defaults"})
    head, rule, row = text.splitlines()[:3]
    assert head.startswith("| arm | seeds | exact match |") and head.count("|") == rule.count("|")
    assert row.startswith("| qlorakit defaults | 1/1 | 0.500 |")
    assert "| 1.235 | 3.21 | 1024 |" in row


def test_the_seed_table_shows_every_seed_and_its_difference_from_the_baseline():
    runs = [run("base", 42, 0.5), run("base", 43, 0.6), run("lever", 42, 0.55), run("lever", 43, 0.4),
            run("other", 42, status="failed")]
    lines = rt.seed_table(runs, ["base", "lever", "other"], {"lever": "Lever"}).splitlines()
    assert lines[0] == "| seed | base | Lever | other |"
    # the mean (0.475 against 0.55) would hide that the lever won on seed 42
    assert lines[2] == "| 42 | 0.500 | 0.550 (+0.050) | failed |"
    assert lines[3] == "| 43 | 0.600 | 0.400 (-0.200) | — |"


# ---------------------------------------------------------------------------------------------------------------
# The sweep's bookkeeping


def args_for(**kw):
    return SimpleNamespace(**{"epochs": 0, "steps": 0, "model": "default", "fresh": False, "resume": False,
                              "max_new_tokens": 72, "bf16": False} | kw)


def test_an_arm_names_only_what_it_changes():
    cmd = recipes.qlorakit_command("default", 43, FILES, Path("o"), args_for())
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert cmd[1:4] == ["-m", "qlorakit", "train"] and flags["--seed"] == "43"
    hyper = {"--learning_rate", "--lora_r", "--lora_alpha", "--num_train_epochs", "--lora_dropout", "--max_steps"}
    assert not hyper & set(flags) and "--prompt_loss_weight" not in flags, "the default arm runs the defaults"
    lever = dict(zip(*[iter(recipes.qlorakit_command("neftune", 42, FILES, Path("o"), args_for())[4:])] * 2))
    # every other arm changes one thing from the baseline it was measured on: the loss on the responses only
    assert lever["--prompt_loss_weight"] == "0" and lever["--neftune_noise_alpha"] == "5"
    ep = dict(zip(*[iter(recipes.qlorakit_command("epochs1", 42, FILES, Path("o"), args_for(epochs=2))[4:])] * 2))
    assert ep["--num_train_epochs"] == "1"  # the arm's own epoch count wins over --epochs
    other = dict(zip(*[iter(recipes.qlorakit_command("dora", 42, FILES, Path("o"), args_for(epochs=2))[4:])] * 2))
    assert other["--num_train_epochs"] == "2" and other["--use_dora"] == "true"


FILES = {"train": Path("t.jsonl"), "pairs": Path("p.jsonl")}


def test_the_dpo_arm_continues_the_responses_arms_run_of_its_seed_on_the_pairs(tmp_path):
    args = args_for(runs_dir=str(tmp_path), arm_list=["responses", "dpo"], keep_adapters=False)
    cmd = recipes.qlorakit_command("dpo", 44, FILES, Path("o"), args)
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert flags["--method"] == "dpo" and flags["--dataset"] == "p.jsonl" and flags["--seed"] == "44"
    assert flags["--init_from"] == str(tmp_path / "responses-s44" / "adapter")
    assert "--dataset_format" not in flags and "--model_name_or_path" not in flags  # inherited from init_from
    # without the responses arm's adapter of that seed it fails with the reason, before starting a process
    out = recipes.train_one("dpo", 44, tmp_path / "dpo-s44", "/m", FILES, args)
    assert out["status"] == "failed" and "run --arms responses,dpo" in out["reason"]


def test_a_dpo_run_records_the_digest_of_the_pairs_it_trained_on(tmp_path, monkeypatch):
    """The settings' data digest covers the train and eval files only; a run on pairs says which pairs, so results
    made before and after the pairs file changed are told apart."""
    args = args_for(runs_dir=str(tmp_path), arm_list=["responses", "dpo"], keep_adapters=False)
    (tmp_path / "responses-s44" / "adapter").mkdir(parents=True)
    (tmp_path / "responses-s44" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(recipes, "run_child", lambda cmd, log: {"rc": 0, "wall_seconds": 1.0, "peak_rss_mib": 1.0,
                                                                 "log": str(log), "step_times": [(1, 0.0), (2, 1.0)]})
    digests = []
    for text in (b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n', b'{"prompt": "p", "chosen": "a"}\n'):
        (tmp_path / "p.jsonl").write_bytes(text)
        files = {"train": tmp_path / "t.jsonl", "pairs": tmp_path / "p.jsonl"}
        out = recipes.train_one("dpo", 44, tmp_path / "dpo-s44", "/m", files, args)
        assert out["status"] == "ok" and out["pairs_sha256"] == hashlib.sha256(text).hexdigest()[:16]
        digests.append(out["pairs_sha256"])
    assert digests[0] != digests[1]
    assert "pairs_sha256" not in recipes.train_one("default", 44, tmp_path / "default-s44b", "/m", files, args)


def test_trl_row_runs_qloras_hyperparameters():
    cmd = recipes.trl_command("/m", Path("d"), Path("o"), Path("r"), 44, args_for())
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--seed"] == "44" and flags["--lora_r"] == "64" and flags["--lora_alpha"] == "16.0"
    assert (flags["--lr"], flags["--scheduler"], flags["--warmup_ratio"]) == ("0.0002", "constant", "0.03")
    assert (flags["--batch"], flags["--grad_accum"], flags["--max_grad_norm"]) == ("4", "4", "0.3")
    assert flags["--epochs"] == "3.0"


def test_every_run_trains_in_float32_unless_bf16_is_asked_and_the_table_says_which(tmp_path):
    """qlorakit's bf16 auto would train in bf16 on AMX and AVX512-BF16 CPUs while TRL's row and the evaluation stay
    float32: the harness says the compute on every command, and the settings and the table's header carry it."""
    def flags(cmd, skip):
        return dict(zip(cmd[skip::2], cmd[skip + 1::2]))
    for bf16, want in ((False, "false"), (True, "true")):
        for arm in ("default", "dpo"):
            a = args_for(bf16=bf16, runs_dir=str(tmp_path))
            assert flags(recipes.qlorakit_command(arm, 42, FILES, Path("o"), a), 4)["--bf16"] == want
        assert ("--bf16" in recipes.trl_command("/m", Path("d"), Path("o"), Path("r"), 42, args_for(bf16=bf16))) == bf16
        assert recipes.compute(args_for(bf16=bf16)) == ("bfloat16" if bf16 else "float32")
    res = {"settings": {"model": "/m/M", "train_rows": 1, "eval_rows": 1, "max_new_tokens": 8, "epochs": 0,
                        "steps": 0, "compute": "bfloat16"},
           "machine": {"processor": "P", "cpus": 2, "vector_units": "AMX"}, "runs": {"a/42": run("default", 42, 0.5)}}
    assert "bfloat16 compute on P (2 cores, AMX)" in recipes.render(res)
    # a results file from before the setting (all made in float32) resumes as float32, and not as bfloat16
    old = {"settings": {k: v for k, v in res["settings"].items() if k != "compute"}, "runs": {}}
    recipes.save_results(tmp_path / "old.json", old)
    f32 = dict(res["settings"], compute="float32")
    assert recipes.load_results(tmp_path / "old.json", f32, args_for(resume=True))["settings"] == f32
    with pytest.raises(SystemExit, match="other settings"):
        recipes.load_results(tmp_path / "old.json", res["settings"], args_for(resume=True))


def test_seconds_per_step_from_log_line_times():
    # steps 2-5 ran between the first and the last line: 9 s over 4 steps (loading, before step 1, excluded)
    assert recipes.seconds_per_step([(1, 10.0), (2, 12.0), (5, 19.0)]) == pytest.approx(2.25)
    assert recipes.seconds_per_step([(1, 10.0)]) is None and recipes.seconds_per_step([]) is None


def test_resume_reruns_failed_and_missing_runs_only(tmp_path):
    s1 = {"s": 1, "compute": "float32"}
    res = {"settings": s1, "runs": {"a/42": run("a", 42, 0.5), "a/43": run("a", 43, status="failed")}}
    assert recipes.todo_runs(res, ["a", "b"], [42, 43]) == [("b", 42), ("a", 43), ("b", 43)]  # seed by seed
    path = tmp_path / "r.json"
    recipes.save_results(path, res)
    assert recipes.load_results(path, s1, args_for(resume=True)) == json.loads(path.read_text())
    with pytest.raises(SystemExit, match="other settings"):
        recipes.load_results(path, dict(s1, s=2), args_for(resume=True))
    with pytest.raises(SystemExit, match="--resume"):
        recipes.load_results(path, s1, args_for())
    assert recipes.load_results(path, s1, args_for(fresh=True))["runs"] == {}


def test_failure_reason_is_the_last_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("python -m qlorakit train ...\nloading\nqlorakit: neftune_noise_alpha: unknown key\n")
    assert recipes.failure_reason(log, 2) == "exit 2: qlorakit: neftune_noise_alpha: unknown key"
