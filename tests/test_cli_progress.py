"""Progress where people wait (issue 21 item 5): long device commands draw a bar on a terminal only.

click's CliRunner is not a terminal, so by default nothing but the result may appear; ``EDGETL_PROGRESS=always``
stands in for a terminal (the bar a user sees), ``--json`` / ``--quiet`` / ``EDGETL_PROGRESS=never`` silence it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.cli._progress import progress_bars, wants_bars
from edgetl.device import DeviceRuntime
from tests.conftest import make_folder


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture()
def small(tmp_path: Path, demo_train: Path) -> Path:
    make_folder(tmp_path / "extra", {"sandal": 6}, demo_train)  # for add-class
    return make_folder(tmp_path / "small", {"bag": 6, "ankle_boot": 6, "shirt": 6}, demo_train)


def test_train_evaluate_predict_are_silent_when_not_a_terminal(bundle: Path, small: Path) -> None:
    code, out, err = run("device", "train", str(bundle), "--data", str(small), "--force")
    assert code == 0, err
    assert err == "" and out.startswith("trained softmax head")
    code, out, err = run("device", "evaluate", str(bundle), "--data", str(small))
    assert code == 0 and err == "" and out.startswith("accuracy"), err
    images = sorted(str(p) for p in (small / "bag").iterdir())[:3]
    code, out, err = run("device", "predict", str(bundle), *images)
    assert code == 0 and err == "" and len(out.splitlines()) == 3, err


def test_a_terminal_gets_a_bar_on_stderr_and_stdout_stays_clean(bundle: Path, small: Path) -> None:
    always = {"EDGETL_PROGRESS": "always"}
    code, out, err = run("device", "train", str(bundle), "--data", str(small), "--force", env=always)
    assert code == 0, err
    assert "embed" in err and "100%" in err and "18/18" in err  # the embedding bar, drawn to its end
    assert "\r" not in out and "[#" not in out and out.startswith("trained softmax head")
    images = sorted(str(p) for p in (small / "ankle_boot").iterdir())[:4]
    code, out, err = run("device", "predict", str(bundle), *images, env=always)
    assert code == 0 and "4/4" in err and "\r" not in out and len(out.splitlines()) == 4, err
    code, out, err = run("device", "evaluate", str(bundle), "--data", str(small), env=always)
    assert code == 0 and "18/18" in err, err  # cached embeddings count as done
    code, out, err = run("device", "add-class", str(bundle), "sandal", "--data", str(small.parent / "extra" / "sandal"),
                         env=always)
    assert code == 0 and "6/6" in err, err


@pytest.mark.parametrize("flags,env", [(["--json"], {"EDGETL_PROGRESS": "always"}),
                                       (["--quiet"], {"EDGETL_PROGRESS": "always"}),
                                       ([], {"EDGETL_PROGRESS": "never"})])
def test_json_quiet_and_never_silence_the_bar(bundle: Path, small: Path, flags: list[str],
                                              env: dict[str, str]) -> None:
    code, out, err = run("device", "train", str(bundle), "--data", str(small), "--force", *flags, env=env)
    assert code == 0 and err == "", err
    if flags == ["--json"]:
        assert json.loads(out)["version"]


def test_terminal_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("EDGETL_PROGRESS", raising=False)
    assert wants_bars(Tty()) and not wants_bars(io.StringIO())
    monkeypatch.setenv("EDGETL_PROGRESS", "never")
    assert not wants_bars(Tty())
    monkeypatch.setenv("EDGETL_PROGRESS", "always")
    assert wants_bars(io.StringIO())


def test_library_reports_progress_through_the_callback_only(bundle: Path, small: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, int, int]] = []
    rt = DeviceRuntime(bundle)
    rt.train(small, force=True)
    rt.predict(sorted((small / "bag").iterdir())[:5], progress=lambda *a: calls.append(a))
    assert calls and calls[-1] == ("embed", 5, 5)
    with progress_bars(True) as bar:  # not a terminal here: the callback draws nothing
        bar("embed", 1, 2)
    assert capsys.readouterr() == ("", "")
