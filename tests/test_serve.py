"""``edgetl device serve``: every API endpoint, its refusals, and that state changes go through the device's code.

One real console (uvicorn on 127.0.0.1, a free port) per module over a real bundle with a head trained on the demo
data and an inbox its watcher thread classifies; the requests are real HTTP requests. Tests that change the head run
last, in file order.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'edgetl[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'edgetl[serve]'")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed: pip install 'edgetl[serve]'")

from click.testing import CliRunner

from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.serve.app import ServeSettings, create_app
from edgetl.serve.console import Console, check_label
from edgetl.serve.queue import BATCH, NOVEL_EVERY, rank
from tests.conftest import make_folder

TOKEN = "test-token-0123456789abcdef"
KNOWN = ["ankle_boot", "bag", "coat", "trouser"]


class Served:
    """A console served by uvicorn in a thread on 127.0.0.1 (a free port)."""

    def __init__(self, app: Any):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:  # noqa: PYI034
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the console did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None, token: str | None = TOKEN,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = {"Host": f"127.0.0.1:{self.port}"}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h |= headers or {}
        conn.request(method, path, body=body, headers=h)
        res = conn.getresponse()
        data = res.read()
        out_headers = {k.lower(): v for k, v in res.getheaders()}
        conn.close()
        if out_headers.get("content-type", "").startswith("application/json"):
            return res.status, out_headers, json.loads(data)
        return res.status, out_headers, data


def wait_for(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def served(_pretrained_bundle: Path, demo_train: Path, demo_test: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path, Path]]:
    tmp = tmp_path_factory.mktemp("serve")
    bundle = Path(shutil.copytree(_pretrained_bundle, tmp / "bundle"))
    rt = DeviceRuntime(bundle, threads=2)
    rt.train(make_folder(tmp / "train", {c: 12 for c in KNOWN}, demo_train), seed=0)
    inbox = tmp / "inbox"
    inbox.mkdir()
    for c in [*KNOWN, "sneaker"]:
        for p in sorted((demo_test / c).glob("*.png"))[:6]:
            shutil.copy(p, inbox / f"{c}-{p.name}")
    console = Console(rt, inbox=inbox, lock_wait=30)

    def watcher(stop: threading.Event) -> None:
        from edgetl.watch import InboxWatcher

        with InboxWatcher(rt, inbox, interval=0.2, settle=0) as w:
            w.run(stop)

    app = create_app(console, ServeSettings(token=TOKEN, max_upload=200_000), watcher)
    with Served(app) as s:
        wait_for(lambda: len(s.request("GET", "/api/results?limit=100")[2]["results"]) >= 30)
        yield s, bundle, inbox


def _image(demo_test: Path, cls: str = "bag") -> Path:
    return max((demo_test / cls).glob("*.png"))


# ---------------------------------------------------------------------------------------------------- reading
def test_health_info_page_and_security_headers(served: tuple[Served, Path, Path]) -> None:
    s, _, inbox = served
    status, headers, body = s.request("GET", "/api/health", token=None)
    assert status == 200 and body["status"] == "ok" and body["head_version"] == "v0001"
    assert body["watcher"] == "running"
    status, _, info = s.request("GET", "/api/info", token=None)
    assert status == 200 and info["classes"] == KNOWN and info["current_head"] == "v0001"
    assert info["inbox"] == str(inbox) and info["loopback_only"] is True
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        status, headers, page = s.request("GET", path, token=None)
        assert status == 200 and headers["content-type"].startswith(kind) and len(page) > 500
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    assert b"http://" not in s.request("GET", "/", token=None)[2]  # no CDN: every asset from this server


def test_predict_is_the_cli_answer(served: tuple[Served, Path, Path], demo_test: Path) -> None:
    s, bundle, _ = served
    image = _image(demo_test)
    status, _, answer = s.request("POST", "/api/predict?top_k=3", image.read_bytes(),
                                  headers={"Content-Type": "application/octet-stream"})
    assert status == 200, answer
    cli = CliRunner().invoke(main, ["device", "predict", str(bundle), str(image), "--json", "--top-k", "3"])
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.output.splitlines()[-1])
    assert answer.pop("path") == "upload" and expected.pop("path") == str(image)
    assert answer == expected
    assert answer["label"] == "bag" and len(answer["top_k"]) == 3 and "unknown" in answer


def test_results_thumbnails_and_queue_ranking(served: tuple[Served, Path, Path]) -> None:
    s, _, _ = served
    status, _, body = s.request("GET", "/api/results?limit=100")
    results = body["results"]
    assert status == 200 and len(results) == 30
    assert {r["status"] for r in results} == {"ok"} and all(r["head_version"] == "v0001" for r in results)
    status, headers, png = s.request("GET", f"/api/image/{results[0]['id']}")
    assert status == 200 and headers["content-type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, _, q = s.request("GET", "/api/queue?limit=30")
    assert status == 200 and q["length"] == 30 and q["classes"] == KNOWN and len(q["items"]) == 30
    threshold = _threshold(s)
    novel = [i for i in q["items"] if i["placed_by"] == "novelty"]
    uncertain = [i for i in q["items"] if i["placed_by"] == "uncertainty"]
    assert uncertain and q["items"][0]["placed_by"] == ("novelty" if novel else "uncertainty")
    for item in q["items"]:
        assert item["priority"] == pytest.approx(1 - item["margin"], abs=1e-5)
    # places 0, 10, 20: the most novel images beyond the threshold (most novel first); the rest by uncertainty
    assert [k for k, i in enumerate(q["items"]) if i["placed_by"] == "novelty"] == \
        [k for k in range(0, 30, NOVEL_EVERY)][:len(novel)]
    assert all(i["novelty_now"] > threshold for i in novel)
    assert [i["novelty_now"] for i in novel] == sorted((i["novelty_now"] for i in novel), reverse=True)
    # uncertainty places: each page of BATCH spread over the embedding space, then ordered by uncertainty
    for start in range(0, 30, BATCH):
        page = [i["priority"] for i in q["items"][start:start + BATCH] if i["placed_by"] == "uncertainty"]
        assert page == sorted(page, reverse=True)
    assert "spread" in q["ranking"]
    ids = [i["id"] for i in q["items"]]
    assert ids != sorted(ids) and ids != sorted(ids, reverse=True)  # not arrival order
    # the sneakers (a class the head does not know, arrived last) look more novel than the known classes on average
    novelty = {f: [i["novelty_now"] for i in q["items"] if i["file"].startswith(f)] for f in [*KNOWN, "sneaker"]}
    assert sum(novelty["sneaker"]) / 6 > sum(sum(v) for k, v in novelty.items() if k != "sneaker") / 24, novelty


def _threshold(s: Served) -> float:
    return float(s.request("GET", "/api/drift")[2]["threshold"])


def test_rank_interleaves_uncertainty_and_novelty() -> None:
    import numpy as np

    proba = np.array([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3], [0.8, 0.2]])
    assert rank(proba).order.tolist() == [1, 2, 3, 0]  # by margin, smallest first
    # a confident but novel image takes the first place; the next novelty place (every 2nd here) the next novel one
    r = rank(proba, novelty=np.array([4.0, 0.5, 0.5, 2.0]), threshold=1.0, novel_every=2)
    assert r.order.tolist() == [0, 1, 3, 2]
    assert r.by_novelty.tolist() == [True, False, False, True] and r.novelty_term is not None
    assert r.novelty_term.tolist() == [3.0, 0.0, 0.0, 1.0]
    # nothing beyond the threshold: uncertainty alone
    assert rank(proba, novelty=np.full(4, 0.5), threshold=1.0).order.tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError):
        rank(np.zeros(3))


def test_queue_cold_start_set_is_the_heads_training_set_while_it_has_few_labels(
        _pretrained_bundle: Path, demo_train: Path, tmp_path: Path) -> None:
    """The console hands the queue the current head's training embeddings only while the head has fewer than the
    cold-start number of labels per class, and never for a head this device did not train."""
    import numpy as np

    from edgetl.serve.candidates import CandidatePool
    from edgetl.serve.queue import COLD_START_PER_CLASS
    from edgetl.state import BUNDLE_HEAD

    bundle = Path(shutil.copytree(_pretrained_bundle, tmp_path / "bundle"))
    rt = DeviceRuntime(bundle, threads=2)
    pool = CandidatePool(rt, None, None, 10)  # type: ignore[arg-type]  # only the runtime is read here
    assert pool._cold_start_set(BUNDLE_HEAD, 2) is None
    few = rt.train(make_folder(tmp_path / "few", {"bag": 3, "coat": 3}, demo_train), seed=0).version
    X = pool._cold_start_set(few, 2)
    assert X is not None and X.shape == (6, rt.bundle.feature_dim)
    np.testing.assert_array_equal(X, rt.training_set().X)
    enough = {"bag": COLD_START_PER_CLASS, "coat": COLD_START_PER_CLASS}
    full = rt.train(make_folder(tmp_path / "enough", enough, demo_train), seed=0, force=True).version
    assert full != few and pool._cold_start_set(full, 2) is None


def test_drift_confusion_metrics(served: tuple[Served, Path, Path]) -> None:
    s, _, _ = served
    status, _, d = s.request("GET", "/api/drift")
    assert status == 200 and d["n"] == 30 and d["threshold"] > 0 and isinstance(d["drifted"], bool)
    assert d["score"] == d["series"][-1]["drift"] and 0 <= d["unknown_fraction"] <= 1
    status, _, c = s.request("GET", "/api/confusion")
    assert status == 200 and set(c) >= {"classes", "matrix", "n", "per_version"}
    status, headers, text = s.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = text.decode()
    for name in ("edgetl_predictions_total{", "edgetl_unknown_rate", "edgetl_drift_score", "edgetl_head_version 1.0",
                 "edgetl_predict_latency_seconds_bucket", "edgetl_label_queue_length 30.0"):
        assert name in text, name
    assert 'source="inbox"' in text


# -------------------------------------------------------------------------------------------------- refusals
def test_state_changes_need_the_token(served: tuple[Served, Path, Path]) -> None:
    s, bundle, _ = served
    for method, path, body in (("POST", "/api/label", {"id": 1, "label": "bag"}), ("POST", "/api/train", {}),
                               ("POST", "/api/rollback", {}), ("POST", "/api/promote", {"version": "v0001"}),
                               ("POST", "/api/add-class", {"name": "x"}), ("POST", "/api/predict", b"x")):
        status, _, err = s.request(method, path, body, token=None)
        assert status == 401 and "token" in err["error"], (path, err)
        status, _, err = s.request(method, path, body, token="wrong-token-0123456789")
        assert status == 403 and "wrong token" in err["error"], (path, err)
        status, _, err = s.request(method, path, body, token=None, headers={"X-Edgetl-Token": "nope"})
        assert status == 403
    assert DeviceRuntime(bundle).current_version() == "v0001"  # nothing changed


def test_cross_site_and_rebinding_refused(served: tuple[Served, Path, Path]) -> None:
    s, _, _ = served
    status, _, err = s.request("POST", "/api/rollback", {}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-site" in err["error"]
    status, _, err = s.request("POST", "/api/rollback", {}, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "cross-site" in err["error"]
    status, _, err = s.request("GET", "/api/info", headers={"Host": "evil.example:8080"})
    assert status == 403 and "loopback" in err["error"]
    # the page's own requests pass
    status, _, _ = s.request("POST", "/api/rollback", {"to": "not-a-version"},
                             headers={"Origin": f"http://127.0.0.1:{s.port}", "Sec-Fetch-Site": "same-origin"})
    assert status == 409


def test_uploads_bounded_and_decoded_safely(served: tuple[Served, Path, Path], tmp_path: Path) -> None:
    s, _, _ = served
    status, _, err = s.request("POST", "/api/predict", b"\x89PNG" + b"\0" * 300_000)
    assert status == 413 and "limit of 200000 bytes" in err["error"]
    # a chunked body (no Content-Length) is counted as it arrives and cut off at the limit too
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/api/predict", body=iter([b"\0" * 65536] * 8), encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}", "Host": f"127.0.0.1:{s.port}"})
    res = conn.getresponse()
    assert res.status == 413 and "limit of 200000 bytes" in json.loads(res.read())["error"]
    conn.close()
    status, _, err = s.request("POST", "/api/predict", b"this is not an image at all")
    assert status == 400 and "not a PNG" in err["error"] and "Traceback" not in err["error"]
    assert "upload" in err["error"] and "edgetl-serve-" not in err["error"]  # no server path leaks
    status, _, err = s.request("POST", "/api/predict", b"")
    assert status == 400 and "empty" in err["error"]
    # a decompression bomb: a PNG header declaring 10000 x 10000 pixels, refused by the decode budget before decoding
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    status, _, err = s.request("POST", "/api/predict", bomb)
    assert status == 400 and "more than the limit" in err["error"]


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".hidden", "_label", "a\\b", "bad\nname",
                                  "", "x" * 65, 7, None, "trailing."])
def test_path_like_labels_refused(served: tuple[Served, Path, Path], name: object) -> None:
    s, _, inbox = served
    item = s.request("GET", "/api/results?limit=1")[2]["results"][0]
    status, _, err = s.request("POST", "/api/label", {"id": item["id"], "label": name})
    assert status == 400 and "is not a class name" in err["error"]
    status, _, err = s.request("POST", "/api/add-class", {"name": name})
    assert status == 400 and "is not a class name" in err["error"]
    assert not (inbox / "_watch" / "labels.jsonl").exists() or name not in \
        (inbox / "_watch" / "labels.jsonl").read_text()


def test_bad_ids_versions_and_endpoints(served: tuple[Served, Path, Path]) -> None:
    s, _, _ = served
    for path in ("/api/image/..%2F..%2Fetc%2Fpasswd", "/api/image/-1", "/api/image/abc"):
        status, _, err = s.request("GET", path)
        assert status in (400, 404) and "error" in err, path
    status, _, err = s.request("GET", "/api/image/999999")
    assert status == 404 and "no image with id" in err["error"]
    status, _, err = s.request("POST", "/api/rollback", {"to": "../../etc"})
    assert status == 409 and "not a head version name" in err["error"]
    status, _, err = s.request("POST", "/api/promote", {"version": "/tmp/x"})
    assert status == 409 and "not a head version name" in err["error"]
    status, _, err = s.request("POST", "/api/label", {"id": "../1", "label": "bag"})
    assert status == 400 and "image id" in err["error"]
    status, _, err = s.request("POST", "/api/label", b"not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in err["error"]
    status, _, err = s.request("POST", "/api/train", b"{}", headers={"Content-Type": "text/plain"})
    assert status == 400 and "Content-Type: application/json" in err["error"]
    status, _, err = s.request("GET", "/api/nothing")
    assert status == 404 and "no such endpoint" in err["error"]
    status, _, err = s.request("GET", "/api/train")
    assert status == 405 and "not allowed" in err["error"]
    status, _, err = s.request("GET", "/api/queue?limit=100000")
    assert status == 400 and "between" in err["error"]


def test_check_label() -> None:
    assert check_label("T-shirt top") == "T-shirt top" and check_label("kettle.v2") == "kettle.v2"
    assert check_label("Zürich") == "Zürich"
    assert check_label("_odd name/", known=["_odd name/"]) == "_odd name/"  # a class the head already has
    with pytest.raises(ValueError, match="not a class name"):
        check_label("a/b")


def test_beyond_loopback_everything_needs_the_token(served: tuple[Served, Path, Path]) -> None:
    _, bundle, _ = served
    console = Console(DeviceRuntime(bundle))
    app = create_app(console, ServeSettings(token=TOKEN, host="0.0.0.0"))  # the Guard's rules for 0.0.0.0
    with Served(app) as other:
        assert other.request("GET", "/api/health", token=None)[0] == 200
        assert other.request("GET", "/", token=None)[0] == 200
        for path in ("/api/info", "/api/history", "/metrics", "/api/queue"):
            assert other.request("GET", path, token=None)[0] == 401, path
        assert other.request("GET", "/api/info", headers={"Host": "device.local:8080"})[0] == 200
        status, _, err = other.request("GET", "/api/queue")
        assert status == 400 and "--inbox" in err["error"] or status == 200


def test_cli_refuses_open_host_without_token(tmp_path: Path, served: tuple[Served, Path, Path]) -> None:
    _, bundle, _ = served
    r = CliRunner().invoke(main, ["device", "serve", str(bundle), "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "--token-file" in r.output
    short = tmp_path / "token"
    short.write_text("short\n")
    r = CliRunner().invoke(main, ["device", "serve", str(bundle), "--host", "0.0.0.0", "--token-file", str(short)])
    assert r.exit_code == 1 and "at least 16 characters" in r.output


# ------------------------------------------------------------------------------------ state changes (in order)
def _audit(bundle: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (bundle / "state" / "audit.jsonl").read_text().splitlines()]


def test_label_add_class_train_history_rollback(served: tuple[Served, Path, Path]) -> None:
    s, bundle, _ = served
    q = s.request("GET", "/api/queue?limit=30")[2]
    sneakers = [i for i in q["items"] if i["file"].startswith("sneaker")][:4]
    for item in sneakers:
        status, _, body = s.request("POST", "/api/label", {"id": item["id"], "label": "sneaker"})
        assert status == 200 and body["labelled"]["label"] == "sneaker"
        assert body["labelled"]["predicted"] == item["label"] and body["labelled"]["head_version"] == "v0001"
    status, _, err = s.request("POST", "/api/add-class", {"name": "sandal"})
    assert status == 400 and "no labelled images of class 'sandal'" in err["error"]
    status, _, report = s.request("POST", "/api/add-class", {"name": "sneaker"})
    assert status == 200, report
    assert report["version"] == "v0002" and report["classes"] == [*KNOWN, "sneaker"] and report["promoted"]
    q = s.request("GET", "/api/queue?limit=30")[2]
    assert q["head_version"] == "v0002" and q["length"] == 26 and "sneaker" in q["classes"]
    labelled = 0
    for item in q["items"][:8]:  # the operator answers the top of the queue with the file's true class
        truth = item["file"].split("-")[0]
        assert s.request("POST", "/api/label", {"id": item["id"], "label": truth})[0] == 200
        labelled += 1
    assert s.request("GET", "/api/queue")[2]["length"] == 26 - labelled
    status, _, report = s.request("POST", "/api/train", {})
    assert status == 200, report
    assert report["version"] == "v0003" and report["incremental"] and report["labelled_images"] == 12
    history = s.request("GET", "/api/history")[2]["history"]
    assert [r["version"] for r in history] == ["v0001", "v0002", "v0003"]
    current = [r for r in history if r["status"] == "current"]
    assert len(current) == 1 and current[0]["version"] == ("v0003" if report["promoted"] else "v0002")
    assert history[0]["operator_agreement"]["n"] == 4 and history[1]["operator_agreement"]["n"] == 8
    confusion = s.request("GET", "/api/confusion")[2]
    assert confusion["n"] == 12 and "sneaker" in confusion["classes"]
    # rollback through the device's code: the audit log names the console
    before = DeviceRuntime(bundle).current_version()
    status, _, body = s.request("POST", "/api/rollback", {})
    assert status == 200 and body["current"] != before
    assert DeviceRuntime(bundle).current_version() == body["current"]
    audit = _audit(bundle)
    assert audit[-1]["action"] == "rollback" and audit[-1]["reason"] == "rollback from the operator's console"
    assert [a["action"] for a in audit].count("promote") >= 2
    assert "edgetl_head_version 2.0" in s.request("GET", "/metrics")[2].decode() or body["current"] != "v0002"
    # a promote of a version that is no candidate is refused
    status, _, err = s.request("POST", "/api/promote", {"version": "v0001"})
    assert status == 400 and "not a candidate" in err["error"]


def test_promote_a_candidate(served: tuple[Served, Path, Path], demo_train: Path, tmp_path: Path) -> None:
    s, bundle, _ = served
    rt = DeviceRuntime(bundle)
    s.request("POST", "/api/rollback", {"to": "v0001"})
    # a worse head of the same classes (every class folder holds images of all four: labels are noise) is kept as a
    # candidate by the promote gate
    shuffled = tmp_path / "bad"
    for k, c in enumerate(KNOWN):
        (shuffled / c).mkdir(parents=True)
        for j, source in enumerate(KNOWN):
            for p in sorted((demo_train / source).glob("*.png"))[12 + 3 * k:15 + 3 * k]:
                shutil.copy(p, shuffled / c / f"{j}-{p.name}")
    report = rt.train(shuffled, tolerance=0.0, seed=1)
    assert not report.promoted, report.reason
    history = s.request("GET", "/api/history")[2]["history"]
    assert any(r["version"] == report.version and r["status"] == "candidate" for r in history)
    status, _, body = s.request("POST", "/api/promote", {"version": report.version})
    assert status == 200 and body["current"] == report.version
    assert rt.current_version() == report.version
    assert _audit(bundle)[-1]["reason"] == "candidate promoted from the operator's console"


def test_a_second_writer_is_refused_cleanly(served: tuple[Served, Path, Path]) -> None:
    """While another process trains (it holds the writer lock), a console state change waits, then says why."""
    _, bundle, _ = served
    from edgetl.errors import StateError
    from edgetl.state import DeviceState

    console = Console(DeviceRuntime(bundle), lock_wait=0.3)
    before = DeviceRuntime(bundle).current_version()
    with DeviceState(bundle / "state").writer(0), pytest.raises(StateError):
        console.rollback("v0001")
    assert DeviceRuntime(bundle).current_version() == before


def test_console_reads_the_journal_of_a_running_watch(served: tuple[Served, Path, Path]) -> None:
    """Beside `device watch`: the journal's lock is held (here by the fixture's watcher), so the console's own
    watcher stands down and the console reads the journal."""
    _, bundle, inbox = served
    from edgetl.cli.serve import _watcher

    run = _watcher(DeviceRuntime(bundle), inbox, None, None, 0.2, 0)
    assert run(threading.Event()).startswith("external")


def test_the_cli_serves(served: tuple[Served, Path, Path], tmp_path: Path) -> None:
    """`edgetl device serve` as a process: prints the address with a fresh token; the token works, others do not."""
    import re
    import socket
    import subprocess
    import sys

    _, bundle, _ = served
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "device", "serve", str(bundle), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
        assert lines[0].startswith(f"edgetl console on http://127.0.0.1:{port}/"), lines
        token = re.search(r"#token=(\S+)", lines[1]).group(1)  # type: ignore[union-attr]
        client = Served.__new__(Served)
        client.port = port
        status = None
        for _ in range(100):
            try:
                status, _, body = client.request("GET", "/api/health", token=None)
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200 and body["watcher"] == "off"
        assert client.request("POST", "/api/rollback", {"to": "v9999"}, token=token)[0] == 409  # accepted, then refused
        assert client.request("POST", "/api/rollback", {}, token=TOKEN)[0] == 403
    finally:
        proc.terminate()
        proc.wait(30)
