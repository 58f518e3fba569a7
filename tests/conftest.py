import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """For tiny nets: a second thread only adds synchronisation, and on a loaded 2-core machine
    OpenMP's spin-waiting made them up to 30x slower with two (use with pytest.mark.usefixtures)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolate_mlflow_uri():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI in os.environ; undo it after each
    test, or later tests' subprocesses would log to an earlier test's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def digits_model():
    """A small CNN trained naturally on scikit-learn's digits: ~98% clean accuracy, not robust."""
    from sklearn.datasets import load_digits

    from dist_free.engine.models import NormalizedModel, small_cnn
    d = load_digits()
    x = torch.tensor(d.images[:600], dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target[:600])
    torch.manual_seed(0)
    model = NormalizedModel(small_cnn(10, 16), (0.5,) * 3, (0.5,) * 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(15):
        for i in range(0, 500, 50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    return model.eval(), x[500:], y[500:]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The README's demo dataset (digits as JPEGs), written once per test session."""
    from pipelines.demo import write_demo
    root = tmp_path_factory.mktemp("demo") / "digits"
    write_demo(root)
    return root
