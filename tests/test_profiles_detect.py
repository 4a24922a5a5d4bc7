"""Device detection reads each profile's ``detect`` rule (devices/*.toml), not a list of ids in the code."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgetl._resources import registry_dir
from edgetl.errors import RegistryError
from edgetl.profiles import DetectRule, MachineFacts, detect_profile, list_profiles

MODELS = ["", "raspberry pi 5 model b rev 1.0\x00", "raspberry pi 4 model b rev 1.4\x00",
          "raspberry pi zero 2 w rev 1.0\x00", "raspberry pi 3 model b plus rev 1.3\x00",
          "nvidia jetson nano developer kit\x00", "nvidia jetson orin nano developer kit\x00",
          "nvidia orin nx\x00", "nvidia jetson xavier nx developer kit\x00", "pine64 rockpro64 v2.1\x00"]


def _before_rules(facts: MachineFacts) -> str:
    """detect_profile as it was written before the rules moved into the profiles (the reference)."""
    model = facts.model
    for needle, profile in (("raspberry pi 5", "raspberry-pi-5"), ("raspberry pi 4", "raspberry-pi-4"),
                            ("raspberry pi zero 2", "raspberry-pi-zero-2w"), ("orin", "jetson-orin-nano")):
        if needle in model:
            return profile
    if "jetson" in model or "nvidia" in model:
        return "jetson-nano"
    if facts.machine in ("x86_64", "AMD64") and facts.cores >= 4:
        return "x86-ground-station"
    return "generic-cpu"


@pytest.mark.parametrize("model, machine, cores", itertools.product(MODELS, ["x86_64", "AMD64", "aarch64", "armv7l"],
                                                                     [1, 2, 4, 8]))
def test_rules_give_the_same_profile_as_before(model: str, machine: str, cores: int) -> None:
    facts = MachineFacts(model=model, machine=machine, cores=cores)
    assert detect_profile(facts).id == _before_rules(facts)


def test_this_machine_and_the_shipped_rules() -> None:
    assert detect_profile().id == _before_rules(MachineFacts.here())
    rules = {p.id: p.detect for p in list_profiles()}
    assert all(rule is not None for rule in rules.values())  # every shipped profile can be detected
    assert [pid for pid, rule in rules.items() if rule.fallback] == ["generic-cpu"]
    assert rules["jetson-orin-nano"].priority > rules["jetson-nano"].priority  # "orin" before "nvidia"


def test_a_rule_matches_when_every_named_fact_holds() -> None:
    rule = DetectRule(model_contains=("Board X",), machine=("aarch64",), min_cores=4)
    assert rule.matches(MachineFacts("acme board x rev 2", "aarch64", 4))
    assert not rule.matches(MachineFacts("acme board x rev 2", "aarch64", 2))
    assert not rule.matches(MachineFacts("acme board x rev 2", "x86_64", 8))
    assert not rule.matches(MachineFacts("acme board y", "aarch64", 8))
    assert DetectRule(fallback=True).matches(MachineFacts("", "riscv64", 1))


def _devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]) -> None:
    """The shipped profiles plus ``extra`` (file name → text) in a folder that EDGETL_DEVICES_DIR points at."""
    for p in registry_dir("devices").glob("*.toml"):
        (tmp_path / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    for name, text in extra.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setenv("EDGETL_DEVICES_DIR", str(tmp_path))


BOARD = """id = "acme-board"
description = "A board added by a user"
arch = "aarch64"
cores = 8
memory_mb = 4096
backends = ["onnx"]
onnx_providers = ["CPUExecutionProvider"]
threads = 8
precision = "int8"
batch_size = 8
{detect}
"""


def test_a_new_profile_is_detected_by_its_own_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(tmp_path, monkeypatch,
             {"acme-board.toml": BOARD.format(detect='detect = { model_contains = ["acme"], priority = 30 }')})
    assert detect_profile(MachineFacts("acme board rev 1\x00", "aarch64", 8)).id == "acme-board"
    assert detect_profile(MachineFacts("raspberry pi 5 model b\x00", "aarch64", 4)).id == "raspberry-pi-5"


def test_a_profile_without_a_rule_is_never_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(tmp_path, monkeypatch, {"acme-board.toml": BOARD.format(detect="")})
    assert detect_profile(MachineFacts("acme board\x00", "aarch64", 8)).id == "generic-cpu"


@pytest.mark.parametrize("detect, message", [
    ('detect = { model = ["acme"] }', "detect.model is not a detect field"),
    ('detect = { model_contains = "acme" }', "detect.model_contains must be list"),
    ('detect = { model_contains = [""] }', "list of non-empty strings"),
    ('detect = { min_cores = -1 }', "min_cores must be >= 0"),
    ('detect = { priority = 1 }', "must name model_contains, machine or min_cores"),
    ('detect = { fallback = true, machine = ["x86_64"] }', "a fallback detect rule matches any machine"),
    ('detect = { fallback = "yes" }', "fallback must be true or false"),
    ('detect = "acme"', "detect must be a table"),
])
def test_a_malformed_rule_names_file_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detect: str,
                                                message: str) -> None:
    _devices(tmp_path, monkeypatch, {"acme-board.toml": BOARD.format(detect=detect)})
    with pytest.raises(RegistryError, match="acme-board.toml") as err:
        list_profiles()
    assert message in str(err.value)


def test_exactly_one_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(tmp_path, monkeypatch, {"acme-board.toml": BOARD.format(detect="detect = { fallback = true }")})
    with pytest.raises(RegistryError, match=r"exactly one must be the fallback .* 2 do \(acme-board, generic-cpu\)"):
        detect_profile(MachineFacts("", "riscv64", 1))
    (tmp_path / "acme-board.toml").unlink()
    (tmp_path / "generic-cpu.toml").unlink()
    with pytest.raises(RegistryError, match="none does"):
        detect_profile(MachineFacts("", "riscv64", 1))
    assert detect_profile(MachineFacts("", "x86_64", 8)).id == "x86-ground-station"
