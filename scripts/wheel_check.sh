#!/usr/bin/env bash
# `make wheel-check`: build the wheel, install it into a fresh venv outside the checkout and run the shipped MNIST
# sample from a temporary directory, so that a file that exists only in the checkout (a config, sample data,
# anything package-data misses) fails here and not on a user's machine.
#
# By default the fresh venv borrows the project venv's installed dependencies through a .pth file, and only ecavg
# itself comes from the wheel (checked below): a full install copies about 5.5 GB of torch and CUDA wheels, which
# takes well over ten minutes here. WHEEL_CHECK_FULL=1 installs the wheel with its dependencies instead, which
# also checks that every dependency is declared in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

work=$(mktemp -d "${TMPDIR:-/tmp}/ecavg-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# Built from a copy of the files git knows (tracked, or new and not ignored): a stale build/ or egg-info in the
# checkout would otherwise put files into the wheel that package-data no longer names.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/src"
"$PY" -m pip wheel "$work/src" --no-deps --no-build-isolation --quiet -w "$work/dist"
wheel=$(ls "$work"/dist/ecavg-*.whl)
version=$("$PY" -c 'import ecavg; print(ecavg.__version__)')
case "$(basename "$wheel")" in
  "ecavg-$version-"*) ;;
  *) echo "wheel-check: $(basename "$wheel") does not carry ecavg.__version__ $version" >&2; exit 1 ;;
esac
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
missing = [p for p in ("LICENSE", "mnist-sample/train-images-idx3-ubyte.gz") if not any(n.endswith(p) for n in names)]
if missing:
    sys.exit(f"wheel-check: the wheel lacks {missing}")
EOF

base_python=$("$PY" -c 'import sys; print(sys._base_executable)')
"$base_python" -m venv "$work/venv"
fresh="$work/venv/bin/python"
if [ "${WHEEL_CHECK_FULL:-0}" = 1 ]; then
  "$fresh" -m pip install --quiet "$wheel"
else
  "$fresh" -m pip install --quiet --no-deps "$wheel"
  # Appended to sys.path after the fresh venv's own site-packages, so the wheel's ecavg comes first; .pth files
  # inside the borrowed directory (the checkout's editable install among them) are not processed.
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$("$fresh" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-wheel-check-deps.pth"
fi

mkdir "$work/run"
cd "$work/run"
cat > sample.toml <<'EOF'
# The shipped MNIST sample, small and quick: what a new user runs after `pip install ecavg`.
strategy = "ecavg"
[data]
dataset = "mnist-sample"
num_edges = 2
train_fraction = 0.25
[model]
name = "mlp"
hidden = 32
[edge]
epochs = 1
[server]
epochs = 1
EOF
unset PYTHONPATH
"$fresh" - "$work/venv" <<'EOF'
import sys
import ecavg
if not ecavg.__file__.startswith(sys.argv[1]):
    sys.exit(f"wheel-check: ecavg was imported from {ecavg.__file__}, not from the wheel's venv")
EOF
test "$("$work/venv/bin/ecavg" --version)" = "ecavg $version"
"$work/venv/bin/ecavg" run --config sample.toml --output out > run.log 2>&1 || { cat run.log; exit 1; }
for f in results.json results.md accuracy.png metrics.jsonl report.html; do
  test -s "out/$f" || { echo "wheel-check: the run from the wheel wrote no $f" >&2; cat run.log; exit 1; }
done
echo "wheel-check: $(basename "$wheel") installed outside the checkout and ran the sample in $((SECONDS - started)) s"
