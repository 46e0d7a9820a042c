#!/usr/bin/env bash
# Build the local engine images used by rtmanager's tests (rtm-test/*) and by
# `make run` (rtm-demo/*). No registry is needed: every image is FROM scratch
# plus the host's static busybox and scripts/engine/engine.sh.
#
# usage: scripts/images.sh [--force] [--check]
#   --force  remove every image built by this script, then rebuild without cache
#   --check  smoke-test the images after building (stop timing, crash exit
#            code, health status)
#
# A tag is skipped when it already exists with the current content hash
# (label rtm.engine.src = sha256 of engine.sh, Dockerfile, this script and
# /bin/busybox); change any of those and the tags are rebuilt.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf '==> ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=
CHECK=
for arg in "$@"; do
    case $arg in
    --force) FORCE=1 ;;
    --check) CHECK=1 ;;
    -h | --help)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $arg (use --force, --check)" ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENGINE_DIR=$ROOT/scripts/engine
BUSYBOX=${BUSYBOX:-/bin/busybox}
# Debian's docker.io client (20.10) matches the engine (API 1.41) and its
# legacy builder needs no buildx; a newer client in /usr/local/bin works too
# with DOCKER_BUILDKIT=0 (it prints a deprecation notice).
if [[ -x /usr/bin/docker ]]; then DOCKER=${DOCKER:-/usr/bin/docker}; else DOCKER=${DOCKER:-docker}; fi
export DOCKER_BUILDKIT=0

LABEL=rtm.engine.src

# repository  mode  tags...
IMAGES=(
    "rtm-test/engine    normal    1.4.1 1.4.2 1.4.3 v1.4.4 1.4.5-rc.1 1.5.0 2.0.0 latest"
    "rtm-test/crash     crash     1.4.3"
    "rtm-test/slow      slow      1.4.2 1.4.3"
    "rtm-test/healthy   healthy   1.4.2 1.4.3"
    "rtm-test/unhealthy unhealthy 1.4.3"
    "rtm-test/exits     exits     1.4.2"
    "rtm-test/hog       hog       1.4.2"
    "rtm-demo/engine    normal    1.0.0 1.0.1 1.1.0"
)

[[ -x $BUSYBOX ]] || die "$BUSYBOX missing: run scripts/bootstrap.sh (busybox-static)"
$DOCKER version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "docker engine not reachable: run scripts/bootstrap.sh"

HASH=$(cat "$ENGINE_DIR/engine.sh" "$ENGINE_DIR/Dockerfile" "${BASH_SOURCE[0]}" "$BUSYBOX" |
    sha256sum | cut -c1-16)

# Every repo:tag that already carries the current hash, in one CLI call.
declare -A HAVE=()
if [[ -n $FORCE ]]; then
    mapfile -t old < <($DOCKER images -q --filter "label=$LABEL" | sort -u)
    if ((${#old[@]})); then
        say "images: removing ${#old[@]} old image(s)"
        # Fails only for images a running container still uses; those stay.
        $DOCKER rmi -f "${old[@]}" >/dev/null 2>&1 || true
    fi
else
    while read -r ref; do
        [[ -n $ref ]] && HAVE[$ref]=1
    done < <($DOCKER images --filter "label=$LABEL=$HASH" --format '{{.Repository}}:{{.Tag}}')
fi

CTX=
cleanup() { if [[ -n $CTX ]]; then rm -rf "$CTX"; fi; }
trap cleanup EXIT

make_context() {
    [[ -n $CTX ]] && return
    CTX=$(mktemp -d /tmp/rtm-images.XXXXXX)
    cp "$BUSYBOX" "$CTX/busybox"
    cp "$ENGINE_DIR/engine.sh" "$CTX/engine.sh"
    chmod 0755 "$CTX/busybox" "$CTX/engine.sh"
    cp "$ENGINE_DIR/Dockerfile" "$CTX/Dockerfile"
}

built=0
skipped=0
start_ns=$(date +%s%N)
for line in "${IMAGES[@]}"; do
    read -r repo mode tags <<<"$line"
    for tag in $tags; do
        ref=$repo:$tag
        if [[ -n ${HAVE[$ref]:-} ]]; then
            skipped=$((skipped + 1))
            continue
        fi
        make_context
        say "images: building $ref ($mode)"
        build_args=(--quiet --target "$mode" --build-arg "MODE=$mode" --build-arg "VERSION=$tag"
            --label "$LABEL=$HASH" --label "rtm.engine.mode=$mode" -t "$ref")
        [[ -n $FORCE ]] && build_args+=(--no-cache)
        if ! out=$($DOCKER build "${build_args[@]}" "$CTX" 2>&1); then
            printf '%s\n' "$out" >&2
            die "images: build of $ref failed"
        fi
        built=$((built + 1))
    done
done
if ((built > 0)); then
    # Images whose tags moved to a rebuilt image are now dangling: drop them.
    $DOCKER image prune -f --filter "label=$LABEL" >/dev/null || true
fi
say "images: $built built, $skipped up to date (src $HASH, $((($(date +%s%N) - start_ns) / 1000000)) ms)"

[[ -n $CHECK ]] || exit 0

# ---------------------------------------------------------------- smoke check
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
RUN_OPTS=(--init --cap-drop ALL --security-opt no-new-privileges)
STATE=$(mktemp -d /tmp/rtm-images-check.XXXXXX)
CHECK_CONTAINERS=()
for m in normal crash slow healthy unhealthy; do CHECK_CONTAINERS+=("rtm-imgcheck-$m-$$"); done
check_cleanup() {
    $DOCKER rm -f "${CHECK_CONTAINERS[@]}" >/dev/null 2>&1 || true
    rm -rf "$STATE"
    cleanup
}
trap check_cleanup EXIT
fail() { die "check: $*"; }

run_d() { # name image -> starts detached (runs in $(...): names are preset above)
    local name=rtm-imgcheck-$1-$$
    mkdir -p "$STATE/$1"
    $DOCKER run -d --name "$name" "${RUN_OPTS[@]}" -v "$STATE/$1:/state" "$2" >/dev/null
    echo "$name"
}

# 1. normal engine under docker-init: SIGTERM stops it at once, boot recorded.
c=$(run_d normal rtm-test/engine:1.4.2)
sleep 0.5
t=$(date +%s%N)
$DOCKER stop -t 10 "$c" >/dev/null
stop_ms=$(ms_since "$t")
grep -qx 1.4.2 "$STATE/normal/boots" || fail "boots file lacks 1.4.2"
code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$c")
$DOCKER logs "$c" 2>&1 | grep -q 'engine 1.4.2 starting' || fail "normal engine banner missing"
((stop_ms < 2000)) || fail "normal engine took ${stop_ms} ms to stop (want < 2000)"
say "check: normal 1.4.2 stop -t 10 took ${stop_ms} ms (exit $code), boots=$(tr '\n' ' ' <"$STATE/normal/boots")"

# 2. crash engine exits 3 with the fatal line on stderr.
c=$(run_d crash rtm-test/crash:1.4.3)
t=$(date +%s%N)
code=$($DOCKER wait "$c")
[[ $code == 3 ]] || fail "crash engine exited $code (want 3)"
$DOCKER logs "$c" 2>&1 | grep -q 'fatal: cannot load world' || fail "crash engine log lacks fatal line"
grep -qx 1.4.3 "$STATE/crash/boots" || fail "crash boots file lacks 1.4.3"
say "check: crash 1.4.3 exited $code after ~$(ms_since "$t") ms"

# 3. slow engine ignores SIGTERM: stop -t 2 waits for the SIGKILL.
c=$(run_d slow rtm-test/slow:1.4.3)
sleep 0.5
t=$(date +%s%N)
$DOCKER stop -t 2 "$c" >/dev/null
stop_ms=$(ms_since "$t")
((stop_ms >= 1900)) || fail "slow engine stopped after ${stop_ms} ms (want ~2000)"
say "check: slow 1.4.3 stop -t 2 took ${stop_ms} ms (exit $($DOCKER inspect -f '{{.State.ExitCode}}' "$c"))"

# 4. healthy / unhealthy HEALTHCHECKs (.State.Health.Status).
wait_health() { # container want timeout_s since_ns -> prints ms since since_ns
    local c=$1 want=$2 st
    while :; do
        st=$($DOCKER inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")
        [[ $st == "$want" ]] && break
        (($(ms_since "$4") < $3 * 1000)) || fail "$c: health '$st' after ${3}s (want $want)"
        sleep 0.05
    done
    ms_since "$4"
}
th=$(date +%s%N)
ch=$(run_d healthy rtm-test/healthy:1.4.3)
tu=$(date +%s%N)
cu=$(run_d unhealthy rtm-test/unhealthy:1.4.3)
h_ms=$(wait_health "$ch" healthy 10 "$th")
u_ms=$(wait_health "$cu" unhealthy 10 "$tu")
say "check: healthy 1.4.3 reported healthy ${h_ms} ms after docker run; unhealthy 1.4.3 reported unhealthy after ${u_ms} ms"
say "check: all ok"
