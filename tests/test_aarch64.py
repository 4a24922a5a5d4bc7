"""tools/aarch64_check.sh: the device side on an emulated Raspberry Pi (Debian bookworm arm64 under qemu-user).

Opt-in only (30-60 minutes, root, the package registries): ``bash tools/test.sh -m aarch64``. The default run
deselects it as ``slow``, and CI's slow run as ``aarch64`` (``-m "slow and not aarch64"``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.aarch64]

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "aarch64_check.sh"


def _unusable() -> str | None:
    """Why the emulated root cannot be built or run here, or None."""
    if os.uname().machine != "x86_64":
        return f"the check emulates aarch64 from an x86_64 host, not {os.uname().machine}"
    if os.geteuid() != 0:
        return "needs root (apt-get, binfmt_misc, mmdebstrap, mount, chroot)"
    have_tools = shutil.which("mmdebstrap") and Path("/usr/bin/qemu-aarch64-static").exists()
    if not have_tools and not shutil.which("apt-get"):
        return "mmdebstrap / qemu-user-static missing and no apt-get to install them"
    if not Path("/proc/sys/fs/binfmt_misc").is_dir():
        return "the kernel has no binfmt_misc: qemu-user cannot run aarch64 programs transparently"
    return None


def test_aarch64_check(tmp_path: Path) -> None:
    reason = _unusable()
    if reason:
        pytest.skip(reason)
    doc = tmp_path / "aarch64.md"
    env = os.environ | {"EDGETL_AARCH64_DOC": str(doc)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=3 * 3600,
                            check=False)
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"tools/aarch64_check.sh exited {result.returncode}:\n{tail}"
    text = doc.read_text(encoding="utf-8")
    assert "checks passed" in text and "FAILED (exit" not in text, tail
    for graph in ("onnx-int8: verify", "tflite-int8: verify"):
        assert f"aarch64 {graph} (golden vectors) | arm | ok |" in text, graph
