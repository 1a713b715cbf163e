"""The command line end to end, on embedded models trained with a short recipe into a temp cache."""

import json

import pytest
from click.testing import CliRunner

import sinai.demo
import sinai.sweep.plan
from sinai.cli import cli
from sinai.evaluation.store import ResultStore


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    out = run("--help").output
    for command in (
        "demo",
        "eval",
        "calibrate",
        "tune",
        "report",
        "analyze",
        "bench",
        "sites",
        "train",
        "check",
    ):
        assert command in out


@pytest.mark.parametrize(
    "command", ["demo", "eval", "calibrate", "tune", "report", "analyze", "bench", "check"]
)
def test_subcommand_help_exits_cleanly(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output and "Error" not in result.output


def test_eval_prints_base_and_defended_clean_accuracy(cache):
    result = run(
        "eval",
        "--model",
        "mnist-cnn",
        "--defense",
        "RND:std=0.05",
        "--images",
        "100",
        "--passes",
        "2",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "100 images" in result.output and "M = 2" in result.output
    assert "| mnist-cnn | RND(input std=0.05) |" in result.output and "drop %" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", "bogus"], "unknown defense 'bogus'"),
        (["--defense", "RND:std=-1"], "std must be a finite number >= 0"),
        (["--defense", "SINAI-Attn"], "needs ['attn'] sites"),
        (["--attack", "squares"], "unknown attack 'squares'"),
        (["--budget", "0"], "budgets must be positive"),
        (["--budget", "1k"], "budgets must be integers"),
        (["--images", "5"], "cannot cover all 10 classes"),
        (["--images", "5000"], "1000"),
        (["--data", "cifar10"], "--data-root"),
        (["--model", "timm:not_a_model"], "unknown timm model"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_eval_bad_input_is_a_clear_error(cache, args, message):
    result = run("eval", "--model", "mnist-cnn", *args)
    assert result.exit_code != 0
    assert message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attacks", "square,bogus"], "unknown attack(s) bogus"),
        (["--images", "0"], "must be a positive integer"),
        (["--trials", "-1"], "must be a positive integer"),
        (["--models", "mnist-cnn,mnist-mlp"], "unknown model(s) mnist-mlp"),
    ],
)
def test_demo_bad_input_is_a_clear_error(tmp_path, args, message):
    result = run("demo", "--quick", "--out", str(tmp_path / "demo"), *args)
    assert result.exit_code != 0
    assert message in result.output


DEMO_ARGS = (
    "--quick",
    "--workers",
    "1",
    "--trials",
    "2",
    "--images",
    "20",
    "--budget",
    "100",
    "--attacks",
    "square,signhunter,nes,rays",
)


def test_demo_quick_runs_end_to_end_and_resumes(cache, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    result = run("demo", *DEMO_ARGS, "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if line.startswith("| mnist-")]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table}
    for model in ("mnist-cnn", "mnist-vit"):
        assert (model, "Base") in rows
        for method in ("RND", "FND"):
            assert {(model, f"{method} ≈1%"), (model, f"{method} ≈2%")} <= rows
    assert ("mnist-vit", "SINAI-Attn ≈1%") in rows and ("mnist-cnn", "SINAI-Attn ≈1%") not in rows
    header = next(line for line in result.output.splitlines() if line.startswith("| model"))
    assert all(f"{attack} 100" in header for attack in ("square", "signhunter", "nes"))
    assert "rays 100" in result.output and "signflip" not in result.output  # table 2: the asked attacks only
    with ResultStore(out / "results.sqlite") as db:
        keys = [row[0] for row in db.db.execute("SELECT key FROM meta WHERE key LIKE 'stage:%'")]
    assert sum(k.startswith("stage:calibrate") for k in keys) == 2 * 2 + 3 * 2  # RND, FND, ViT's SINAI-Attn
    for model in ("mnist-cnn", "mnist-vit"):
        (folder,) = (out / "stages").glob(f"{model}-SINAI-*")
        tuning = json.loads((folder / "tuning.json").read_text())
        assert len(tuning["trials"]) == 2 and (folder / "pareto.png").exists()
    assert "1 local worker(s)" in result.output and "plan demo-quick: " in result.output  # a sweep plan
    files = ("table1.md", "table1.csv", "table1.json", "table2.md", "robust_vs_queries.png", "tradeoff.png")
    for name in files:
        assert (out / "report" / name).exists()

    def no_work(*a, **k):
        raise AssertionError("a finished stage was computed again")

    monkeypatch.setattr("sinai.tuning.calibrate.calibrate", no_work)
    monkeypatch.setattr("sinai.evaluation.protocol.Oracle", no_work)
    monkeypatch.setattr("sinai.tuning.tune.protect", no_work)
    again = run("demo", *DEMO_ARGS, "--out", str(out), "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert [line for line in again.output.splitlines() if line.startswith("| mnist-")] == table
    vit_only = run("demo", *DEMO_ARGS, "--models", "mnist-vit", "--out", str(out), "--device", "cpu")
    assert vit_only.exit_code == 0, vit_only.output
    assert "mnist-vit: load" in vit_only.output and "mnist-cnn: load" not in vit_only.output
    assert [line for line in vit_only.output.splitlines() if line.startswith("| mnist-")] == table


def test_demo_is_a_plan_that_sinai_sweep_runs(tmp_path):
    result = run("demo", "--quick", "--models", "mnist-cnn", "--attacks", "square,transfer", "--plan")
    assert result.exit_code == 0, result.output
    plan = sinai.sweep.plan.parse_plan(result.output, name="demo")
    assert [m.name for m in plan.models] == ["mnist-cnn"] and plan.attacks == ("square", "transfer")
    assert plan.budgets == (200,) and plan.attack_args["transfer"]["queries"] == 200
    stages = {(e.stage.kind, e.stage.preset) for e in plan.defenses if e.stage is not None}
    assert stages == {
        ("calibrate", "RND"),
        ("calibrate", "FND"),
        ("calibrate", "SINAI-Attn"),
        ("tune", "SINAI"),
    }
    full = sinai.sweep.plan.parse_plan(run("demo", "--plan", "--trained").output)
    assert {(e.method, e.variant) for e in full.defenses if e.variant} == {
        ("PGD-AT", "adv"),
        ("SINAI-selective", "selective"),
        ("MFDV", "mfdv"),
    }


def test_sites_lists_kinds_without_training():
    out = run("sites", "--model", "mnist-vit").output
    assert "attn       4" in out and "gelu       4" in out and "relu       0" in out


def test_bench_defenses_prints_ratios(cache, tmp_path):
    path = tmp_path / "rows.json"
    result = run(
        "bench",
        "defenses",
        "--models",
        "mnist-cnn@8",
        "--rounds",
        "1",
        "--iters",
        "1",
        "--json-out",
        str(path),
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(path.read_text())
    assert [r["defense"] for r in rows] == ["RND", "FND", "SINAI", "SINAI@threshold"]
    assert all(r["ratio"] > 0 for r in rows)


def test_eval_reads_an_imagenet_folder_at_the_models_input_size(tmp_path):
    from PIL import Image

    for c, synset in enumerate(("n01440764", "n01443537", "n01484850")):
        (tmp_path / synset).mkdir()
        for i in range(2):
            Image.new("RGB", (200 + 10 * i, 180), (40 * c, 90, 200)).save(tmp_path / synset / f"{i}.JPEG")
    result = run(
        "eval",
        "--model",
        "timm:test_vit",
        "--weights",
        "random",
        "--data",
        "imagenet",
        "--data-root",
        str(tmp_path),
        "--images",
        "3",
        "--defense",
        "SINAI-Attn:std=0.5",
        "--passes",
        "1",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "imagenet: 3 images" in result.output and "SINAI-Attn(attn std=0.5)" in result.output


def test_eval_with_an_attack_reports_every_budget_and_resumes(cache, tmp_path):
    args = ["eval", "--model", "mnist-cnn", "--attack", "square", "--budget", "10,50", "--images", "12"]
    args += ["--shard-size", "6", "--attack-args", "p_init=0.1", "--out", str(tmp_path), "--device", "cpu"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    table = [line for line in first.output.splitlines() if line.startswith("| mnist-cnn")]
    assert "square @10" in first.output and "square @50" in first.output and len(table) == 1
    assert (tmp_path / "results.sqlite").exists()
    again = run(*args)
    assert [line for line in again.output.splitlines() if line.startswith("| mnist-cnn")] == table
    bad = run(*args[:-4], "--attack-args", "p_init", "--out", str(tmp_path))
    assert bad.exit_code != 0 and "expected key=value" in bad.output


def test_bench_attacks_prints_throughput_ratios(cache):
    result = run("bench", "attacks", "--attacks", "square,simba", "--images", "10", "--budget", "20",
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [
        line
        for line in result.output.splitlines()
        if line.startswith("| square") or line.startswith("| simba")
    ]
    assert len(rows) == 2 and all(float(r.split("|")[-2]) > 0 for r in rows)


def test_eval_with_a_decision_attack_prints_the_snd_metrics(cache, tmp_path):
    args = ["eval", "--model", "mnist-cnn", "--attack", "rays", "--eps", "0.3", "--budget", "10,30"]
    args += ["--images", "10", "--defense", "RND:std=0.05", "--passes", "1", "--p-mis"]
    result = run(*args, "--out", str(tmp_path), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (
        "rays @30" in result.output
        and "attack success %" in result.output
        and "mean linf norm" in result.output
    )
    assert "P_mis" in result.output
    bad = run(
        "eval",
        "--model",
        "mnist-cnn",
        "--attack",
        "rays",
        "--norm",
        "l2",
        "--images",
        "10",
        "--device",
        "cpu",
    )
    assert bad.exit_code != 0 and "rays is defined for linf only" in bad.output
    bad = run("eval", "--model", "mnist-cnn", "--attack", "hsja", "--eot", "0", "--device", "cpu")
    assert bad.exit_code != 0 and "eot must be an integer >= 1" in bad.output


def test_eval_stores_the_defense_under_the_sites_the_model_has(cache, tmp_path):
    from sinai.defenses import Defense
    from sinai.evaluation.store import ResultStore

    args = ("--model", "mnist-cnn", "--defense", "SINAI:relu.std=0.1,relu.ratio=0.5", "--images", "10")
    result = run("eval", *args, "--out", str(tmp_path), "--device", "cpu")
    assert result.exit_code == 0, result.output
    with ResultStore(tmp_path / "results.sqlite") as store:
        ((_, settings, _),) = store.runs()
    defense = Defense.from_dict(settings["defense"])
    assert defense.describe() == "SINAI(relu std=0.1 ratio=0.5)"  # no attn / gelu parts on a CNN
