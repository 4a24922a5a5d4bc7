"""``edgetl device``: everything that runs on the device (numpy + one inference runtime; never torch)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgetl.cli import one_line
from edgetl.cli._choices import TableChoice, backends, precisions, trainable_heads
from edgetl.cli._progress import progress_bars

_bundle_arg = click.argument("bundle", type=click.Path(path_type=Path))


def _trust_option(value: Path | None) -> Path | None:
    """``--trust`` / ``EDGETL_TRUST``: an empty EDGETL_TRUST is an error, never "no signature check"."""
    import os

    if value is None and os.environ.get("EDGETL_TRUST") is not None and not os.environ["EDGETL_TRUST"].strip():
        from edgetl.errors import BundleError

        raise BundleError("EDGETL_TRUST is set but empty; set it to the trusted public key file (KEY.pub) or unset it "
                          "to run without signature checks")
    return value


def _runtime_options(f: Any) -> Any:
    f = click.option("--backend", type=TableChoice(backends), default=None,
                     help="Inference runtime (default: the profile's preference among those installed).")(f)
    f = click.option("--precision", type=TableChoice(precisions), default=None,
                     help="Extractor precision (default: the profile's).")(f)
    f = click.option("--profile", default=None, help="Device profile (default: detected).")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None, callback=_cap_threads,
                     help="Runtime threads, at most the CPU cores here (default: the profile's, else all).")(f)
    f = click.option("--trust", type=click.Path(path_type=Path), default=None, envvar="EDGETL_TRUST",
                     help="Public key (KEY.pub): refuse unsigned or badly signed bundles [env EDGETL_TRUST].")(f)
    return f


def _cap_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    from edgetl.runtime.base import cap_threads

    return cap_threads(value)


def _open(bundle: Path, opts: dict[str, Any]) -> Any:
    from edgetl.device import DeviceRuntime

    return DeviceRuntime(bundle, backend=opts["backend"], precision=opts["precision"], profile=opts["profile"],
                         threads=opts["threads"], trust=_trust_option(opts["trust"]))


@click.group()
def device() -> None:
    """Device side: train a head on local data, predict, evaluate (no torch needed)."""


@device.command()
@_bundle_arg
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ImageFolder of local data.")
@click.option("--head", type=TableChoice(trainable_heads), default="softmax",
              show_default=True, help="softmax: L-BFGS logistic regression; ncm: nearest class mean; knn: cosine "
                                      "k-NN; imprint: cosine classifier from class means.")
@click.option("--val-split", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True,
              help="Held-out fraction for the reported accuracy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Promote gate: largest held-out accuracy loss against the current head.")
@click.option("--force", is_flag=True, help="Promote the new head even if the gate would keep it as a candidate.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait for another trainer to finish.")
@click.option("--shots", type=click.IntRange(min=1), default=None, help="Use at most K images per class.")
@click.option("--incremental", is_flag=True,
              help="Add these images to the current head's training set (old embeddings come from the store).")
@click.option("--features", type=click.Choice(["last", "multi", "auto"]), default="last", show_default=True,
              help="Multi-depth bundles: last-layer features, features from every depth (normalised per group, "
                   "selected), or auto: whichever is more accurate on the held-out part.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Keep at most K embeddings per class for retraining (a uniform reservoir sample of every image "
                   "seen); incremental training and add-class inherit it.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def train(bundle: Path, data_dir: Path, head: str, val_split: float, seed: int, tolerance: float, force: bool,
          wait: float, shots: int | None, incremental: bool, features: str, budget: int | None, as_json: bool,
          quiet: bool, **opts: Any) -> None:
    """Embed local images (cached) and train a new head version; it becomes current if it passes the promote gate."""
    rt = _open(bundle, opts)
    with progress_bars(not (quiet or as_json)) as progress:
        report = rt.train(data_dir, head=head, val_split=val_split, seed=seed, tolerance=tolerance, force=force,
                          wait=wait, shots=shots, incremental=incremental, budget=budget, features=features,
                          progress=progress)
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    acc = "n/a" if report.val_accuracy is None else f"{report.val_accuracy:.3f}"
    click.echo(f"trained {report.head} head {report.version} on {report.n_train} images of {len(report.classes)} "
               f"classes in {report.fit_seconds:.2f} s; held-out accuracy {acc} on {report.n_val} images "
               f"({report.cached} embeddings from the cache)")
    click.echo(f"{'promoted to current' if report.promoted else 'NOT promoted, kept as a candidate'}: {report.reason}")
    if report.features and report.features["features"] != "last" or features == "auto":
        click.echo(f"features: {report.features['features']} ({report.features['reason']})")
    if report.domain is not None:
        click.echo(f"domain check: {report.domain['advice']}")


@device.command()
@_bundle_arg
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def predict(bundle: Path, paths: tuple[Path, ...], top_k: int, as_json: bool, quiet: bool, **opts: Any) -> None:
    """Classify image files with the current head."""
    rt = _open(bundle, opts)
    with progress_bars(not (quiet or as_json)) as progress:
        results = rt.predict(list(paths), top_k=top_k, progress=progress)
    for r in results:
        if as_json:
            click.echo(json.dumps(r))
        else:
            ranked = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
            click.echo(f"{one_line(r['path'])}: {ranked}")  # a newline in a file name cannot forge a line


@device.command()
@_bundle_arg
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Labelled ImageFolder.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Write metrics.json, confusion.png, per_class.csv and per_class.md into this folder.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def evaluate(bundle: Path, data_dir: Path, report_dir: Path | None, as_json: bool, quiet: bool, **opts: Any) -> None:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix of the current head on labelled images."""
    rt = _open(bundle, opts)
    with progress_bars(not (quiet or as_json)) as progress:
        result = rt.evaluate(data_dir, progress=progress)
    if report_dir is not None:
        from edgetl.report import write_report

        written = write_report(result, report_dir)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f} on {result['n']} images "
               f"(head {result['head_version']})")
    click.echo(f"  {'class':<20} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}")
    for name, m in result["per_class"].items():
        click.echo(f"  {name:<20} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {m['support']:>8}")
    if report_dir is not None:
        click.echo(f"report: {', '.join(str(p) for p in written)}")


@device.command()
@_bundle_arg
@click.option("--json", "as_json", is_flag=True)
@_runtime_options
def info(bundle: Path, as_json: bool, **opts: Any) -> None:
    """Show what a bundle holds, its accuracy report, which extractor runs here and which head is current."""
    from edgetl.cli._tables import extractor_table

    data = _open(bundle, opts).info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    b, pp, sel = data["backbone"], data["preprocessing"], data["selected"]
    click.echo(f"bundle       {data['bundle']} (schema {data['schema_version']}, edgetl {data['edgetl_version']})")
    size = f"{pp['input_size']} px" if "input_size" in pp else f"{pp.get('max_length')} tokens"
    click.echo(f"backbone     {b['id']} ({b['source']}), {data['feature_dim']}-d embeddings, {size}")
    click.echo(f"selected     {sel['file']} ({sel['backend']}/{sel['precision']}, profile {data['profile']}, "
               f"threads {sel['threads'] or 'all'})")
    click.echo(f"labels       {', '.join(data['labels'] or []) or '(none: train a head on the device)'}")
    click.echo(f"current head {data['current_head'] or '(none)'}")
    click.echo(extractor_table(data["extractors"]))


@device.command()
@_bundle_arg
@_runtime_options
def verify(bundle: Path, **opts: Any) -> None:
    """Check every file's sha256 and run the golden vectors through this device's runtime."""
    result = _open(bundle, opts).verify()
    if result["golden"] == "absent":
        click.echo(f"{bundle}: files ok; no golden vectors packed")
    else:
        click.echo(f"{bundle}: files ok; golden vectors of {result['extractor']} ok on this device (max abs diff "
                   f"{result['max_abs_diff']:.2e}, min cosine {result['min_cosine']:.6f} to {result['compared_to']})")


@device.command()
@_bundle_arg
@click.option("--json", "as_json", is_flag=True)
@_runtime_options
def history(bundle: Path, as_json: bool, **opts: Any) -> None:
    """List every head version with its status and held-out accuracy."""
    rows = _open(bundle, opts).history()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        acc = r["metrics"].get("val_accuracy")
        acc_s = "   n/a" if acc is None else f"{acc:6.3f}"
        extractor = r.get("extractor") or ("(bundle's initial head)" if r["version"] == "bundle" else "?")
        click.echo(f"{r['version']:<8} {r['status']:<10} {r['head'] or '':<8} {len(r['classes']):>3} classes  "
                   f"val acc {acc_s}  {extractor:<22} {r['created'] or ''}")


@device.command()
@_bundle_arg
@click.option("--to", "to", default=None, help="Version to make current (default: the previous current one).")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True)
@_runtime_options
def rollback(bundle: Path, to: str | None, wait: float, **opts: Any) -> None:
    """Make an earlier head version current again (recorded in the audit log)."""
    version = _open(bundle, opts).rollback(to, wait=wait)
    click.echo(f"current head is now {version}")


@device.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--trust", type=click.Path(path_type=Path), default=None, envvar="EDGETL_TRUST",
              help="Public key: refuse an unsigned or badly signed bundle [env EDGETL_TRUST].")
@click.option("--max-bytes", type=click.IntRange(min=1), default=2 << 30, show_default=True,
              help="Refuse archives that expand beyond this size.")
@click.option("--force", is_flag=True,
              help="DEST is a non-empty folder that is not a bundle (or holds other files): move it aside to "
                   "DEST.before-install-TIME (nothing is deleted) instead of refusing.")
@click.option("--wait", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for a running trainer on DEST to finish.")
def install(archive: Path, dest: Path, trust: Path | None, max_bytes: int, force: bool, wait: float) -> None:
    """Install a bundle archive (from `edgetl bundle pack`) into DEST safely, keeping DEST's device state.

    DEST must be absent, empty or a bundle; the signature (--trust), the replay check (never an older bundle over a
    newer one) and the archive's contents are checked before anything on disk changes."""
    from edgetl.transport import install as run_install

    run_install(archive, dest, trust=_trust_option(trust), max_bytes=max_bytes, force=force, wait=wait)
    click.echo(f"installed {archive} into {dest}")


@device.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def doctor(bundle: Path | None, as_json: bool) -> None:
    """Describe this machine (arch, cores, memory, Python, runtimes, providers), suggest a profile, and say which of
    BUNDLE's extractors can run here and why not."""
    from edgetl.doctor import bundle_report, machine
    from edgetl.profiles import get_profile

    data = machine()
    if bundle is not None:
        data["extractors"] = bundle_report(bundle)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"machine   {data['arch']}, {data['cores']} cores, {data['memory_mb']} MB, Python {data['python']}, "
               f"{data['libc']}")
    for name, rt in data["runtimes"].items():
        providers = f" providers {', '.join(rt['providers'])}" if "providers" in rt else ""
        click.echo(f"runtime   {name}: {rt['package']} {rt['version']}{providers}")
    if not data["runtimes"]:
        click.echo("runtime   none installed: pip install 'edgetl[onnx]' (or [openvino], [tflite])")
    prof = get_profile(data["suggested_profile"])
    click.echo(f"profile   {prof.id}: {prof.description}; prefers {'/'.join(prof.backends)} {prof.precision}")
    for note in prof.constraints:
        click.echo(f"          note: {note}")
    for e in data.get("extractors", []):
        state = "runs here" if e["runnable"] else f"cannot run: {e['why_not']}"
        click.echo(f"extractor {e['file']} ({e['format']}/{e['precision']}): {state}")


@device.command()
@_bundle_arg
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Batch for throughput.")
@click.option("--runs", type=click.IntRange(min=10), default=100, show_default=True, help="Batch-1 timing runs.")
@click.option("--json", "as_json", is_flag=True)
@_runtime_options
def bench(bundle: Path, batch: int, runs: int, as_json: bool, **opts: Any) -> None:
    """Cold start, warm latency p50/p95 (batch 1), throughput (--batch), peak RSS and head-fit time, next to the
    latency the device profile's published figures lead to expect (devices/latency.md) and a verdict."""
    from edgetl.bench import bench as run_bench

    result = run_bench(bundle, backend=opts["backend"], precision=opts["precision"], threads=opts["threads"],
                       batch=batch, runs=runs, profile=opts["profile"])
    if as_json:
        click.echo(json.dumps(result))
        return
    fit = "n/a (no trained head)" if result["head_fit_s"] is None else \
        (f"{result['head_fit_s']:.3f} s on {result['head_fit_n']} stored embeddings, predict "
         f"{result['head_predict_ms']:.3f} ms, {result['head_bytes'] / 1e3:.0f} kB on {result['head_features']} "
         "features")
    click.echo(f"{result['file']} ({result['backend']}/{result['precision']}, threads {result['threads'] or 'all'})")
    click.echo(f"cold start {result['cold_start_s']:.2f} s; batch 1 p50 {result['latency_ms_p50']:.2f} ms, p95 "
               f"{result['latency_ms_p95']:.2f} ms; batch {batch} {result['images_per_s']:.1f} images/s; peak RSS "
               f"{result['peak_rss_mb']:.0f} MB; head fit {fit}")
    if result.get("expected"):
        click.echo(result["expected"]["line"])
    else:
        click.echo(f"expected  no published figure for this backbone in profile {result.get('profile')} "
                   "(devices/latency.md); measured only")


@device.command("add-class")
@_bundle_arg
@click.argument("name")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Folder of NAME's images.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def add_class(bundle: Path, name: str, data_dir: Path, wait: float, quiet: bool, **opts: Any) -> None:
    """Add class NAME without forgetting the others (their embeddings come from the store)."""
    rt = _open(bundle, opts)
    with progress_bars(not quiet) as progress:
        report = rt.add_class(name, data_dir, wait=wait, progress=progress)
    click.echo(f"head {report.version} knows {len(report.classes)} classes ({', '.join(report.classes)})")


@device.command("remove-class")
@_bundle_arg
@click.argument("name")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True)
@_runtime_options
def remove_class(bundle: Path, name: str, wait: float, **opts: Any) -> None:
    """A new head version without class NAME."""
    report = _open(bundle, opts).remove_class(name, wait=wait)
    click.echo(f"head {report.version} knows {len(report.classes)} classes ({', '.join(report.classes)})")


@device.command("rename-class")
@_bundle_arg
@click.argument("old")
@click.argument("new")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True)
@_runtime_options
def rename_class(bundle: Path, old: str, new: str, wait: float, **opts: Any) -> None:
    """A new head version with class OLD called NEW."""
    click.echo(f"head {_open(bundle, opts).rename_class(old, new, wait=wait)}: {old} is now {new}")


@device.command()
@_bundle_arg
@click.option("--json", "as_json", is_flag=True)
@_runtime_options
def store(bundle: Path, as_json: bool, **opts: Any) -> None:
    """Show the embedding store: embeddings per extractor and the current head's training set per class."""
    data = _open(bundle, opts).store_info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for f in data["files"]:
        click.echo(f"{f['file']}: {f['embeddings']} embeddings, {f['bytes'] / 1e6:.2f} MB"
                   f"{'  (extractor in use)' if f['in_use'] else ''}")
    budget = data["budget"]
    click.echo(f"current head {data['current_head']}: per-class budget {budget or 'none (every image kept)'}")
    for name, n in data["current_head_classes"].items():
        click.echo(f"  {name:<20} {n} training images kept of {data['seen'].get(name, n)} seen")


@device.command()
@_bundle_arg
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Folder of new images.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_runtime_options
def drift(bundle: Path, data_dir: Path, as_json: bool, quiet: bool, **opts: Any) -> None:
    """Has the local domain drifted from what the current head was trained on?"""
    rt = _open(bundle, opts)
    with progress_bars(not (quiet or as_json)) as progress:
        result = rt.drift(data_dir, progress=progress)
    if as_json:
        click.echo(json.dumps(result))
        return
    verdict = "DRIFTED: retrain the head on this data" if result["drifted"] else "no drift"
    click.echo(f"{verdict} (median novelty {result['score']:.3f}, threshold {result['threshold']:.3f} from held-out "
               f"training images; {result['unknown_fraction']:.0%} of {result['n']} images unknown)")
