#!/bin/sh
# Test/demo game engine for rtmanager (runs under busybox sh, FROM scratch).
# Behaviour is selected by ENGINE_MODE (baked into the image at build time):
#   normal     print a banner, record the boot in $STATE/boots, run until SIGTERM/SIGINT
#   crash      record the boot, print a fatal error on stderr, exit 3 after ~0.2 s
#   slow       like normal but ignores SIGTERM (only SIGKILL stops it)
#   healthy    like normal; touches /tmp/ready ~1 s after boot (image HEALTHCHECK tests it)
#   unhealthy  like normal; the image HEALTHCHECK never passes
#   exits      like normal, then exits 7 on its own ~3 s after boot (a crash between
#              commands, for the reconciler)
#   hog        like normal, then ~1.5 s after boot allocates memory without end
#              (killed by its memory limit: OOM)
MODE="${ENGINE_MODE:-normal}"
VERSION="${ENGINE_VERSION:-unknown}"
STATE="${ENGINE_STATE_DIR:-/state}"

# Signal handling first: once the boot is recorded or the banner printed,
# a stop request gets the mode's behaviour.
sleeper=
if [ "$MODE" = slow ]; then
    trap '' TERM
else
    trap 'echo "engine stopping"; [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 0' TERM INT
fi

mkdir -p "$STATE"
echo "$VERSION" >>"$STATE/boots"

if [ "$MODE" = crash ]; then
    echo "engine $VERSION: fatal: cannot load world" >&2
    sleep 0.2
    exit 3
fi

echo "engine $VERSION starting"

if [ "$MODE" = healthy ]; then
    (sleep 1; touch /tmp/ready) &
fi

if [ "$MODE" = exits ]; then
    sleep 3
    echo "engine $VERSION: fatal: lost the world" >&2
    exit 7
fi

if [ "$MODE" = hog ]; then
    sleep 1.5
    echo "engine $VERSION: loading a world too big"
    x=x
    while true; do x="$x$x"; done
fi

while true; do
    sleep 3600 &
    sleeper=$!
    wait "$sleeper"
done
