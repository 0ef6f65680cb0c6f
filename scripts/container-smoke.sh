#!/usr/bin/env bash
# End-to-end check of the container set-up, with podman and podman-compose (no Docker engine needed):
#
#   1. build both images from ./Dockerfile (api and train targets);
#   2. start the `api` service from docker-compose.yml and wait for /readyz from the host;
#   3. POST a real photo to /classify from the host, and run the image's HEALTHCHECK;
#   4. generate a tiny ImageNet-layout dataset, run `prepare`, then a 1-epoch `train` job on the CPU, in the
#      train container, writing into the checkpoints volume the API serves from;
#   5. wait until the API has hot-reloaded the new best.safetensors, and classify again with it;
#   6. tear everything down (containers, network, volume, temporary files), also on failure.
#
# Each step's wall time is printed at the end. It takes ~10 minutes from scratch on a 2-core machine
# (README, "Containers": what it did and how long it took). Needs root (rootful podman), an OCI runtime
# that can start containers here (runc or crun), debootstrap to make the base image if it is missing,
# curl, python3-venv, and PyPI for podman-compose and the images' Python packages. On Debian 12:
#   apt-get install podman runc debootstrap curl python3-venv
# These are checked first, before anything is built: `scripts/container-smoke.sh --check` does only that.
# Exit status: 0 passed, 2 a prerequisite is missing (each one is listed), 1 any other failure.
#
# Environment (defaults in brackets):
#   SMOKE_PORT        [18080]   host port for the API under test
#   SMOKE_PROJECT     [alexnet-smoke]  compose project name: containers and volumes are prefixed with it
#   SMOKE_PHOTO       [../shared/data/images/n02123045_tabby.JPEG, else tests/fixtures/images/...]
#   SMOKE_KEEP_IMAGES [1]       0: also remove the two images at the end
#   WHEELS_DIR        [/opt/wheels if it holds a torch wheel]  passed as the `wheels` build context
#   BAKE_WEIGHTS      [1]       build argument (without network it falls back to an untrained net)
#   BUILD_ARGS        []        extra `podman build` arguments, e.g. "--network host -v ...:ro"
#   CONTAINERS_CONF   [docker/containers.conf]  plus `runtime = "…"` when it pins none (see SMOKE_RUNTIME)
#   SMOKE_RUNTIME     [runc crun]  OCI runtimes to try, in order: the first installed one that starts a
#                                  container is used (crun 1.8 cannot on a cgroup v1 + v2 hybrid host)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
check_only=0
case "${1:-}" in
    --check) check_only=1 ;;
    "") ;;
    *) echo "usage: $0 [--check]   (--check: only the prerequisites)" >&2; exit 2 ;;
esac

export CONTAINERS_CONF="${CONTAINERS_CONF:-$repo/docker/containers.conf}"
BASE_IMAGE=docker.io/library/debian:bookworm-slim  # what docker/make-base-image.sh makes when it is missing
INSTALL="apt-get install podman runc debootstrap curl python3-venv"

# --- prerequisites: all checked up front, each missing one named ----------------------------------------
probe_runtime() {  # probe_runtime NAME: start a container (/bin/true in a throwaway root filesystem) with it
    local rootfs file status=0
    rootfs="$(mktemp -d /var/tmp/alexnet-runtime-probe.XXXXXX)"
    for file in /bin/true $(ldd /bin/true 2>/dev/null | grep -o '/[^ ]*'); do
        mkdir -p "$rootfs$(dirname "$file")" && cp -L "$file" "$rootfs$file"
    done
    podman --runtime "$1" run --rm --network none --rootfs "$rootfs" /bin/true >"$rootfs.log" 2>&1 || status=$?
    probe_error="$(grep -v '^[[:space:]]*$' "$rootfs.log" | tail -n 1 | sed 's/^Error: //')"
    rm -rf "$rootfs" "$rootfs.log"
    return "$status"
}
missing=()
[[ "$(id -u)" -eq 0 ]] || missing+=("root: the images are built and run with rootful podman (run it as root, e.g. with sudo)")
command -v podman >/dev/null || missing+=("podman: not found (apt-get install podman runc)")
command -v curl >/dev/null || missing+=("curl: not found, it talks to the API (apt-get install curl)")
python3 -c 'import ensurepip, venv' 2>/dev/null \
    || missing+=("python3-venv: python3 cannot make the virtual environment for podman-compose (apt-get install python3-venv)")
pinned="$(sed -n 's/^[[:space:]]*runtime[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$CONTAINERS_CONF" 2>/dev/null | tail -n 1)"
installed=()
for candidate in ${pinned:-${SMOKE_RUNTIME:-runc crun}}; do
    command -v "$candidate" >/dev/null && installed+=("$candidate")
done
runtime="" runtime_notes=()
if [[ ${#installed[@]} -eq 0 ]]; then
    missing+=("an OCI runtime: none of ${pinned:-${SMOKE_RUNTIME:-runc crun}} is installed (apt-get install runc)")
elif [[ ${#missing[@]} -eq 0 ]]; then  # podman and root are there: find one that starts a container here
    for candidate in "${installed[@]}"; do
        if probe_runtime "$candidate"; then runtime="$candidate"; break; fi
        runtime_notes+=("$candidate: $probe_error")
    done
    if [[ -z "$runtime" ]]; then
        missing+=("an OCI runtime that can start a container here: $(IFS=';'; echo "${runtime_notes[*]}" | sed 's/;/; /g')
    (crun cannot on a cgroup v1 + v2 hybrid host: apt-get install runc)")
    fi
fi
if command -v podman >/dev/null && [[ -n "$runtime" ]] && ! podman --runtime "$runtime" image exists "$BASE_IMAGE" 2>/dev/null \
    && ! command -v debootstrap >/dev/null; then
    missing+=("debootstrap: not found, it makes the base image $BASE_IMAGE, which is missing (apt-get install debootstrap)")
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "error: the container smoke test cannot run here; missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    echo "On Debian 12, as root: $INSTALL" >&2
    exit 2
fi
if [[ -z "$pinned" ]]; then  # podman would take crun whenever it is installed: pin the runtime that works
    runtime_conf="$(mktemp /var/tmp/alexnet-containers.XXXXXX.conf)"
    trap 'rm -f "$runtime_conf"' EXIT
    awk -v rt="$runtime" '{ print } /^\[engine\]/ && !done { print "runtime = \"" rt "\""; done = 1 }
        END { if (!done) { print "[engine]"; print "runtime = \"" rt "\"" } }' "$CONTAINERS_CONF" >"$runtime_conf"
    export CONTAINERS_CONF="$runtime_conf"
fi
echo "prerequisites: root, $(podman --version), runtime $runtime$([[ ${#runtime_notes[@]} -gt 0 ]] && printf ' (not %s)' "${runtime_notes[*]}"), $(
    command -v debootstrap >/dev/null && echo "debootstrap" || echo "base image present"), curl, python3-venv"
[[ "$check_only" -eq 1 ]] && exit 0
PORT="${SMOKE_PORT:-18080}"
PROJECT="${SMOKE_PROJECT:-alexnet-smoke}"
PODMAN_COMPOSE_VERSION=1.6.0
tools="${XDG_CACHE_HOME:-$HOME/.cache}/alexnet-container-tools"
api="http://127.0.0.1:$PORT"

photo="${SMOKE_PHOTO:-}"
if [[ -z "$photo" ]]; then
    for candidate in "$repo/../shared/data/images/n02123045_tabby.JPEG" "$repo/tests/fixtures/images/n02123045_tabby.JPEG"; do
        [[ -e "$candidate" ]] && photo="$candidate" && break
    done
fi
[[ -n "$photo" && -e "$photo" ]] || { echo "error: no photo to classify (set SMOKE_PHOTO)" >&2; exit 1; }

if [[ -z "${WHEELS_DIR+set}" ]]; then
    WHEELS_DIR=""
    compgen -G "/opt/wheels/torch-2.13.0*-cp311-*.whl" >/dev/null && WHEELS_DIR=/opt/wheels
fi

# --- timing ---------------------------------------------------------------------------------------------
declare -a step_names=() step_ms=()
step_started=0
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
step() {  # step NAME: close the previous step, open the next
    local now; now=$(now_ms)
    if [[ ${#step_names[@]} -gt ${#step_ms[@]} ]]; then step_ms+=($((now - step_started))); fi
    if [[ $# -gt 0 ]]; then step_names+=("$1"); echo; echo "=== $1"; fi
    step_started=$now
}
report() {
    echo
    echo "container smoke test: wall time per step (s)"
    local i total=0
    for i in "${!step_ms[@]}"; do
        printf '  %-62s %6d.%d\n' "${step_names[$i]}" $((step_ms[i] / 1000)) $((step_ms[i] % 1000 / 100))
        total=$((total + step_ms[i]))
    done
    printf '  %-62s %6d.%d\n' "total" $((total / 1000)) $((total % 1000 / 100))
}
json() {  # json EXPR < document: print a Python expression of the parsed JSON document `d`
    python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"
}

# --- set-up and teardown --------------------------------------------------------------------------------
work="$(mktemp -d /var/tmp/alexnet-smoke.XXXXXX)"
export ALEXNET_API_PORT="$PORT" ALEXNET_IMAGENET_DIR="$work/imagenet" ALEXNET_DATA_DIR="$work/data"
compose() { "$tools/bin/podman-compose" -p "$PROJECT" -f docker-compose.yml -f docker/compose.cpu.yml "$@"; }
teardown() {
    local status=$?
    trap - EXIT
    if [[ $status -ne 0 ]]; then
        echo; echo "FAILED (exit $status); the API's last log lines:"
        podman logs --tail 30 "${PROJECT}_api_1" 2>&1 || true
    fi
    step "tear down (compose down -v, remove temporary files)"
    compose --profile train down -v >/dev/null 2>&1 || true
    rm -rf "$work"
    [[ -n "${runtime_conf:-}" ]] && rm -f "$runtime_conf"
    if [[ "${SMOKE_KEEP_IMAGES:-1}" == 0 ]]; then podman rmi -f alexnet-api:latest alexnet-train:latest >/dev/null 2>&1 || true; fi
    step
    report
    exit "$status"
}
trap teardown EXIT

step "tools: podman-compose $PODMAN_COMPOSE_VERSION, base image"
if ! "$tools/bin/podman-compose" --version 2>/dev/null | grep -q "podman-compose version $PODMAN_COMPOSE_VERSION"; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
docker/make-base-image.sh
if compose ps 2>/dev/null | grep -q "${PROJECT}_"; then
    echo "error: a '$PROJECT' compose project is already running (set SMOKE_PROJECT, or take it down)" >&2
    exit 1
fi

# --- 1. build -------------------------------------------------------------------------------------------
build=(podman build --format docker --pull=never)  # docker format: OCI images drop HEALTHCHECK
[[ -n "$WHEELS_DIR" ]] && build+=(--build-context "wheels=$WHEELS_DIR")
build+=(--build-arg "BAKE_WEIGHTS=${BAKE_WEIGHTS:-1}")
# shellcheck disable=SC2206  # BUILD_ARGS is a list of words on purpose
build+=(${BUILD_ARGS:-})
step "build image alexnet-api (target api)"
"${build[@]}" --target api -t alexnet-api:latest . 2>&1 | tail -n 8
step "build image alexnet-train (target train)"
"${build[@]}" --target train -t alexnet-train:latest . 2>&1 | tail -n 3
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^localhost/alexnet-(api|train):latest' | sed 's/^/  /'

# --- 2. compose up, wait for /readyz --------------------------------------------------------------------
step "compose up -d api"
compose up -d --no-build api 2>&1 | grep -v "^[0-9a-f]\{64\}$" | grep -v "systemd connection" || true
step "wait for GET /readyz = 200 (model loaded, warm-up run)"
for _ in $(seq 1 240); do
    if curl -fsS -m 2 "$api/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.5
done
curl -fsS -m 2 "$api/readyz" | json 'd["status"], "trained:", d["model"]["trained"]'

# --- 3. classify a real photo from outside; the image's health check ------------------------------------
step "POST a real photo to /classify; podman healthcheck run"
before="$(curl -fsS -m 60 -F "file=@$photo" "$api/classify?top_k=3")"
echo "$before" | json '"  model:", d["model"]["checkpoint"], "trained:", d["model"]["trained"], "sha256:", d["model"]["sha256"]'
echo "$before" | json '"\n".join("  %d. %s (%s) %.4f" % (p["rank"], p["label"], p["wnid"], p["score"]) for p in d["results"][0]["predictions"])'
old_sha="$(echo "$before" | json 'd["model"]["sha256"]')"
# Weights baked into the image (BAKE_WEIGHTS=1 with network) must reach the new volume and be served.
if podman run --rm --no-healthcheck --entrypoint test alexnet-api:latest -e /checkpoints/best.safetensors; then
    echo "$before" | json 'd["model"]["trained"] and d["model"]["checkpoint"] == "best.safetensors" or sys.exit("baked weights not served")' >/dev/null
    echo "  the image's baked-in weights were copied into the new volume and are served"
else
    echo "  no weights baked into the image (no network at build time, or BAKE_WEIGHTS=0): untrained net, as expected"
fi
podman healthcheck run "${PROJECT}_api_1" 2>/dev/null && echo "  HEALTHCHECK (alexnet-healthcheck): healthy"

# --- 4. tiny dataset → prepare → 1 epoch of training on the CPU -----------------------------------------
step "generate a tiny ImageNet-layout dataset (3 classes, 36 JPEGs)"
mkdir -p "$work/imagenet" "$work/data"
chmod 0777 "$work/imagenet" "$work/data"  # the containers run as uid 10001; $work itself stays private
podman run --rm --entrypoint python -v "$work/imagenet:/out" alexnet-train:latest -c '
import random
from pathlib import Path
from PIL import Image, ImageDraw
rng = random.Random(0)
classes = {"n01440764": (190, 60, 40), "n01443537": (40, 170, 60), "n02123045": (50, 70, 190)}  # real wnids
for split, count in (("train", 9), ("val", 3)):
    for wnid, colour in classes.items():
        folder = Path("/out", split, wnid)
        folder.mkdir(parents=True)
        for i in range(count):
            size = (rng.randint(90, 160), rng.randint(90, 160))
            img = Image.new("RGB", size, tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colour))
            x, y = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
            ImageDraw.Draw(img).ellipse((x, y, x + size[0] // 3, y + size[1] // 3), fill=(255, 255, 255))
            img.save(folder / f"{wnid}_{i}.JPEG", quality=90)
print("  wrote", sum(1 for _ in Path("/out").rglob("*.JPEG")), "JPEGs")
'
step "compose run prepare (train profile)"
compose --profile train run --rm -T prepare 2>&1 | tail -n 5
step "compose run train: 1 epoch, full-size net, CPU"
compose --profile train run --rm -T --no-deps train \
    --devices cpu --epochs 1 --batch-size 9 --workers 1 --seed 1 2>&1 | tail -n 8

# --- 5. the API picks the new checkpoint up by itself ---------------------------------------------------
step "wait for the API to hot-reload best.safetensors"
new_sha="$old_sha"
for _ in $(seq 1 120); do
    new_sha="$(curl -fsS -m 2 "$api/model" | json 'd["model"]["sha256"]' 2>/dev/null || true)"
    [[ -n "$new_sha" && "$new_sha" != "None" && "$new_sha" != "$old_sha" ]] && break
    sleep 0.5
done
[[ -n "$new_sha" && "$new_sha" != "None" && "$new_sha" != "$old_sha" ]] || { echo "error: the API did not reload the checkpoint" >&2; exit 1; }
curl -fsS -m 2 "$api/model" | json '"  now serving", d["model"]["checkpoint"], "sha256", d["model"]["sha256"], "classes:", d["num_classes"], "since", d["loaded_at"]' 
step "POST the photo again: served by the new checkpoint"
after="$(curl -fsS -m 60 -F "file=@$photo" "$api/classify?top_k=3")"
echo "$after" | json '"  model:", d["model"]["checkpoint"], "trained:", d["model"]["trained"], "epoch:", d["model"]["epoch"], "sha256:", d["model"]["sha256"]'
echo "$after" | json '"\n".join("  %d. %s (%s) %.4f" % (p["rank"], p["label"], p["wnid"], p["score"]) for p in d["results"][0]["predictions"])'
echo "$after" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["model"]["sha256"] == sys.argv[1], "response not from the reloaded checkpoint"
assert d["model"]["trained"] is True and d["model"]["checkpoint"] == "best.safetensors", d["model"]
wnids = {p["wnid"] for p in d["results"][0]["predictions"]}
assert wnids <= {"n01440764", "n01443537", "n02123045"}, wnids  # only the tiny dataset'"'"'s classes
' "$new_sha"
echo "  OK: the API serves what the training container wrote"
# the EXIT trap tears down and prints the timings
