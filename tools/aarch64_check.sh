#!/usr/bin/env bash
# An emulated Raspberry Pi: the device side of edgetl on Debian bookworm arm64 under qemu-user (functional, not speed).
#
#   sudo bash tools/aarch64_check.sh            (root: apt-get, binfmt, mmdebstrap, mount, chroot)
#
# 1. builds once and caches a Debian bookworm arm64 root ($EDGETL_AARCH64_ROOT, default
#    /var/cache/edgetl-aarch64/rootfs; never inside the repository) with mmdebstrap, installing qemu-user-static and
#    mmdebstrap with apt-get if missing and registering the qemu-aarch64 binfmt handler if it is missing;
# 2. installs edgetl[onnx,tflite] in a venv inside it from a wheel of this checkout, with requirements/lock.txt as
#    constraints, from the package registry; then (EDGETL_AARCH64_KIT=1, the default) a second time offline from a
#    field kit made on this host by `edgetl bundle kit B KIT --profile raspberry-pi-5`;
# 3. exports a small bundle B on this host (.venv: mobilenet_v2, 96 px, ONNX + TFLite, FP32 + INT8, demo data) and
#    runs inside the root, for ONNX Runtime and LiteRT, FP32 and INT8: device doctor, verify (golden vectors), train,
#    predict, evaluate, watch --once, rollback, on a few demo images;
# 4. measures INT8-vs-FP32 cosine for the same images on aarch64 and on this x86-64 host;
# 5. writes every command, its result, the fidelity table and the versions to docs/aarch64.md ($EDGETL_AARCH64_DOC)
#    and prints a summary. Exits non-zero if any check fails.
#
# Environment: EDGETL_AARCH64_ROOT (cached root), EDGETL_AARCH64_DOC (report path), EDGETL_AARCH64_BUNDLE (reuse an
# exported bundle instead of exporting), EDGETL_AARCH64_KIT=0 (skip the field-kit install), EDGETL_AARCH64_TRAIN
# (images per class for train, default 5), EDGETL_AARCH64_TEST (per class for evaluate and fidelity, default 2),
# EDGETL_AARCH64_MIRROR (Debian mirror; default: the first URIs of /etc/apt/sources.list.d/debian.sources),
# EDGETL_AARCH64_ONLY=fidelity (only the install and the INT8-vs-FP32 fidelity of EDGETL_AARCH64_BUNDLE, under
# EDGETL_AARCH64_CPU only: how a bundle exported for real, e.g. at 224 px by tools/measure_int8.py, behaves on aarch64),
# EDGETL_AARCH64_CPU (qemu's CPU model, default cortex-a76: a Raspberry Pi 5's core, no SVE/SME/i8mm; qemu's default
# "max" has them, and numpy's OpenBLAS then picks its armv9sme kernel; the fidelity table is measured under both).
# /sys is never mounted in the root: onnxruntime's cpuinfo segfaults under qemu when it can read it.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${EDGETL_HOST_PYTHON:-$REPO/.venv/bin/python}
EDGETL=${EDGETL_HOST_CLI:-$REPO/.venv/bin/edgetl}
ROOT=${EDGETL_AARCH64_ROOT:-/var/cache/edgetl-aarch64/rootfs}
DOC=${EDGETL_AARCH64_DOC:-$REPO/docs/aarch64.md}
KIT_ON=${EDGETL_AARCH64_KIT:-1}
NTRAIN=${EDGETL_AARCH64_TRAIN:-5}
NTEST=${EDGETL_AARCH64_TEST:-2}
CPU=${EDGETL_AARCH64_CPU:-cortex-a76}
ONLY=${EDGETL_AARCH64_ONLY:-all}
PROFILE=raspberry-pi-5
THREADS=2
INCLUDE=python3,python3-venv,python3-pip,ca-certificates,libgomp1
WORK=$(mktemp -d /tmp/edgetl-aarch64.XXXXXX)  # host side: logs, the bundle, the kit
GUEST=/opt/edgetl                              # inside the root: fresh each run
LOGS=$WORK/logs
mkdir -p "$LOGS"
DETAILS=$WORK/details.md
SUMMARY=$WORK/summary.tsv
: >"$DETAILS"
: >"$SUMMARY"
FAILED=0
N=0
T_START=$SECONDS

say() { echo "[aarch64] $*" >&2; }
die() { say "error: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, binfmt_misc, mmdebstrap, mount and chroot need it)"
[ "$(uname -m)" = x86_64 ] || say "warning: this host is $(uname -m), not x86_64; the x86 column measures this host"
[ -x "$PY" ] || die "$PY missing: run bash tools/setup.sh first (the host venv exports the bundle)"
case "$ROOT" in "$REPO"|"$REPO"/*) die "EDGETL_AARCH64_ROOT must be outside the repository";; esac
case "$ONLY" in
  all) ;;
  fidelity) [ -n "${EDGETL_AARCH64_BUNDLE:-}" ] || die "EDGETL_AARCH64_ONLY=fidelity needs EDGETL_AARCH64_BUNDLE"; KIT_ON=0;;
  *) die "EDGETL_AARCH64_ONLY must be all or fidelity, not '$ONLY'";;
esac

# ------------------------------------------------------------------------------------------------------- step runner
# step NAME WHERE CMD: run CMD (a bash command line) on the host (WHERE=host) or inside the root (WHERE=arm); log it in
# the report with the last lines of its output, exit status and time; a non-zero status fails the check.
in_root() {  # a clean environment: nothing host-only (PIP_FIND_LINKS, pip.conf's local indexes) leaks in; QEMU_CPU
  # must reach every aarch64 process (qemu-user reads it at each exec)
  QEMU_CPU=${QEMU_CPU:-$CPU} chroot "$ROOT" /usr/bin/env -i QEMU_CPU="${QEMU_CPU:-$CPU}" \
    PATH=$GUEST/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LC_ALL=C.UTF-8 LANG=C.UTF-8 TMPDIR=/tmp PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PYTHONDONTWRITEBYTECODE=1 /bin/bash -c "$1"
}
step() {
  local name=$1 where=$2 cmd=$3 rc t0 log prompt
  N=$((N + 1))
  log=$LOGS/$(printf %02d "$N")-${name//[^A-Za-z0-9_.-]/_}.log
  t0=$SECONDS
  say "$name ..."
  if [ "$where" = arm ]; then
    prompt="aarch64 (qemu -cpu ${QEMU_CPU:-$CPU}) \$"
    in_root "cd $GUEST/work && $cmd" >"$log" 2>&1
  else
    prompt="x86_64 host \$"
    (cd "$WORK" && bash -c "$cmd") >"$log" 2>&1
  fi
  rc=$?
  local secs=$((SECONDS - t0)) result=ok
  [ "$rc" = 0 ] || { result="FAILED (exit $rc)"; FAILED=$((FAILED + 1)); }
  printf '%s\t%s\t%s\t%s\n' "$name" "$where" "$result" "$secs" >>"$SUMMARY"
  {
    echo "### $N. $name — $result, ${secs} s"
    echo
    echo '```text'
    echo "$prompt $cmd"
    # progress bars and absl/XNNPACK chatter are noise in a report
    tr '\r' '\n' <"$log" | grep -v -E '^\s*$|XNNPACK delegate|absl::InitializeLog|cpuinfo|cpuid_info|^\s*(embed|train|evaluate)\b.*\|' \
      | tail -n 25
    echo "[exit $rc]"
    echo '```'
    echo
  } >>"$DETAILS"
  say "$name: $result (${secs} s)"
  return "$rc"
}

# ------------------------------------------------------------------------------------ 1. tools, binfmt, cached root
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >"$LOGS/apt.log" 2>&1 \
    || { tail -5 "$LOGS/apt.log" >&2; die "apt-get install ${need[*]} failed"; }
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  say "registering the qemu-aarch64 binfmt handler (interpreter /usr/bin/qemu-aarch64-static, flags F)"
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc (a container without the privilege to do so cannot emulate aarch64)"
  conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -f "$conf" ] || die "$conf missing (qemu-user-static should ship it)"
  # Debian's line names its own wrapper and flags OPF: point it at the static interpreter, F = opened now, so it also
  # works inside the chroot
  sed -E 's#:[^:]*:[A-Z]*$#:/usr/bin/qemu-aarch64-static:F#' "$conf" >/proc/sys/fs/binfmt_misc/register \
    || die "cannot register the qemu-aarch64 binfmt handler"
fi
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "the qemu-aarch64 binfmt handler is disabled"

if [ ! -e "$ROOT/.edgetl-rootfs-ok" ]; then
  MIRROR=${EDGETL_AARCH64_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  say "building the arm64 root in $ROOT from $MIRROR (about 12 minutes, once)"
  mkdir -p "$(dirname "$ROOT")"
  rm -rf "$ROOT.tmp"
  t0=$SECONDS
  mmdebstrap --arch=arm64 --variant=apt --include=$INCLUDE bookworm "$ROOT.tmp" "$MIRROR" >"$LOGS/mmdebstrap.log" 2>&1 \
    || { tail -20 "$LOGS/mmdebstrap.log" >&2; die "mmdebstrap failed (log above)"; }
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
  echo "mmdebstrap --arch=arm64 --variant=apt --include=$INCLUDE bookworm $MIRROR; $((SECONDS - t0)) s; $(date -u)" \
    >"$ROOT/.edgetl-rootfs-ok"
fi
ROOT_BUILT=$(cat "$ROOT/.edgetl-rootfs-ok")

exec 9>"$ROOT.lock"
flock -n 9 || die "another aarch64_check.sh is using $ROOT"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"

MOUNTED=()
cleanup() {
  local m
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    m=${MOUNTED[i]}
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "warning: could not unmount $m"
  done
  MOUNTED=()
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for m in proc dev; do  # never sys
  mkdir -p "$ROOT/$m"
  if ! mountpoint -q "$ROOT/$m"; then
    mount --bind "/$m" "$ROOT/$m" || die "cannot bind-mount /$m into $ROOT"
    MOUNTED+=("$ROOT/$m")
  fi
done
mountpoint -q "$ROOT/sys" && die "$ROOT/sys is mounted: unmount it (onnxruntime's cpuinfo segfaults under qemu with it)"
in_root 'test "$(uname -m)" = aarch64' || die "cannot run aarch64 programs in $ROOT (binfmt / qemu-user)"

# ------------------------------------------------------------------------------------------- 2. the package, the data
rm -rf "${ROOT:?}$GUEST"
mkdir -p "$ROOT$GUEST/work" "$ROOT$GUEST/dist" "$WORK/src" "$WORK/dist"
# the checkout's tracked files as they are now (a file deleted but not yet committed is left out)
(cd "$REPO" && git ls-files -z | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -xf - -C "$WORK/src" || die "copying the checkout failed"
REV=$(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- edgetl pyproject.toml || echo "+dirty")
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >"$LOGS/wheel.log" 2>&1 \
  || "$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src" >>"$LOGS/wheel.log" 2>&1 \
  || { tail -5 "$LOGS/wheel.log" >&2; die "pip wheel failed"; }
WHEEL=$(basename "$(ls "$WORK"/dist/edgetl-*.whl)")
cp "$WORK/dist/$WHEEL" "$ROOT$GUEST/dist/"
cp "$REPO/requirements/lock.txt" "$ROOT$GUEST/lock.txt"

# a few demo images: NTRAIN per class to train, NTEST per class (others) to evaluate and for fidelity; predict and
# watch use test images too
DEMO=$REPO/edgetl/demo_data/fashion-mnist-mini
pick() {  # pick SPLIT DEST FROM COUNT: images FROM..FROM+COUNT-1 (sorted) of each class
  local cls f i
  for cls in "$DEMO/$1"/*/; do
    cls=$(basename "$cls")
    mkdir -p "$2/$cls"
    i=0
    for f in $(ls "$DEMO/$1/$cls" | sort); do
      if [ $i -ge "$3" ] && [ $i -lt $(($3 + $4)) ]; then cp "$DEMO/$1/$cls/$f" "$2/$cls/"; fi
      i=$((i + 1))
    done
  done
}
D=$WORK/data
pick train "$D/train" 0 "$NTRAIN"
pick test "$D/test" 0 "$NTEST"
pick test "$D/more" "$NTEST" 1
mkdir -p "$D/predict"
ls "$D"/more/*/* | head -n 3 | while read -r f; do cp "$f" "$D/predict/$(basename "$(dirname "$f")")-$(basename "$f")"; done
NPRED=$(ls "$D/predict" | wc -l)
cp -r "$D" "$ROOT$GUEST/work/data"

cat >"$WORK/fidelity.py" <<'EOF'
"""INT8 vs FP32 embeddings of the same images, per backend, on this machine (cosine per image)."""
import json, platform, sys
from pathlib import Path
import numpy as np
from edgetl.device import DeviceRuntime

bundle, images, out = sys.argv[1], sorted(Path(sys.argv[2]).rglob("*.png")), Path(sys.argv[3])
res, arrays = {"arch": platform.machine(), "n_images": len(images), "backends": {}}, {}
for backend in ("onnx", "tflite"):
    emb = {}
    for precision in ("fp32", "int8"):
        rt = DeviceRuntime(bundle, backend=backend, precision=precision, threads=2)
        emb[precision], _ = rt.embed_paths(images, cache=False)
        arrays[f"{backend}_{precision}"] = emb[precision]
    a, b = emb["fp32"], emb["int8"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    res["backends"][backend] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
np.savez(out.with_suffix(".npz"), names=np.array([p.name for p in images]), **arrays)
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res))
EOF
cp "$WORK/fidelity.py" "$ROOT$GUEST/work/"

# --------------------------------------------------------------------------------------------- 3. host: the bundle
if [ -n "${EDGETL_AARCH64_BUNDLE:-}" ]; then
  step "host: copy the given bundle" host "cp -r '$EDGETL_AARCH64_BUNDLE' B && ls -l B"
else
  # --keep-failed: an INT8 graph that fails the host's accuracy gate stays in the bundle marked failed (the device never
  # picks it unless named, as here), and the gate's verdict is recorded below
  step "host: export the bundle" host "'$EDGETL' export --model mobilenet_v2 --image-size 96 --format onnx \
--format tflite --quantize none --quantize int8 --keep-failed --out B"
fi
[ -f "$WORK/B/manifest.json" ] || die "no bundle in $WORK/B"
GATE=$("$PY" - "$WORK/B/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for e in m["extractors"]:
    r = e.get("report", {})
    print(f"| {e['format']}/{e['precision']} | {r.get('mean_cosine', 0):.4f} | {r.get('min_cosine', 0):.4f} | "
          f"{r.get('top1_agreement', 0):.3f} | {r.get('drop_points', 0):.2f} | "
          f"{'passed' if r.get('passed') else 'FAILED: ' + r.get('reason', '')} |")
EOF
)
read -r MODEL SIZE < <("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))
print(m["backbone"]["id"], m["preprocessing"]["input_size"])' "$WORK/B/manifest.json")
cp -r "$WORK/B" "$ROOT$GUEST/work/B"

# ------------------------------------------------------------------------------------------ 2. install from PyPI
step "aarch64: install edgetl[onnx,tflite] from the registry with the lock" arm \
  "python3 -m venv $GUEST/venv && pip install -q -c $GUEST/lock.txt '$GUEST/dist/$WHEEL[onnx,tflite]' \
&& pip list 2>/dev/null | grep -i -E '^(edgetl|numpy|onnxruntime|ai-edge-litert|pillow|click|cryptography) ' \
&& python -c 'import sys; assert \"torch\" not in sys.modules; import importlib.util as u; assert u.find_spec(\"torch\") is None; print(\"torch: absent\")' \
&& du -sh $GUEST/venv"

# ------------------------------------------------------------------------------------------------ 3. device checks
[ "$ONLY" = all ] && step "aarch64: device doctor" arm "edgetl device doctor B"
for backend in onnx tflite; do
  [ "$ONLY" = all ] || break
  for precision in fp32 int8; do
    tag=$backend-$precision
    opts="--backend $backend --precision $precision --profile $PROFILE --threads $THREADS"
    in_root "cp -r $GUEST/work/B $GUEST/work/B-$tag" || die "copy of the bundle failed"
    step "aarch64 $tag: verify (golden vectors)" arm "edgetl device verify B-$tag $opts"
    step "aarch64 $tag: train" arm "edgetl device train B-$tag --data data/train $opts --quiet"
    step "aarch64 $tag: train again (a second head version)" arm \
      "edgetl device train B-$tag --data data/train --seed 1 --force $opts --quiet"
    step "aarch64 $tag: predict" arm \
      "edgetl device predict B-$tag data/predict/* $opts --json | tee /tmp/predict.jsonl \
&& test \$(grep -c . /tmp/predict.jsonl) = $NPRED"
    step "aarch64 $tag: evaluate" arm "edgetl device evaluate B-$tag --data data/test $opts --quiet"
    step "aarch64 $tag: watch --once" arm \
      "rm -rf inbox-$tag && mkdir inbox-$tag && cp data/predict/* inbox-$tag/ \
&& edgetl device watch B-$tag inbox-$tag --once --settle 0 --no-learn $opts \
&& cat inbox-$tag/_watch/results.jsonl && test \$(grep -c . inbox-$tag/_watch/results.jsonl) = $NPRED"
    step "aarch64 $tag: rollback" arm \
      "edgetl device history B-$tag $opts && edgetl device rollback B-$tag $opts && edgetl device history B-$tag $opts \
&& edgetl device history B-$tag $opts | grep -q '^v0001 *current'"
  done
done

# ----------------------------------------------------------------------------------------- 4. INT8 fidelity, 2 archs
FIDELITY_CPUS=$CPU
[ "$CPU" = max ] || [ "$ONLY" = fidelity ] || FIDELITY_CPUS="$CPU max"
for cpu in $FIDELITY_CPUS; do
  QEMU_CPU=$cpu step "aarch64 (qemu -cpu $cpu): INT8 vs FP32 fidelity" arm \
    "cp -r B B-fid-$cpu && python fidelity.py B-fid-$cpu data/test fidelity-aarch64-$cpu.json"
  cp "$ROOT$GUEST/work/fidelity-aarch64-$cpu.json" "$ROOT$GUEST/work/fidelity-aarch64-$cpu.npz" "$WORK/" 2>/dev/null
done
step "x86_64: INT8 vs FP32 fidelity (same bundle, same images)" host \
  "cp -r B B-x86 && '$PY' fidelity.py B-x86 data/test fidelity-x86_64.json"

# ------------------------------------------------------------------------------------- 2b. offline from a field kit
if [ "$KIT_ON" = 1 ]; then
  step "host: field kit (edgetl bundle kit --profile $PROFILE)" host \
    "'$EDGETL' bundle kit B KIT --profile $PROFILE --wheel dist/$WHEEL 2>&1 && ls KIT && du -sh KIT && ls KIT/wheels"
  if [ -d "$WORK/KIT" ]; then
    cp -r "$WORK/KIT" "$ROOT$GUEST/work/KIT"
    step "aarch64: offline install from the kit (sh KIT/install.sh, pip --no-index)" arm \
      "PIP_NO_INDEX=1 sh KIT/install.sh $GUEST/kit-venv $GUEST/work/B-kit && $GUEST/kit-venv/bin/pip list 2>/dev/null \
| grep -i -E '^(edgetl|numpy|onnxruntime|ai-edge-litert) '"
    step "aarch64: kit venv: verify + train + evaluate (LiteRT INT8)" arm \
      "K=$GUEST/kit-venv/bin/edgetl; \$K device verify B-kit --backend tflite --precision int8 --threads $THREADS \
&& \$K device train B-kit --data data/train --backend tflite --precision int8 --threads $THREADS --quiet \
&& \$K device evaluate B-kit --data data/test --backend tflite --precision int8 --threads $THREADS --quiet"
  fi
fi

# ----------------------------------------------------------------------------------------------- 5. versions, report
ARM_VERSIONS=$(in_root ". /etc/os-release; echo \"OS: \$PRETTY_NAME, \$(uname -m) (kernel of the host: \$(uname -r))\"; \
python --version; pip list 2>/dev/null | grep -i -E '^(edgetl|numpy|onnxruntime|ai-edge-litert|pillow) ' \
| awk '{printf \"%s %s, \", \$1, \$2} END {print \"\"}'" 2>&1)
HOST_VERSIONS=$({ . /etc/os-release; echo "OS: $PRETTY_NAME, $(uname -m)"; "$PY" --version; \
"$PY" -m pip list 2>/dev/null | grep -i -E '^(numpy|onnxruntime|ai-edge-litert|torch) ' \
| awk '{printf "%s %s, ", $1, $2} END {print ""}'; } 2>&1)
QEMU_VERSION=$(qemu-aarch64-static --version | head -n 1)
BLAS_CORE=""
for cpu in $FIDELITY_CPUS; do
  core=$(QEMU_CPU=$cpu in_root "python -c 'import ctypes, glob, numpy, os; \
l = ctypes.CDLL(glob.glob(os.path.dirname(numpy.__file__) + \".libs/*openblas*\")[0]); \
f = l.scipy_openblas_get_corename64_; f.restype = ctypes.c_char_p; print(f().decode())'" 2>/dev/null)
  BLAS_CORE="$BLAS_CORE${BLAS_CORE:+, }$cpu: ${core:-?}"
done
MATMUL_WARNINGS=$(cat "$LOGS"/*.log | grep -c 'RuntimeWarning: .* encountered in matmul')
FIDELITY=$("$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
w = Path(sys.argv[1])
rows, runs = [], {}
for f in sorted(w.glob("fidelity-*.json")):
    arch = f.stem[len("fidelity-"):]
    arch = "aarch64 (qemu -cpu " + arch[len("aarch64-"):] + ")" if arch.startswith("aarch64-") else arch
    runs[arch] = (json.loads(f.read_text()), np.load(f.with_suffix(".npz")))
print("| backend | architecture | images | INT8 vs FP32 mean cosine | min cosine |")
print("|---|---|---|---|---|")
for backend in ("onnx", "tflite"):
    for arch, (res, _) in runs.items():
        b = res["backends"][backend]
        print(f"| {backend} | {arch} | {res['n_images']} | {b['mean_cosine']:.4f} | {b['min_cosine']:.4f} |")
if "x86_64" in runs and len(runs) > 1:
    x = runs["x86_64"][1]
    print()
    print("Same graph, same images, each aarch64 run's outputs compared with x86_64's (cosine per image, mean / min):")
    print()
    arm = [k for k in runs if k != "x86_64"]
    print("| graph | " + " | ".join(f"{k} vs x86_64" for k in arm) + " |")
    print("|---|" + "---|" * len(arm))
    for k in ("onnx_fp32", "onnx_int8", "tflite_fp32", "tflite_int8"):
        cells = []
        for name in arm:
            a = runs[name][1]
            assert list(a["names"]) == list(x["names"])
            c = (a[k] * x[k]).sum(1) / (np.linalg.norm(a[k], axis=1) * np.linalg.norm(x[k], axis=1))
            cells.append(f"{c.mean():.4f} / {c.min():.4f}")
        print(f"| {k.replace('_', '/')} | " + " | ".join(cells) + " |")
EOF
)
TOTAL=$((SECONDS - T_START))
NSTEPS=$(grep -c . "$SUMMARY")
VERDICT=$([ "$FAILED" = 0 ] && echo "all $NSTEPS checks passed" || echo "$FAILED of $NSTEPS checks FAILED")

mkdir -p "$(dirname "$DOC")"
{
  echo "# edgetl on an emulated Raspberry Pi (Debian bookworm arm64 under qemu-user)"
  echo
  INVOCATION="sudo bash tools/aarch64_check.sh"
  [ "$ONLY" = all ] || INVOCATION="sudo EDGETL_AARCH64_ONLY=$ONLY EDGETL_AARCH64_BUNDLE=B EDGETL_AARCH64_TEST=$NTEST bash tools/aarch64_check.sh"
  echo "Written by \`$INVOCATION\` on $(date -u '+%Y-%m-%d %H:%M UTC') from commit $REV: $VERDICT in"
  echo "$((TOTAL / 60)) min $((TOTAL % 60)) s (emulated: functional, not speed — times are qemu's, not a Pi's)."
  case "$REV" in *+dirty) echo "(+dirty: the working tree had uncommitted changes in edgetl/ or pyproject.toml; the wheel \
and the host's editable install both used them.)";; esac
  echo
  echo "- Root: \`$ROOT\` ($ROOT_BUILT). /proc and /dev are bind-mounted, /sys is not (onnxruntime's"
  echo "  cpuinfo segfaults under qemu when it can read it); \`chroot\` with a clean environment (no host pip settings)."
  echo "- aarch64: $(echo "$ARM_VERSIONS" | tr '\n' ';' | sed 's/, *;/;/g; s/; *$//; s/;/; /g')"
  echo "- x86_64 host: $(echo "$HOST_VERSIONS" | tr '\n' ';' | sed 's/, *;/;/g; s/; *$//; s/;/; /g')"
  echo "- $QEMU_VERSION; device checks under \`-cpu $CPU\` (QEMU_CPU); numpy's OpenBLAS kernel: $BLAS_CORE."
  echo "- numpy \`RuntimeWarning: ... encountered in matmul\` lines in this run's logs: $MATMUL_WARNINGS. Under qemu's default"
  echo "  \`max\` CPU, OpenBLAS picks its armv9sme kernel, whose matmul raised spurious divide-by-zero / overflow / invalid"
  echo "  warnings in \`device train\` (edgetl/domain.py) in an earlier run, with finite products equal to float64's within"
  echo "  2e-6; under \`-cpu cortex-a76\` (a Pi 5's core) it picks another kernel and they are gone."
  echo "- Data: the embedded demo set (Fashion-MNIST, 10 classes): $NTRAIN training images per class, $NTEST test images"
  echo "  per class for \`evaluate\` and the fidelity table, $NPRED other test images for \`predict\` and \`watch --once\`."
  echo "  Each backend × precision runs on its own copy of the bundle, with \`--profile $PROFILE --threads $THREADS\`."
  echo
  echo "## Summary"
  echo
  echo "| # | check | where | result | seconds |"
  echo "|---|---|---|---|---|"
  awk -F'\t' '{printf "| %d | %s | %s | %s | %s |\n", NR, $1, $2, $3, $4}' "$SUMMARY"
  echo
  echo "## The bundle's accuracy gate (host, x86_64, held-out demo images)"
  echo
  echo "\`export\` ran with \`--keep-failed\`: a graph that fails the gate stays in the bundle marked failed and the device"
  echo "uses it only when named (\`--precision int8\`), as here. The gate's verdict at $SIZE px ($MODEL), host:"
  echo
  echo "| graph | mean cosine to PyTorch | min cosine | reference-head agreement | accuracy drop, points | gate |"
  echo "|---|---|---|---|---|---|"
  echo "$GATE"
  echo
  echo "## INT8 fidelity on both architectures"
  echo
  echo "The same bundle and the same $((NTEST * 10)) test images, embedded by the device runtime with FP32 and INT8 graphs"
  echo "(\`DeviceRuntime(B, backend=..., precision=...).embed_paths(images)\`, 2 threads) on aarch64 (qemu) and on this"
  echo "x86_64 host; cosine of each image's INT8 embedding to its FP32 embedding:"
  echo
  echo "$FIDELITY"
  echo
  echo "## Every command and its result"
  echo
  echo "Last lines of each command's output (progress bars and runtime banners left out)."
  echo
  cat "$DETAILS"
} >"$DOC.tmp" && mv "$DOC.tmp" "$DOC"

echo
echo "aarch64 check: $VERDICT in $((TOTAL / 60)) min $((TOTAL % 60)) s; report: $DOC"
awk -F'\t' '{printf "  %-70s %s (%s s)\n", $1, $3, $4}' "$SUMMARY"
echo
echo "$FIDELITY"
[ "$FAILED" = 0 ]
