#!/usr/bin/env bash
# Run the diffusers-facing tests against another diffusers release, without a second torch:
#
#   tools/test_diffusers.sh 0.37.0        # that release
#   tools/test_diffusers.sh floor         # the floor pyproject.toml names (diffusers>=X)
#   tools/test_diffusers.sh newest        # the newest release on the package index
#   tools/test_diffusers.sh 0.37.0 -k ip_adapter   # extra arguments go to pytest
#
# The release goes into build/diffusers-<version> with `pip install --no-deps --target` (diffusers
# is pure Python: seconds), and the tests run with the venv's own interpreter and every other
# package (torch, transformers, huggingface_hub, peft, accelerate) unchanged, that folder first on
# PYTHONPATH. The script checks that the tests import diffusers from that folder before it trusts a
# pass. Where the release is the venv's own, it says so and runs the tests on the venv as it is.
# PYTHON picks the interpreter (the Makefile passes .venv/bin/python); DIFFUSERS_TESTS overrides
# the test files. docs/pipelines.md ("diffusers versions") records what each release gave.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

if [ $# -lt 1 ]; then
    echo "usage: $0 VERSION|floor|newest [pytest args]" >&2
    exit 2
fi
want="$1"
shift

# The test files that reach diffusers' APIs: pipelines and their features (slicing, fused QKV,
# IP-Adapter, ControlNet, offload, compile, LoRA calls), the UNet's processors, sampling with its
# loaders (LoRA, textual inversion, single files), SDXL's conditioning, the UI LoRA format, the tiny
# model's save / load, and training (EMAModel, get_scheduler, compute_snr, the VAE's distribution).
DEFAULT_TESTS="tests/test_pipelines.py tests/test_unet_coeff.py tests/test_sampling.py tests/test_single_file.py
tests/test_sdxl_features.py tests/test_ui_lora.py tests/test_tiny.py tests/test_training.py tests/test_ema.py
tests/test_latent_cache.py"
TESTS="${DIFFUSERS_TESTS:-$DEFAULT_TESTS}"

case "$want" in
floor)
    # the one place the floor is written down: pyproject.toml's "diffusers>=X"
    version="$(sed -n 's/^ *"diffusers>=\([0-9.]*\)".*/\1/p' pyproject.toml)"
    if [ -z "$version" ]; then
        echo "$0: no \"diffusers>=X\" line in pyproject.toml's dependencies; write the floor there" >&2
        exit 2
    fi
    # "0.37" names the release 0.37.0, which reports itself as such
    if [[ "$version" =~ ^[0-9]+\.[0-9]+$ ]]; then version="$version.0"; fi
    ;;
newest)
    # pip resolves the newest release without installing it (--dry-run --report)
    version="$("$PY" -m pip install -q --no-deps --ignore-installed --dry-run --report - diffusers 2>/dev/null |
        "$PY" -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])')"
    ;;
*)
    version="$want"
    ;;
esac

# DIFFUSERS_WITH: companions a release needs that the venv's versions do not serve (e.g. an older
# transformers and huggingface_hub), installed --no-deps into the same folder, e.g.
#   DIFFUSERS_WITH="transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2"
with="${DIFFUSERS_WITH:-}"
venv_version="$("$PY" -c 'import importlib.metadata as m; print(m.version("diffusers"))')"
if [ "$version" = "$venv_version" ] && [ -z "$with" ]; then
    if [ -n "${DIFFUSERS_SKIP_IF_VENV:-}" ]; then
        # .ci/run sets this for `newest`: make test has just run these tests on exactly this venv
        echo "diffusers $version ($want) is the venv's own, which make test has just tested: skipped"
        exit 0
    fi
    echo "diffusers $version ($want) is the venv's own: running the tests on the venv as it is"
    extra_path=""
else
    target="build/diffusers-$version${with:+-with-$(echo "$with" | tr ' =' '_-')}"
    if [ ! -f "$target/.complete" ]; then
        rm -rf "$target"
        echo "installing diffusers==$version $with into $target (--no-deps)"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-deps --target "$target" "diffusers==$version" $with
        touch "$target/.complete"
    fi
    extra_path="$PWD/$target:"
fi

export PYTHONPATH="${extra_path}$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Trust a pass only if the tests see the release asked for, from where it was put.
"$PY" - "$version" "${extra_path%:}" <<'EOF'
import sys
import importlib.metadata as m
import diffusers
want, folder = sys.argv[1], sys.argv[2]
if diffusers.__version__ != want or m.version("diffusers") != want or (folder and not diffusers.__file__.startswith(folder)):
    sys.exit(f"expected diffusers {want} from {folder or 'the venv'}, got {diffusers.__version__} from {diffusers.__file__}")
print(f"diffusers {want} from {diffusers.__file__}")
for name in ("transformers", "huggingface_hub", "tokenizers", "peft", "accelerate", "torch"):
    print(f"  {name} {m.version(name)}")
EOF

# -n 0: one process (the workers would each re-import the release); -x: the first failure is the answer
# shellcheck disable=SC2086
exec "$PY" -m pytest -n 0 -q -x -p no:cacheprovider -m "not slow" $TESTS "$@"
