"""The fleet on Flower's deployment engine: a SuperLink, SuperNodes and ``flwr run`` as separate processes on loopback,
with TLS, node authentication, signed fleet heads and a device that crashes mid-round (edgetl.fleet.deploy); plus the
pieces that need no Flower process (certificates, head signatures, update checks, ``fleet adopt --trust``)."""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_folder

pytestmark = pytest.mark.fleet
flwr = pytest.importorskip("flwr")

from edgetl.datasets.fashion_mnist import CLASSES
from edgetl.device import DeviceRuntime
from edgetl.errors import BundleError, DataError
from edgetl.fleet.certs import make_certs
from edgetl.fleet.trust import sign_head, statement, verify_head
from edgetl.heads import NCMHead, load_head
from edgetl.heads.base import l2_normalise
from edgetl.heads.prototype import ScaleSearch, scale_moments
from edgetl.signing import generate_keys

#: three devices that together know all ten classes (each knows six), and a fourth, holding the first device's
#: classes, that crashes at its first training reply
SPLITS = [CLASSES[0:6], CLASSES[3:9], CLASSES[0:3] + CLASSES[7:10], CLASSES[0:6]]


@pytest.mark.slow  # ~5 min on 2 busy cores: 6 processes, 7 Flower rounds, one 60 s round timeout (the crash)
def test_deploy_loopback_tls_node_auth_signed_heads_and_a_crash(_pretrained_bundle: Path, demo_train: Path,
                                                                tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgetl.cli import main
    from edgetl.fleet.app import local_data
    from edgetl.fleet.deploy import LoopbackDevice, run_loopback

    bundles = []
    for k, classes in enumerate(SPLITS):
        bundle = Path(shutil.copytree(_pretrained_bundle, tmp_path / f"device{k}"))
        folder = make_folder(tmp_path / f"data{k}", {c: 12 for c in classes}, demo_train)
        for c in classes:  # devices sharing a class hold different images of it
            for p in sorted((folder / c).glob("*.png"))[k % 2::2]:
                p.unlink()
        DeviceRuntime(bundle).train(folder, head="ncm")
        bundles.append(bundle)
    certs = make_certs(tmp_path / "certs", nodes=["dev0", "dev1", "dev2", "dev3", "intruder"])
    key, pub = generate_keys(tmp_path / "operator.key")
    devices = [LoopbackDevice(f"dev{k}", bundles[k], trust=pub) for k in range(3)]
    devices += [LoopbackDevice("dev3", bundles[3], trust=pub, drill="crash"),
                LoopbackDevice("intruder", bundles[0], register=False)]
    data = [local_data(DeviceRuntime(b)) for b in bundles]  # before the run: the heads the devices trained on
    out = tmp_path / "fleet-head"

    run = run_loopback(tmp_path / "work", certs, devices, bundles[0], out,
                       ["--head", "ncm", "--min-clients", "3", "--adopt", "--timeout", "60", "--sign-key", str(key)],
                       run_timeout=420)

    assert run.status == "finished:completed", (run.status, (tmp_path / "work" / "run.log").read_text()[-3000:])
    fleet = run.fleet
    ids = {name: str(node) for name, node in run.node_ids.items()}
    # node authentication: the unregistered device never connected (the SuperLink refused it), the run went on
    assert "intruder" not in ids and "activate" in run.refused["intruder"].lower(), run.refused
    assert sorted(map(str, fleet["accepted"])) == sorted(ids[f"dev{k}"] for k in range(4))
    # the crashing device was left out with a reason; the others finished every round
    assert list(fleet["dropped"]) == [ids["dev3"]] and "no answer to train.ncm" in fleet["dropped"][ids["dev3"]]
    assert all(ids["dev3"] not in per_round for per_round in fleet["bytes_up"])
    assert fleet["rounds"] >= 2 and len(fleet["round_seconds"]) == fleet["rounds"]

    # the federated NCM head is the central one: global centre from every joined device (the join statistics), class
    # sums and counts from the devices that finished, scale fitted on their data
    union = sorted(CLASSES)
    X_all = np.concatenate([d.X for d in data]).astype(np.float64)
    centre = X_all.mean(axis=0).astype(np.float32)
    X = np.concatenate([d.X for d in data[:3]])
    y = np.concatenate([d.to_union(union) for d in data[:3]])
    Z = l2_normalise(X - centre)
    sums = np.zeros((len(union), X.shape[1]))
    np.add.at(sums, y, Z.astype(np.float64))
    fed = load_head(out / "head.npz")
    assert isinstance(fed, NCMHead) and fleet["classes"] == union
    np.testing.assert_array_equal(fed.counts_, np.bincount(y, minlength=len(union)))
    np.testing.assert_allclose(fed.centre_, centre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fed.sums_, sums, rtol=1e-4, atol=1e-4)
    cos = (Z @ NCMHead.from_sums(fed.centre_, sums, fed.counts_, 1.0).prototypes().T).astype(np.float64)
    search = ScaleSearch()  # the scale fit of NCMHead, on the three devices' data
    while not search.done:
        search.update(scale_moments(cos, y, search.scale))
    central = NCMHead.from_sums(fed.centre_, sums, fed.counts_, search.scale)
    assert float(fed.scale_) == pytest.approx(float(central.scale_), rel=1e-4)
    np.testing.assert_allclose(fed.decision_function(X), central.decision_function(X), atol=1e-3)

    # signed with the operator's key; every surviving device verified it and adopted it through its gate
    assert fleet["signer"] and (out / "head.sig").stat().st_size == 64
    for k in range(3):
        adopted = fleet["adopted"][ids[f"dev{k}"]]
        assert not adopted["refused"] and fleet["signer"] in adopted["signer"], adopted
        runtime = DeviceRuntime(bundles[k])
        head, labels, version = runtime.load_current_head()
        assert labels == union and version == adopted["version"] == "v0002"
        np.testing.assert_allclose(head.decision_function(X[:20]), fed.decision_function(X[:20]), rtol=1e-5)
        entry = [e for e in runtime.state.audit() if e.get("version") == version][-1]  # the audit log
        assert f"signed by {fleet['signer']}" in entry["source"], entry
    assert DeviceRuntime(bundles[3]).current_version() == "v0001"  # the crashed device kept its own head

    # fleet adopt (a device that was offline) checks the signature: a tampered head with a matching fleet.json
    # sha256, an unsigned head and a head signed by another key are refused; the intact one is adopted
    runner = CliRunner()
    late = Path(shutil.copytree(_pretrained_bundle, tmp_path / "late"))
    DeviceRuntime(late).train(make_folder(tmp_path / "data-late", {c: 6 for c in SPLITS[0]}, demo_train), head="ncm")
    env = {"EDGETL_TRUST": str(pub)}
    forged = Path(shutil.copytree(out, tmp_path / "forged"))
    head_bytes = bytearray((forged / "head.npz").read_bytes())
    alt = NCMHead()
    alt.centre_, alt.sums_, alt.counts_, alt.scale_ = fed.centre_, fed.sums_ * 1.01, fed.counts_, fed.scale_
    alt.save(forged / "head.npz")
    meta = json.loads((forged / "fleet.json").read_text())
    meta["head_sha256"] = hashlib.sha256((forged / "head.npz").read_bytes()).hexdigest()
    (forged / "fleet.json").write_text(json.dumps(meta))
    res = runner.invoke(main, ["fleet", "adopt", str(late), "--head", str(forged)], env=env)
    assert res.exit_code == 1 and "does not verify" in res.output, res.output
    (forged / "head.sig").unlink()
    res = runner.invoke(main, ["fleet", "adopt", str(late), "--head", str(forged)], env=env)
    assert res.exit_code == 1 and "not signed" in res.output, res.output
    _, other_pub = generate_keys(tmp_path / "other.key")
    res = runner.invoke(main, ["fleet", "adopt", str(late), "--head", str(out), "--trust", str(other_pub)])
    assert res.exit_code == 1 and "does not verify" in res.output, res.output
    assert DeviceRuntime(late).current_version() == "v0001"
    assert bytes(head_bytes) == (out / "head.npz").read_bytes()
    res = runner.invoke(main, ["fleet", "adopt", str(late), "--head", str(out)], env=env)
    assert res.exit_code == 0 and f"signed by {fleet['signer']}" in res.output, res.output
    assert DeviceRuntime(late).current_version() == "v0002"


# ------------------------------------------------------------------------------------------- no Flower process needed
def test_certs_make_a_ca_server_cert_and_node_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    made = make_certs(tmp_path / "c", hosts=["fleet.example", "10.0.0.5"], nodes=["cam-1"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fleet.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    context = ssl.create_default_context(cafile=str(made.ca_cert))  # a TLS client accepts the CA
    context.load_cert_chain(made.server_cert, made.server_key)
    private, public = made.node_keys["cam-1"]
    assert (private.stat().st_mode & 0o777) == 0o600 and (made.ca_key.stat().st_mode & 0o777) == 0o600
    assert isinstance(load_ssh_private_key(private.read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key(public.read_bytes()), ec.EllipticCurvePublicKey)
    # a second call adds devices without touching the CA; an existing device key is never overwritten
    again = make_certs(tmp_path / "c", nodes=["cam-2"])
    assert again.ca_cert.read_bytes() == made.ca_cert.read_bytes() and "cam-2" in again.node_keys
    with pytest.raises(DataError, match="refusing to overwrite"):
        make_certs(tmp_path / "c", nodes=["cam-1"])
    with pytest.raises(DataError, match="node name"):
        make_certs(tmp_path / "c", nodes=["../x"])
    # a file or a link where the folder should be: a clear refusal, nothing written through the link
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for bad in ("file", "link"):
        with pytest.raises(DataError, match="is not a folder"):
            make_certs(tmp_path / bad, nodes=["cam-1"])
    assert not (tmp_path / "elsewhere").exists() and (tmp_path / "file").read_text() == "x"


def test_head_signature_covers_head_labels_and_extractor(tmp_path: Path) -> None:
    key, pub = generate_keys(tmp_path / "k")
    _, other = generate_keys(tmp_path / "o")
    head, labels, sha = b"head-bytes", ["a", "b"], "f" * 64
    signed = sign_head(head, labels, sha, key)
    assert len(signed.signature) == 64 and verify_head(head, labels, sha, signed.signature, pub, "h") == signed.signer
    for args in [(b"head-bytez", labels, sha), (head, ["b", "a"], sha), (head, labels, "e" * 64)]:
        with pytest.raises(BundleError, match="does not verify"):
            verify_head(*args, signed.signature, pub, "h")
    with pytest.raises(BundleError, match="does not verify"):
        verify_head(head, labels, sha, signed.signature, other, "h")
    with pytest.raises(BundleError, match="not signed"):
        verify_head(head, labels, sha, b"", pub, "h")
    assert statement(head, labels, sha) != statement(head, labels + ["c"], sha)


def test_check_arrays_rejects_nan_wrong_shape_and_negative_counts() -> None:
    from flwr import app as fa

    from edgetl.fleet.app import check_arrays

    good = fa.RecordDict({"arrays": fa.ArrayRecord({"sums": fa.Array(np.zeros((3, 4))),
                                                    "counts": fa.Array(np.array([1, 2, 0]))})})
    shapes = {"sums": (3, 4), "counts": (3,)}
    assert check_arrays(good, shapes) == ""
    nan = np.zeros((3, 4))
    nan[1, 2] = np.nan
    bad = fa.RecordDict({"arrays": fa.ArrayRecord({"sums": fa.Array(nan), "counts": fa.Array(np.array([1, 2, 0]))})})
    assert "NaN" in check_arrays(bad, shapes)
    bad = fa.RecordDict({"arrays": fa.ArrayRecord({"sums": fa.Array(np.zeros((3, 3))),
                                                   "counts": fa.Array(np.array([1, 2, 0]))})})
    assert "shape (3, 3), expected (3, 4)" in check_arrays(bad, shapes)
    bad = fa.RecordDict({"arrays": fa.ArrayRecord({"sums": fa.Array(np.zeros((3, 4))),
                                                   "counts": fa.Array(np.array([1, -2, 0]))})})
    assert "negative" in check_arrays(bad, shapes)
    assert "lacks 'counts'" in check_arrays(fa.RecordDict({"arrays": fa.ArrayRecord(
        {"sums": fa.Array(np.zeros((3, 4)))})}), shapes)


def test_cli_certs_and_client_command_line(tmp_path: Path, _pretrained_bundle: Path, demo_train: Path) -> None:
    from click.testing import CliRunner

    from edgetl.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["fleet", "certs", str(tmp_path / "c"), "--node", "cam-1"])
    assert res.exit_code == 0 and "cam-1" in res.output, res.output
    bundle = Path(shutil.copytree(_pretrained_bundle, tmp_path / "b"))
    DeviceRuntime(bundle).train(make_folder(tmp_path / "d", {"bag": 5, "coat": 5}, demo_train), head="ncm")
    _, pub = generate_keys(tmp_path / "op")
    res = runner.invoke(main, ["fleet", "client", str(bundle), "--superlink", "127.0.0.1:9093", "--root-certificates",
                               str(tmp_path / "c" / "ca.crt"), "--auth-key", str(tmp_path / "c" / "nodes" / "cam-1"),
                               "--trust", str(pub), "--port", "9200", "--drill", "nan", "--dry-run"])
    assert res.exit_code == 0, res.output
    for part in ("--root-certificates", "--auth-supernode-private-key", "--port 9200", 'trust="', 'drill="nan"'):
        assert part in res.output, (part, res.output)
    res = runner.invoke(main, ["fleet", "client", str(bundle), "--superlink", "x:1", "--insecure", "--auth-key",
                               str(tmp_path / "c" / "nodes" / "cam-1"), "--dry-run"])
    assert res.exit_code == 2 and "--insecure" in res.output
    res = runner.invoke(main, ["fleet", "client", str(bundle), "--superlink", "x:1", "--trust",
                               str(tmp_path / "c" / "ca.crt"), "--dry-run"])
    assert res.exit_code == 1 and "trusted public key" in res.output, res.output
