#!/usr/bin/env bash
# Set-up for a machine with no ROS 2 install: a Python 3.11 venv with pinned dependencies and
# ROS 2 Kilted wheels, the Fashion-MNIST data (Debian package), and a colcon build into install/.
# Idempotent; the Makefile calls `setup.sh deps` and `setup.sh build` only when their inputs changed.
#   scripts/setup.sh [deps|build|all]
set -euo pipefail
what=${1:-all}
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n== %s\n' "$*"; }

python_bin=${PYTHON:-python3.11}
if ! command -v "$python_bin" >/dev/null; then
  echo "error: $python_bin not found; the ROS 2 Kilted wheels need CPython 3.11" >&2
  exit 1
fi

if [ "$what" != build ]; then
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $python_bin"
  "$python_bin" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi

step "installing pinned Python dependencies"
.venv/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt -r requirements-ros.txt -r requirements-cluster.txt

# The wheels' exported CMake targets name include directories of the machine they were built on.
step "rewriting the ROS wheels' build-host include directories"
py_include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_include=$(.venv/bin/python -c 'import numpy; print(numpy.get_include())')
{ grep -rl '/opt/python/cp311-cp311' .venv/share/*/cmake/ 2>/dev/null || true; } | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#${py_include}#g" \
         -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${np_include}#g" "$f"
done
if grep -rq '/opt/python/cp311-cp311' .venv/share/*/cmake/ 2>/dev/null; then
  echo "error: unrewritten build-host paths remain in .venv/share/*/cmake" >&2
  exit 1
fi

data_dir=${MIXCLF_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$data_dir/t10k-images-idx3-ubyte.gz" ]; then
  step "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  if command -v apt-get >/dev/null; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
  else
    echo "warning: no apt-get; put the Fashion-MNIST files in \$MIXCLF_FASHION_MNIST_DIR" >&2
  fi
fi

fi  # deps

if [ "$what" != deps ]; then
step "building the ROS 2 package with colcon"
# shellcheck disable=SC1091
source "$root/env.sh" --no-install
# CMake refuses to export include directories that lie inside the package's source directory, and
# the venv (whose numpy headers the generated Python bindings use) lies inside this repository.
# Building through a symlink makes the source directory build/src/mixclf_ros, which holds no venv.
# (A robot's workspace build has no venv in the source tree and needs none of this.)
mkdir -p build/src
ln -sfn ../.. build/src/mixclf_ros
colcon --log-base build/log build --base-paths build/src --build-base build --install-base install \
  --cmake-args -DPython3_EXECUTABLE="$root/.venv/bin/python" -DBUILD_TESTING=OFF \
  > build/colcon.log 2>&1 || { grep -v '^--' build/colcon.log | tail -40; exit 1; }
fi  # build
echo "set-up ($what) complete: source env.sh"
