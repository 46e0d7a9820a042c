#!/usr/bin/env bash
# Bring up everything rtmanager's tests and `make run` need on a Debian 12 host
# (run as root): Docker engine (with live-restore and docker-init), static
# busybox (for the test images), PostgreSQL, Redis and RabbitMQ on 127.0.0.1.
# Idempotent: every step is skipped quickly when its service already answers.
# usage: scripts/bootstrap.sh [tools|busybox|docker|postgres|redis|rabbitmq ...]  (default: all)
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf '==> ERROR: %s\n' "$*" >&2; exit 1; }

if [[ -x /usr/bin/docker ]]; then DOCKER=${DOCKER:-/usr/bin/docker}; else DOCKER=${DOCKER:-docker}; fi
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/rtm-dockerd.log}
DAEMON_JSON=/etc/docker/daemon.json

SUDO=
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi

APT_UPDATED=
apt_install() {
    if [[ -z $APT_UPDATED ]]; then
        say "apt: update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt: install $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# poll SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.25 s.
poll() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.25
    done
}

tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# proc_alive PID [NAME]: PID runs (not a zombie: PID 1 here may reap late)
# and, if NAME is given, its command name starts with NAME.
proc_alive() {
    local pid=$1 name=${2:-} stat
    [[ -n $pid ]] && stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat#*) }
    [[ ${stat:0:1} != Z ]] || return 1
    [[ -z $name ]] || [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]]
}

# A pid file whose process is gone (or a zombie, or now another program)
# makes a daemon refuse to start after an unclean kill.
clear_stale_pidfile() {
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 0
    pid=$(tr -dc '0-9' <"$file" | head -c 10)
    proc_alive "$pid" "$name" && return 0
    say "$name: removing stale pid file $file"
    $SUDO rm -f "$file"
}

# ---------------------------------------------------------------- docker
ensure_daemon_json() {
    $SUDO mkdir -p /etc/docker
    if [[ ! -s $DAEMON_JSON ]]; then
        say "docker: writing $DAEMON_JSON (live-restore)"
        printf '{\n  "live-restore": true\n}\n' | $SUDO tee "$DAEMON_JSON" >/dev/null
        return
    fi
    if python3 - "$DAEMON_JSON" <<'PY'; then
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("live-restore") is True else 1)
PY
        return
    fi
    say "docker: enabling live-restore in $DAEMON_JSON"
    $SUDO python3 - "$DAEMON_JSON" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    cfg = json.load(f)
cfg["live-restore"] = True
with open(path, "w") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
PY
}

have_docker_init() {
    local d
    for d in /usr/libexec/docker /usr/local/libexec/docker /usr/lib/docker /usr/local/lib/docker; do
        [[ -x $d/docker-init ]] && return 0
    done
    command -v docker-init >/dev/null 2>&1
}

ensure_docker() {
    local live
    if live=$($DOCKER info --format '{{.LiveRestoreEnabled}}' 2>/dev/null); then
        if [[ $live != true && -z ${DOCKER_HOST:-} ]]; then
            # live-restore is a reloadable option: enable it without a restart.
            ensure_daemon_json
            if [[ -f /var/run/docker.pid ]]; then
                say "docker: reloading dockerd to enable live-restore"
                $SUDO kill -HUP "$(cat /var/run/docker.pid)" || true
            fi
        fi
        have_docker_init || { say "docker: docker-init missing"; apt_install tini docker.io; }
        say "docker: ok"
        return
    fi
    if [[ -n ${DOCKER_HOST:-} ]]; then
        die "docker: DOCKER_HOST=$DOCKER_HOST does not answer; not starting a local engine"
    fi

    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io
        [[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
    fi
    # docker.io's /usr/bin/docker-init is a symlink to tini-static (package tini).
    have_docker_init || apt_install tini docker.io
    have_docker_init || die "docker: docker-init not found after installing tini"
    ensure_daemon_json

    clear_stale_pidfile /var/run/docker.pid dockerd
    clear_stale_pidfile /var/run/docker/containerd/containerd.pid containerd

    say "docker: starting dockerd (log: $DOCKERD_LOG)"
    $SUDO mkdir -p "$(dirname "$DOCKERD_LOG")"
    # Fully detached: own session, no inherited stdin/stdout (so `make` does
    # not wait for it), survives the end of this script.
    $SUDO setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local pid=$!
    disown || true

    local deadline=$((SECONDS + 60))
    until $DOCKER info >/dev/null 2>&1; do
        if ! proc_alive "$pid" || ((SECONDS >= deadline)); then
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            if proc_alive "$pid"; then die "docker: dockerd did not come up within 60 s"; fi
            die "docker: dockerd exited (see $DOCKERD_LOG)"
        fi
        sleep 0.25
    done
    say "docker: ok ($($DOCKER version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null || echo up))"
}

# ---------------------------------------------------------------- busybox
# ldd exits 1 for a static binary, hence the `|| true` under pipefail.
is_static() { { LC_ALL=C ldd "$1" 2>&1 || true; } | grep -q 'not a dynamic executable'; }

ensure_busybox() {
    if pkg_installed busybox-static && [[ -x /bin/busybox ]] && is_static /bin/busybox; then
        say "busybox-static: ok"
        return
    fi
    apt_install busybox-static
    is_static /bin/busybox ||
        die "busybox-static: /bin/busybox is still not a static binary"
    say "busybox-static: ok"
}

# ---------------------------------------------------------------- postgresql
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432; }

pg_trust_localhost() {
    # Trust TCP connections from localhost (CI/dev only). A fresh Debian
    # cluster has scram-sha-256 for 127.0.0.1/32 and ::1/128.
    local hba
    hba="/etc/postgresql/$1/main/pg_hba.conf"
    [[ -f $hba ]] || return 0
    if ! grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        say "postgresql: trusting 127.0.0.1/32 and ::1/128 in $hba"
        $SUDO sed -i -E \
            -e 's#^([[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+(127\.0\.0\.1/32|::1/128)[[:space:]]+)[a-z0-9-]+#\1trust#' \
            "$hba"
        grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32' "$hba" ||
            printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' | $SUDO tee -a "$hba" >/dev/null
        return 1 # changed
    fi
    return 0
}

ensure_postgres() {
    local ver
    if pg_ready; then
        say "postgresql: ok"
        return
    fi
    if [[ ! -d /etc/postgresql ]] || [[ -z $(ls -A /etc/postgresql 2>/dev/null) ]]; then
        apt_install postgresql
    fi
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    [[ -n $ver ]] || die "postgresql: no cluster under /etc/postgresql"
    if [[ ! -d /etc/postgresql/$ver/main ]]; then
        say "postgresql: creating cluster $ver/main"
        $SUDO pg_createcluster "$ver" main >/dev/null
    fi
    pg_trust_localhost "$ver" || true
    $SUDO install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    clear_stale_pidfile "/var/lib/postgresql/$ver/main/postmaster.pid" postgres
    say "postgresql: starting cluster $ver/main"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
        say "postgresql: pg_ctlcluster start failed (maybe already starting); polling"
    poll 30 "pg_isready" pg_ready || die "postgresql: not ready within 30 s"
    say "postgresql: ok"
}

# ---------------------------------------------------------------- redis
redis_ready() { [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]]; }

ensure_redis() {
    if command -v redis-cli >/dev/null 2>&1 && redis_ready; then
        say "redis: ok"
        return
    fi
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    $SUDO mkdir -p /var/lib/redis /var/log/redis
    say "redis: starting redis-server"
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    poll 20 "redis ping" redis_ready || {
        tail -n 20 /var/log/redis/ci.log >&2 || true
        die "redis: not answering within 20 s"
    }
    say "redis: ok"
}

# ---------------------------------------------------------------- tools
# What the suites run besides the services: `ip` (the fault suite's private
# engine's bridge; iproute2 is not essential in Debian, so a minimal image
# may lack it), tar and runuser (the fault suite) and sha256sum (images.sh),
# essential but checked all the same.
ensure_tools() {
    command -v ip >/dev/null 2>&1 || apt_install iproute2
    local tool
    for tool in ip tar sha256sum runuser; do
        command -v "$tool" >/dev/null 2>&1 || die "tools: $tool is missing"
    done
    say "tools: ok"
}

# ---------------------------------------------------------------- rabbitmq
amqp_ready() { tcp_open 127.0.0.1 5672; }

ensure_rabbitmq() {
    if amqp_ready; then
        say "rabbitmq: ok"
        return
    fi
    command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
    say "rabbitmq: starting rabbitmq-server"
    # Fails harmlessly if a node is already booting; then we just poll.
    $SUDO rabbitmq-server -detached </dev/null >/dev/null 2>&1 ||
        say "rabbitmq: rabbitmq-server -detached failed (maybe already starting); polling"
    if ! poll 60 "amqp port" amqp_ready; then
        tail -n 30 /var/log/rabbitmq/*.log 2>/dev/null >&2 || true
        die "rabbitmq: nothing listens on 127.0.0.1:5672 after 60 s"
    fi
    say "rabbitmq: ok"
}

# usage: scripts/bootstrap.sh [tools|busybox|docker|postgres|redis|rabbitmq ...]  (default: all)
steps=("$@")
((${#steps[@]})) || steps=(tools busybox docker postgres redis rabbitmq)
for step in "${steps[@]}"; do
    case $step in
    tools | busybox | docker | postgres | redis | rabbitmq) "ensure_$step" ;;
    *) die "unknown step: $step (tools, busybox, docker, postgres, redis, rabbitmq)" ;;
    esac
done
