"""No dead ends (issues #20, #22): a model that did not memorize, a failed first stage, --resume with new flags,
noise text, API errors, the study's progress and console lines."""

import json

from toys import assert_one_line_error, digest

from memloc.cli import main
from memloc.study.run import MEMORIZED, memorization_warning, run_study, study_config

# a study on 8x8 digits that trains one epoch: fast, and its model cannot memorize its noisy labels in that time
ONE_EPOCH = {"data": {"dataset": "digits"}, "model": {"name": "cnn"}, "train": {"epochs": 1}}


def test_memorization_warning_says_what_to_change():
    assert memorization_warning(None) is None and memorization_warning(MEMORIZED) is None
    line = memorization_warning(0.42)
    assert "42.0%" in line and "--epochs" in line and "--lr" in line and "--width" in line and "\n" not in line


def test_a_model_that_did_not_memorize_skips_the_probes_that_need_it(tmp_path):
    lines = []
    assert study_config("smoke").probe_anyway and not study_config("default").probe_anyway  # smoke checks the pipeline
    cfg = study_config("smoke", base_overrides=ONE_EPOCH, noise_levels=(0.2,), probe_anyway=False)
    run_study(cfg, tmp_path / "s", progress=False, log=lines.append)
    info = json.loads((tmp_path / "s" / "study.json").read_text())
    st = info["stages"]
    for stage in ("rewinding", "retraining", "flipping", "dropout_train", "dropout_eval"):
        assert st[stage]["status"] == "skipped" and "--probe-anyway" in st[stage]["reason"], stage
    for stage in ("train", "depth", "detection", "report"):
        assert st[stage]["status"] == "done", stage
    assert not (tmp_path / "s" / "base" / "probes" / "rewinding").exists()
    warnings = [s for s in lines if s.startswith("warning: the model did not memorize")]
    assert len(warnings) == 1  # once, when the first skipped stage is reached
    html = (tmp_path / "s" / "report" / "report.html").read_text()
    assert "Skipped: rewinding, retraining, flipping, dropout_train, dropout_eval." in html
    assert "The study is not finished" not in html  # skipped is not unfinished
    # study.json records the noise level the cell ran, and the report's text says it
    assert info["config"]["base"]["data"]["noise"] == 0.2
    claims = (tmp_path / "s" / "report" / "tables" / "summary_claims.csv").read_text()
    assert "they are 20% of the data" in claims and "10% of the data" not in claims


def test_probe_anyway_runs_them_and_says_so(tmp_path):
    lines = []
    cfg = study_config("smoke", base_overrides=ONE_EPOCH, probe_anyway=True, flip_examples=2, retrain_epochs=1)
    run_study(cfg, tmp_path / "s", progress=False, log=lines.append)
    st = json.loads((tmp_path / "s" / "study.json").read_text())["stages"]
    assert all(v["status"] == "done" for v in st.values())
    assert any(s.startswith("warning: the model did not memorize") and "probing anyway" in s for s in lines)


def test_memloc_train_warns_when_the_model_did_not_memorize(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--dataset", "digits", "--model", "cnn", "--epochs", "1",
                 "--out", str(tmp_path / "r"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "done:" in out
    assert err.count("warning: the model did not memorize") == 1 and "--epochs" in err


def test_a_failed_first_stage_can_be_started_again_and_resume_refuses_new_flags(tmp_path, capsys):
    out = tmp_path / "s"
    # resnet9 cannot take 8x8 images: the train stage fails before its first checkpoint
    code = main(["run", "--preset", "smoke", "--dataset", "digits", "--model", "resnet9", "--out", str(out),
                 "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "cannot take images")
    assert json.loads((out / "study.json").read_text())["stages"]["train"]["status"] == "failed"
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("the user's own file")
    before = digest(out)
    # the same folder with new flags: refused without --overwrite, the message names it
    code = main(["run", "--preset", "smoke", "--dataset", "digits", "--model", "cnn", "--out", str(out), "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "already exists", "--overwrite", "--resume")
    # --resume with a flag that changes the study: one line, nothing written
    code = main(["run", "--resume", str(out), "--model", "cnn", "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "--resume finishes", "--model would change them",
                          "--overwrite")
    for flags in (["--noise", "0.2"], ["--example-tied-dropout", "0.5,0.1"], ["--preset", "smoke"]):
        code = main(["run", "--resume", str(out), "--quiet", *flags])
        assert_one_line_error(code, capsys.readouterr()[1], f"{flags[0]} would change them")
    assert digest(out) == before
    # --overwrite starts it again: memloc's files replaced, the user's file kept
    code = main(["run", "--preset", "smoke", "--dataset", "digits", "--model", "cnn", "--epochs", "1",
                 "--flip-examples", "2", "--out", str(out), "--overwrite", "--quiet"])
    assert code == 0, capsys.readouterr()[1]
    info = json.loads((out / "study.json").read_text())
    assert info["finished"] is True and info["config"]["base"]["model"]["name"] == "cnn"
    assert (out / "notes" / "mine.txt").read_text() == "the user's own file"


def test_api_errors_name_the_parameter_passed():
    import pytest

    import memloc
    from memloc.core.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^others \(--others\) takes an integer of at least 1, not 0"):
        memloc.flip("no-such-run", others=0)
    with pytest.raises(ConfigError, match=r"^peak_epoch \(--peak-epoch\) 6 must lie in \[0, 4\)"):
        memloc.retrain("no-such-run", epochs=4, peak_epoch=6)


def test_the_study_bar_counts_expected_work_not_stages():
    """The default study measured on 2 CPU cores (RESULTS.md): train 266 s, rewinding 142 s, retraining 268 s,
    flipping 57 s, example-tied model 163 + 4 s, depth, detection and report about 8 s: 908 s. The bar's weights
    must put each stage's share within a factor of 1.5 of that (a bar counting stages gave training 1/9)."""
    from memloc.study.run import expected_cost
    cfg = study_config("default")
    measured = {"train": 266, "rewinding": 142, "retraining": 268, "flipping": 57, "dropout_train": 163}
    total_cost = sum(expected_cost(cfg, s) for s in (*measured, "dropout_eval", "depth", "detection", "report"))
    for stage, seconds in measured.items():
        share, truth = expected_cost(cfg, stage) / total_cost, seconds / 908
        assert truth / 1.5 <= share <= truth * 1.5, (stage, share, truth)


def test_each_stage_says_its_result_in_one_line(tmp_path):
    lines = []
    cfg = study_config("smoke", base_overrides=ONE_EPOCH, flip_examples=2, retrain_epochs=1)
    run_study(cfg, tmp_path / "s", progress=False, log=lines.append)
    said = {s.split(":")[0] for s in lines if ":" in s}
    for stage in ("train", "rewinding", "retraining", "flipping", "dropout_train", "example-tied dropout",
                  "detection"):
        assert stage in said, (stage, lines)
    assert any(s.startswith("rewinding: ") and "most critical layer" in s for s in lines)
    assert any(s.startswith("retraining: ") and " layers the reset erased (of 4) bring " in s for s in lines)
    assert any(s.startswith("dropout_train: ") and "eval mode" in s for s in lines)


def test_the_example_tied_model_says_its_epochs_are_eval_mode_and_is_not_warned(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--dataset", "digits", "--model", "cnn", "--epochs", "1",
                 "--example-tied-dropout", "0.4,0.1", "--out", str(tmp_path / "r"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0
    epochs = [line for line in out.splitlines() if line.startswith("epoch")]
    assert epochs and all(line.endswith("[eval mode: every unit on]") for line in epochs)
    assert "did not memorize" not in err  # eval mode hides what it memorized through its masks: no false warning
