"""``edgetl bundle`` and ``edgetl keys``: transport and signatures (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def bundle() -> None:
    """Pack and sign bundles for transport."""


@bundle.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def pack(bundle_dir: Path, out: Path) -> None:
    """Verify BUNDLE_DIR and write its files (not its device state) to OUT (.tar.gz)."""
    from edgetl.transport import pack as run_pack

    click.echo(f"wrote {run_pack(bundle_dir, out)}")


@bundle.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path),
              help="Private key (edgetl keys generate): Ed25519 writes manifest.sig; ECDSA an OpenSSF model.sig.")
def sign(bundle_dir: Path, key: Path) -> None:
    """Sign BUNDLE_DIR's manifest (which covers every file by sha256), or with an ECDSA key every file in the OpenSSF
    model-signing format (model.sig, verifiable with `model_signing verify key`)."""
    from edgetl.bundle import Bundle
    from edgetl.signing import sign_bundle

    Bundle.load(bundle_dir)  # never sign what does not verify
    click.echo(f"wrote {sign_bundle(bundle_dir, key)}")


@click.group()
def keys() -> None:
    """Signing keys."""


@keys.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Private key file; KEY.pub is written too.")
@click.option("--type", "kind", type=click.Choice(["ed25519", "ecdsa-p256"]), default="ed25519", show_default=True,
              help="ed25519: edgetl's manifest signature; ecdsa-p256: OpenSSF model-signing signatures (model.sig).")
def generate(out: Path, kind: str) -> None:
    """Generate a key pair: OUT (private, mode 0600) and OUT.pub (give this one to devices)."""
    from edgetl.openssf import generate_ec_keys
    from edgetl.signing import generate_keys

    private, public = (generate_ec_keys if kind == "ecdsa-p256" else generate_keys)(out)
    click.echo(f"wrote {private} and {public}")
