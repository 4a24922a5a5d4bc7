from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetl.demo import demo_split

HAS_TORCH = importlib.util.find_spec("torch") is not None
SMALL = 64  # px: real pretrained weights, small input, so device tests stay fast
#: what the ``bundle`` fixture exports with torch, and tools/make_device_fixture.py exports into DEVICE_BUNDLE
DEVICE_BUNDLE_ARGS = {"model": "mobilenet_v2", "image_size": SMALL, "calib_size": 20, "eval_size": 60}
#: the committed copy of that bundle, for the device tests wherever torch is absent (bash tools/test-device.sh)
DEVICE_BUNDLE = Path(__file__).resolve().parent / "data" / "device-bundle" / "mnv2-64"
#: set by tools/test-device.sh: the torch-free device lane, where no test may be skipped for lack of torch
DEVICE_LANE = os.environ.get("EDGETL_DEVICE_LANE") == "1"
#: modules that skip as a whole at import where their extra is missing (a module-level importorskip), so a marker alone
#: cannot deselect them: the device lane, which installs none of these, does not collect them. Their tests carry the
#: marker named here too (``-m "not host"`` etc. deselects them anywhere).
EXTRA_MODULES = {"test_backends.py": "host", "test_openvino.py": "host", "test_tflite.py": "host",
                 "test_fleet.py": "fleet", "test_fleet_deploy.py": "fleet", "test_stream.py": "stream",
                 "test_sensitivity.py": "host"}
collect_ignore = sorted(EXTRA_MODULES) if DEVICE_LANE else []


def use_committed_bundle() -> bool:
    """The device tests use the committed bundle where torch is absent, or when EDGETL_TEST_BUNDLE=committed."""
    return not HAS_TORCH or os.environ.get("EDGETL_TEST_BUNDLE") == "committed"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    """In the device lane a whole module skipped at import fails: list it in EXTRA_MODULES (and mark its tests)."""
    outcome = yield
    report = outcome.get_result()
    if DEVICE_LANE and report.skipped and isinstance(collector, pytest.Module):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{collector.path.name} was skipped as a whole in the torch-free device lane ({reason}); "
                           "add it to EXTRA_MODULES in tests/conftest.py and mark its tests")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """In the device lane a test skipped for lack of torch (or of a host-side package) fails: such a test must carry
    the ``host`` marker (or the marker of the extra it needs) so that the lane deselects it."""
    outcome = yield
    report = outcome.get_result()
    if DEVICE_LANE and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(word in reason.lower() for word in ("torch", "host extra", "openvino", "litert", "tflite")):
            report.outcome = "failed"
            report.longrepr = (f"skipped in the torch-free device lane ({reason}); mark the test host (or with the "
                               "marker of the extra it needs) so that tools/test-device.sh deselects it")


@pytest.fixture(scope="session")
def demo_train() -> Path:
    return demo_split("train")


@pytest.fixture(scope="session")
def demo_test() -> Path:
    return demo_split("test")


@pytest.fixture(scope="session")
def _pretrained_bundle(tmp_path_factory: pytest.TempPathFactory, demo_train: Path) -> Path:
    """A real bundle: MobileNetV2 with its ImageNet weights, exported to ONNX at 64 px and checked against PyTorch.

    With torch, exported here from the current code; without torch, a session copy of the committed bundle that
    tools/make_device_fixture.py exported the same way (so the committed files are never modified).
    """
    out = tmp_path_factory.mktemp("bundles") / "mnv2-64"
    if use_committed_bundle():
        if not (DEVICE_BUNDLE / "manifest.json").is_file():
            pytest.fail(f"{DEVICE_BUNDLE} is missing; make it on a host: .venv/bin/python tools/make_device_fixture.py")
        return Path(shutil.copytree(DEVICE_BUNDLE, out))
    from edgetl.host.export import export

    return export(out, demo_train, **DEVICE_BUNDLE_ARGS)  # type: ignore[arg-type]


@pytest.fixture()
def bundle(_pretrained_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the pretrained bundle for one test (device state included)."""
    return Path(shutil.copytree(_pretrained_bundle, tmp_path / "bundle"))


def assert_first_float_convs(settings: dict[str, Any], target: float) -> None:
    """An INT8 exporter's recorded mixed-precision search (edgetl.host.sensitivity) is consistent: the candidates tried
    in order, stopped at the first k reaching ``target`` (else all tried and the smallest k on the best one's plateau
    kept), and the graph's float
    nodes are that many."""
    tried, plan = settings["sensitivity"], settings["mixed_precision"]
    ks = plan["candidates"]
    assert [t["float_convs"] for t in tried] == ks[:len(tried)] and tried
    assert all(0.0 < t["calibration_mean_cosine"] <= 1.0 for t in tried)
    reached = [t for t in tried if t["calibration_mean_cosine"] >= target]
    if reached:
        assert reached == [tried[-1]] and len(settings["float_nodes"]) == tried[-1]["float_convs"]
    else:
        assert len(tried) == len(ks)
        top = max(t["calibration_mean_cosine"] for t in tried)
        kept = next(t for t in tried if t["calibration_mean_cosine"] >= top - plan["plateau"])
        assert len(settings["float_nodes"]) == kept["float_convs"]
    assert plan["target_calibration_cosine"] == target


def make_folder(root: Path, spec: dict[str, int], source: Path) -> Path:
    """An ImageFolder with ``spec[class]`` images copied from the same class of ``source``."""
    for name, n in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for p in sorted((source / name).glob("*.png"))[:n]:
            shutil.copy(p, root / name / p.name)
    return root


@pytest.fixture(autouse=True)
def _edgetl_loggers_enabled() -> Iterator[None]:
    """Libraries the tests load (Ray, Flower, absl, TensorFlow Lite's converters) reconfigure logging as they import:
    ``dictConfig`` disables every existing logger, others raise the root level or call ``logging.disable``. Tests that
    read edgetl's warnings from the log capture must not depend on which tests ran before them: undo that for the
    edgetl loggers (and only for the duration of the test)."""
    logging.disable(logging.NOTSET)
    package = logging.getLogger("edgetl")
    level = package.level
    if package.getEffectiveLevel() > logging.WARNING:
        package.setLevel(logging.WARNING)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("edgetl") and isinstance(logger, logging.Logger):
            logger.disabled = False
            logger.propagate = True
    yield
    package.setLevel(level)


class LogLines:
    """The messages one module logger emits during a test, read from a handler on that logger itself — independent of
    the root logger, its handlers and levels, which libraries loaded by other tests may have reconfigured."""

    def __init__(self, logger: logging.Logger):
        self.records: list[logging.LogRecord] = []
        self.logger = logger
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self.records.append  # type: ignore[method-assign]

    def __enter__(self) -> LogLines:
        logging.disable(logging.NOTSET)
        self.level, self.logger.disabled = self.logger.level, False
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)
