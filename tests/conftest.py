import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.backends  # noqa: F401  (registers built-in backends)
import graphopt.passes  # noqa: F401  (registers built-in passes)
from graphopt.pruning.rules import set_strict
from graphopt.tools.digits import CHECKPOINT, EXTRA_HINT, trained_digits_cnn
from graphopt.tools.random_init import informative_init

set_strict(True)   # a channel rule that raises fails its test instead of quietly blocking channels

try:
    import sklearn  # noqa: F401  (the digits example's data: graphopt's `examples` extra)
    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


if not HAVE_SKLEARN:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        """Without scikit-learn, a test that stopped at the digits data (the error, or a CLI run
        that printed it) is reported as skipped, naming the extra, not as a failure."""
        report = (yield).get_result()
        if report.failed and EXTRA_HINT in "\n".join((report.longreprtext, report.capstdout, report.capstderr)):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"Skipped: the digits data needs scikit-learn: {EXTRA_HINT}")


def randomize_bn(model: nn.Module) -> nn.Module:
    """Weights that make comparisons meaningful (see graphopt.tools.random_init)."""
    return informative_init(model)


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.drop(self.relu(self.bn(self.conv(x))))
        return self.bn1d(self.fc(torch.flatten(x, 1)))


@pytest.fixture
def conv_bn_relu():
    return randomize_bn(ConvBnRelu())


@pytest.fixture(scope="module")
def digits_graph():
    """The bundled trained digits CNN traced on 3 seeded random images, once per test module
    (tests read it; passes work on their own clones)."""
    return graphopt.trace(trained_digits_cnn(), torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


def digits_pipeline(tmp_path, body: str, batch: int = 1, name: str = "pipeline.toml") -> str:
    """A pipeline file on the bundled digits model: its [model] table, then ``body``."""
    path = tmp_path / name
    path.write_text(f"""
[model]
factory = "graphopt.tools.digits:DigitsCNN"
checkpoint = "{CHECKPOINT}"
input_shape = [{batch}, 1, 8, 8]
{body}""")
    return str(path)
