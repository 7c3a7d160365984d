#!/usr/bin/env bash
# The package away from the checkout (`make dist-check`, CI after `make test`): build the sdist and
# the wheel, install the wheel in a fresh venv outside the checkout (its dependencies from the
# registry), use it from a temporary folder (version, check, demo, run), then collect the tests of
# the unpacked sdist. Fails on the first step that fails; prints the time each step took.
# PYTHON: the interpreter that has `build` and `twine` (default: the checkout's .venv).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ximrun-dist.XXXXXX")
VENV=$WORK/venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH

STEP=setup
TIMES=()
finish() {
    local rc=$?
    rm -rf "$WORK"
    echo
    echo "check_dist: time per step"
    for line in ${TIMES[@]+"${TIMES[@]}"}; do echo "  $line"; done
    if [ "$rc" -ne 0 ]; then
        echo "check_dist: FAILED in step '$STEP' (exit $rc)" >&2
    else
        echo "check_dist: OK"
    fi
    exit "$rc"
}
trap finish EXIT

now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }  # bash 5's clock, else whole seconds

step() {  # step NAME FUNCTION: run it under set -e, then record how long it took
    STEP=$1
    local start
    start=$(now)
    echo "== $1"
    "$2"
    TIMES+=("$(awk -v n="$1" -v a="$start" -v b="$(now)" \
        'BEGIN { printf "%-34s %6.1fs", n, b - a }')")
}

expect() {  # expect TEXT FILE: FILE (a command's output) holds TEXT
    grep -qF -- "$1" "$2" || { echo "expected '$1' in:" >&2; cat "$2" >&2; return 1; }
}

build() {
    "$PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; return 1; }
    WHEEL=$(echo "$WORK"/dist/*.whl)
    SDIST=$(echo "$WORK"/dist/*.tar.gz)
    [ -f "$WHEEL" ] && [ -f "$SDIST" ]
    VERSION=$(basename "$WHEEL" | cut -d- -f2)
    echo "   $(basename "$SDIST"), $(basename "$WHEEL")"
}

inspect() {
    "$PYTHON" -m twine check --strict "$WHEEL" "$SDIST"
    "$PYTHON" - "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile

wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
top = sorted({n.split("/")[0] for n in names if ".dist-info/" not in n})
print("   wheel's top-level names:", ", ".join(top))
assert top == ["runner"], f"the wheel installs more than runner: {top}"
dist_info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
assert zipfile.ZipFile(wheel).read(dist_info).split() == [b"runner"]
for need in ("runner/demo/demo.toml", "runner/demo/sample_data/card_heic.heic", "runner/lock.py"):
    assert need in names, f"the wheel lacks {need}"
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for need in ("tests/conftest.py", "tests/driver.py", "tests/s3server.py", "tests/test_demo.py",
             "sample_data/README.md", "sample_data/card_heic.heic", "jobs/demo.toml",
             "runner/demo/sample_data/card_heic.heic", "MANIFEST.in"):
    assert need in members, f"the sdist lacks {need}"
print(f"   wheel: {len(names)} files; sdist: {len(members)} entries")
EOF
}

pip_quiet() {  # pip_quiet ARGS...: the fresh venv's pip, its output shown only on failure
    "$VENV/bin/python" -m pip install "$@" >"$WORK/pip.log" 2>&1 \
        || { tail -40 "$WORK/pip.log" >&2; return 1; }
}

fresh_venv() {
    "$PYTHON" -m venv "$VENV"
    pip_quiet --upgrade pip  # the bundled pip's resolver gives up on s3fs's exact fsspec pins
    pip_quiet "$WHEEL"       # the runtime dependencies, as the registry has them today
}

use_it() {
    mkdir "$WORK/use"
    cd "$WORK/use"
    local x=$VENV/bin/ximrun out=$WORK/out.txt
    "$VENV/bin/python" -c 'import runner, sys; assert runner.__file__.startswith(sys.prefix), runner.__file__'
    "$x" --version | tee "$out"
    expect "ximrun, version $VERSION" "$out"

    "$x" demo >"$out"
    cat "$out"
    expect "sent 10 in 1 request(s): done 12 (reused 2), failed 0, rejected 11" "$out"
    "$x" demo >"$out"
    expect "listed 23: new 0, changed 0, unchanged 23" "$out"
    expect "sent 0 in 0 request(s)" "$out"
    "$x" status ximrun-demo/demo.toml >"$out"
    expect "done           12   (reused 2)" "$out"

    # A few images out of the installed package's data (the demo wrote them), checked one by one.
    local samples=ximrun-demo/sample_data
    "$x" check "$samples/card_jpeg.jpg" "$samples/card_heic.heic" "$samples/card_webp.webp" \
        "$samples/anim.gif" | tee "$out"
    expect "accept  heic  $samples/card_heic.heic" "$out"
    local code=0
    "$x" check "$samples/broken_truncated.jpg" "$samples/reject_avif.avif" >"$out" || code=$?
    [ "$code" -eq 1 ] || { echo "check of rejected files exited $code, not 1" >&2; return 1; }
    expect "truncated" "$out"

    # The same job through `ximrun run`, from a folder of its own: a new state database.
    mkdir again
    cp -R ximrun-demo/demo.toml ximrun-demo/sample_data again/
    "$x" run again/demo.toml >"$out"
    cat "$out"
    expect "ximrun: demo: finished in" "$out"
    expect "sent 10 in 1 request(s)" "$out"
    cd "$ROOT"
}

sdist_tests() {
    mkdir "$WORK/src"
    tar -xzf "$SDIST" -C "$WORK/src"
    # The test extra, pinned to what the checkout's .venv resolved: unpinned, pip backtracks
    # through boto3 and aiobotocore releases (both pin botocore) for minutes.
    "$PYTHON" -m pip freeze --exclude-editable >"$WORK/constraints.txt"
    pip_quiet -c "$WORK/constraints.txt" "$WHEEL[test,dask,parquet]"
    cd "$WORK/src/ximrun-$VERSION"
    "$VENV/bin/pytest" --collect-only -q -p no:cacheprovider >"$WORK/collect.txt" \
        || { tail -40 "$WORK/collect.txt" >&2; return 1; }
    # Every test of the checkout, none left behind: the same count as there.
    cd "$ROOT"
    "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider >"$WORK/collect-checkout.txt"
    local ours theirs
    ours=$(tail -1 "$WORK/collect.txt")
    theirs=$(tail -1 "$WORK/collect-checkout.txt")
    echo "   sdist: $ours; checkout: $theirs"
    [ "${ours%% in *}" = "${theirs%% in *}" ] \
        || { echo "the sdist collects other tests than the checkout" >&2; return 1; }
}

step "build sdist and wheel" build
step "twine check, contents" inspect
step "fresh venv, pip install wheel" fresh_venv
step "use it: version, demo, check, run" use_it
step "sdist: install [test,dask,parquet], collect" sdist_tests
