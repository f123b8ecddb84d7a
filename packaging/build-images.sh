#!/bin/sh
# Build the slmops container images with buildah (or podman): packaging/build-images.sh [agent|server]...
#
#   BASE=localhost/debian-bookworm:base  the base image (default docker.io/library/debian:bookworm-slim)
#   BUILDER="podman build"               the builder (default "buildah bud")
#   ISOLATION=chroot                     RUN steps in a chroot (where the OCI runtime cannot start containers)
#   PYTHON=.venv/bin/python              the Python with `build` installed that builds the wheel
#   EXTRA_CA=/path/ca.pem                a CA bundle pip must trust in the build stage (a TLS-intercepting proxy)
#
# The context is packaging/: dist/ gets the slmops wheel, and dist/llama/ any llama-cpp-python wheel pip built
# before (pip's wheel cache), so llama.cpp is compiled once per machine, not once per image.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
PYTHON=${PYTHON:-python3}
BUILDER=${BUILDER:-buildah bud}
BASE=${BASE:-docker.io/library/debian:bookworm-slim}
ISOLATION=${ISOLATION:-oci}
roles=${*:-agent server}

rm -rf "$here/dist"
mkdir -p "$here/dist/llama" "$here/dist/ca"
if [ -n "${EXTRA_CA:-}" ]; then cp "$EXTRA_CA" "$here/dist/ca/extra.pem"; fi
"$PYTHON" -m build --outdir "$here/dist" "$repo"
rm -f "$here"/dist/slmops-*.tar.gz
find "${PIP_CACHE_DIR:-$HOME/.cache/pip}/wheels" -name 'llama_cpp_python-*.whl' -exec cp {} "$here/dist/llama/" \; \
    2>/dev/null || true
for role in $roles; do
    $BUILDER --isolation "$ISOLATION" --layers --build-arg "BASE=$BASE" \
        -f "$here/Containerfile.$role" -t "localhost/slmops-$role" "$here"
done
