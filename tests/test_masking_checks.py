"""Gradient-masking checks (``sinai check``): they pass the undefended CNN and flag a planted masking model.

The CNN is the session's short-trained one (``SHORT_RECIPES["mnist-cnn"]``, the model of the
``mnist_models`` fixture, trained here alone so that this module does not also train the ViT). The
planted model rounds its input to 8 levels: its gradient is zero almost everywhere, so PGD stands still
while Square, which only needs scores, still finds adversarial examples. The module runs torch on one
thread: on the two shared cores several threads per process thrash.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import SHORT_RECIPES
from torch import nn

from sinai.analysis.masking import CheckResult, check_masking, checks_table, largest_eps, sign_test
from sinai.attacks import ThreatModel
from sinai.defenses import parse_defense
from sinai.evaluation import ResultStore

LINF = ThreatModel("linf", 0.1)
SMALL = {"eot": 2, "steps": 10, "more_steps": 20, "queries": 500}
"""Few steps and queries: enough to separate the two models on 24 images."""
IDS = ["1", "2a", "2b", "3a", "3b", "4", "5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cnn(one_thread):
    from sinai.models.embedded import train_embedded

    return train_embedded("mnist-cnn", config=SHORT_RECIPES["mnist-cnn"], progress=False)[0]


@pytest.fixture(scope="module")
def data(mnist_images):
    x, y = mnist_images
    return x[:24], y[:24]


class Rounded(nn.Module):
    """``model`` on its input rounded to ``levels`` grey levels: x -> round(x * 7) / 7 for 8 levels."""

    def __init__(self, model: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.model, self.levels = model, levels
        self.num_classes, self.input_shape = model.num_classes, model.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * (self.levels - 1)) / (self.levels - 1))


def _by_id(results: list[CheckResult]) -> dict[str, CheckResult]:
    assert [r.id for r in results] == IDS
    return {r.id: r for r in results}


def test_the_checks_pass_on_the_undefended_cnn(cnn, data):
    x, y = data
    results = _by_id(check_masking(cnn, x, y, parse_defense("none"), LINF, **SMALL))
    assert all(r.status == "pass" for r in results.values()), checks_table(list(results.values()))
    pgd, fgsm = results["1"].measured
    assert (pgd.attack, fgsm.attack, pgd.n) == ("PGD-10", "FGSM", 24)
    assert pgd.robust < fgsm.robust and pgd.interval[0] <= pgd.accuracy <= pgd.interval[1]
    unbounded = results["3b"].measured[0]
    assert unbounded.robust == 0 and "eps=1 " in unbounded.attack
    assert [m.accuracy for m in results["3a"].measured] == sorted(
        (m.accuracy for m in results["3a"].measured), reverse=True
    )
    assert "deterministic" in results["4"].explanation  # EOT on a model without noise: reported, equal
    assert results["4"].measured[0].robust == results["4"].measured[1].robust


def test_the_checks_warn_on_a_model_that_rounds_its_input(cnn, data):
    x, y = data
    results = _by_id(check_masking(Rounded(cnn), x, y, parse_defense("none"), LINF, **SMALL))
    assert results["2a"].status == "warn" and results["3b"].status == "warn"
    pgd, square = results["2a"].measured
    assert square.robust < pgd.robust and results["2a"].paired[0].weaker_only > 0
    assert results["3b"].measured[0].robust > 0.5 * len(x)  # the zero gradient leaves the images as they are
    table = checks_table(list(results.values()))
    assert "| 2a | white-box beats black-box" in table and "WARN" in table and "3b warn:" in table


def test_sign_test_and_largest_eps():
    assert sign_test(0, 0) == 1.0 and sign_test(5, 0) == 1.0
    assert sign_test(0, 5) == pytest.approx(1 / 32)
    assert sign_test(1, 4) == pytest.approx(6 / 32)  # P(X >= 4), X ~ Bin(5, 1/2)
    assert largest_eps("linf", (1, 28, 28)) == 1.0 and largest_eps("l2", (1, 28, 28)) == 28.0


def test_bad_arguments_are_value_errors(cnn, data):
    x, y = data
    none = parse_defense("none")
    with pytest.raises(ValueError, match="eot must be an integer >= 2"):
        check_masking(cnn, x, y, none, LINF, eot=1)
    with pytest.raises(ValueError, match="more_steps"):
        check_masking(cnn, x, y, none, LINF, steps=20, more_steps=20)
    with pytest.raises(ValueError, match="eps_factors"):
        check_masking(cnn, x, y, none, LINF, eps_factors=(0,))


CLI_ARGS = (
    "--images",
    "20",
    "--eot",
    "2",
    "--steps",
    "5",
    "--more-steps",
    "10",
    "--queries",
    "100",
    "--device",
    "cpu",
)


def test_cli_prints_every_check_and_a_rerun_resumes(cnn, tmp_path, monkeypatch):
    from sinai.cli import cli

    monkeypatch.setattr("sinai.models.embedded.load_embedded", lambda name, **kw: cnn)
    args = ["check", "RND:std=0.05", "--model", "mnist-cnn", *CLI_ARGS, "--out", str(tmp_path)]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "mnist-cnn, RND(input std=0.05): linf eps=0.1, 20 mnist images (seed 0)" in first.output
    rows = [line for line in first.output.splitlines() if line.startswith("| ") and "check" not in line]
    assert [row.split("|")[1].strip() for row in rows] == IDS
    assert "EOT-2 PGD-5" in first.output and "Square-100" in first.output and "n = 20" in first.output
    with ResultStore(tmp_path / "results.sqlite") as store:
        runs = store.runs()
    assert len(runs) == 10 and all(settings["stage"] == "masking-check" for _, settings, _ in runs)

    def no_work(*a, **k):
        raise AssertionError("a stored run was attacked again")

    monkeypatch.setattr("sinai.evaluation.protocol.Oracle", no_work)
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus"], "unknown defense 'bogus'"),
        (["SINAI-Attn"], "needs ['attn'] sites"),
        (["none", "--eot", "1"], "eot must be an integer >= 2"),
        (["none", "--bpda"], "bpda has nothing to bypass"),
    ],
)
def test_cli_bad_input_is_one_line(cnn, tmp_path, monkeypatch, args, message):
    from sinai.cli import cli

    monkeypatch.setattr("sinai.models.embedded.load_embedded", lambda name, **kw: cnn)
    result = CliRunner().invoke(cli, ["check", *CLI_ARGS, "--out", str(tmp_path), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
