# Sourced by the GPU scripts: makes diffusers and catprune importable on a machine that has PyTorch but
# no network, and defines the catprune CLI with only the tools a script needs. Expects ROOT (repository
# root) and PYTHON; leaves nothing installed outside a temporary folder.
#
#   gpu_env_setup                      # diffusers from $ROOT/.whl if missing; catprune from $ROOT/src
#   catprune_with_tools MODULE...      # CATPRUNE=(catprune with only these tools); "${CATPRUNE[@]}" ARGS

gpu_env_setup() {
    if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
        [ -d "$ROOT/.whl" ] || { echo "diffusers is missing and there is no $ROOT/.whl with its wheels" >&2; return 1; }
        # --no-deps --target: only the carried wheels, beside (not over) the machine's own packages.
        local site
        site="$(mktemp -d)/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$ROOT"/.whl/*.whl || return 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PYTHON" -c "import catprune" 2>/dev/null || export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "import diffusers, catprune" || return 1
}

catprune_with_tools() {
    # Sets CATPRUNE, a command line: catprune with only the given tool modules (the other tools may
    # import packages such as transformers or torchmetrics that the machine lacks).
    local modules
    modules="$(IFS=,; echo "$*")"
    CATPRUNE=("$PYTHON" -c 'import sys, catprune.cli as cli
cli.TOOL_MODULES = tuple(sys.argv.pop(1).split(","))
sys.argv[0] = "catprune"
sys.exit(cli.main())' "$modules")
}
