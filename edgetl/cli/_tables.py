"""Text tables shared by host and device commands."""

from __future__ import annotations

from typing import Any


def extractor_table(entries: list[dict[str, Any]]) -> str:
    """The per-graph gate report as a text table (export and `device info`): fidelity to PyTorch FP32 (max |d|, min
    and mean cosine, reference-head agreement) and the retrained-head accuracy; a failed graph names each number
    against its limit."""
    lines = [(f"{'graph':<24} {'size MB':>8} {'max|d|':>9} {'cos min':>8} {'cos mean':>8} {'agree':>6} {'acc':>6} "
              f"{'fp32 acc':>8} {'drop':>6}  status")]
    for e in entries:
        r = e.get("report", {})
        status = "ok" if r.get("passed", True) else f"FAILED: {r.get('reason', '')}"
        lines.append(f"{e['format'] + '/' + e['precision']:<24} {r.get('size_bytes', 0) / 1e6:>8.2f} "
                     f"{r.get('max_abs_diff', float('nan')):>9.2e} {r.get('min_cosine', float('nan')):>8.4f} "
                     f"{r.get('mean_cosine', float('nan')):>8.4f} "
                     f"{r.get('top1_agreement', float('nan')):>6.3f} {r.get('accuracy', float('nan')):>6.3f} "
                     f"{r.get('accuracy_pytorch_fp32', float('nan')):>8.3f} {r.get('drop_points', float('nan')):>6.2f}"
                     f"  {status}")
    return "\n".join(lines)
