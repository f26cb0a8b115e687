#!/usr/bin/env bash
# A local production-shaped cluster in one command: N gateways behind HAProxy, plus an active and a standby
# listener, on one PostgreSQL.
#
#   deploy/local/cluster.sh up        start everything (idempotent: what already runs is left alone)
#   deploy/local/cluster.sh status    each process, its health, HAProxy's view, who holds listener leadership
#   deploy/local/cluster.sh stop NAME    NAME = gateway-K or listener-K: SIGTERM, wait for the exit (the active
#                                     listener: also until the standby has taken over)
#   deploy/local/cluster.sh start NAME   start it again, wait until it serves (a gateway: ready and UP in
#                                     HAProxy; a listener: live or standby)
#   deploy/local/cluster.sh restart NAME stop, then start: one step of a rolling deploy
#   deploy/local/cluster.sh down      stop exactly what `up` started (by its pid files), idempotent
#
# Settings (environment; `up` records them in the state directory, so later commands need none of them):
#   CDC_DATABASE_URL          the database; unset: an embedded PostgreSQL under the state directory
#   CDC_SECRET                token signing key; unset: one is generated into the state directory
#   CDC_CLUSTER_DIR           state directory (pids, logs, generated haproxy.cfg); default .cdc/cluster
#   CDC_CLUSTER_PORT          HAProxy's port (default 8000); gateway K listens on port + K, stats on port + 404
#   CDC_CLUSTER_GATEWAYS      number of gateways (default 3)
#   CDC_CLUSTER_PYTHON        the Python with the project's dependencies (default .venv/bin/python); the
#                             code itself always comes from this checkout's src/
# Any other CDC_* variable (CDC_LOG_LEVEL, CDC_SSE_PING_SECONDS, ...) reaches every process as it is.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${CDC_CLUSTER_DIR:-$ROOT/.cdc/cluster}
LISTENERS=2

die() { echo "cluster: $*" >&2; exit 1; }
say() { echo "cluster: $*"; }

# -- settings -------------------------------------------------------------------------------------------------

# `up` writes the settings it resolved to $STATE/cluster.env; every later command reads them from there, so
# `down` and `restart` act on what is running even from another shell.
load_settings() {
    if [[ -f $STATE/cluster.env ]]; then
        # shellcheck source=/dev/null
        source "$STATE/cluster.env"
    else
        PORT=${CDC_CLUSTER_PORT:-8000}
        GATEWAYS=${CDC_CLUSTER_GATEWAYS:-3}
        PYTHON=${CDC_CLUSTER_PYTHON:-$ROOT/.venv/bin/python}
        DATABASE_URL=${CDC_DATABASE_URL:-}
    fi
    STATS_PORT=$((PORT + 404))
}

save_settings() {
    mkdir -p "$STATE"
    # The URL may hold a password: readable by this user only.
    (umask 077 && cat >"$STATE/cluster.env" <<EOF
PORT=$PORT
GATEWAYS=$GATEWAYS
PYTHON=$(printf %q "$PYTHON")
DATABASE_URL=$(printf %q "$DATABASE_URL")
EOF
    )
}

# The environment of every cdc-dashboard process: the caller's, the database, the key, this checkout's code,
# and this proxy as the one whose X-Forwarded-For the gateways believe. Exported in a subshell only (never on
# a command line, where `ps` would show the key).
export_cdc_env() {
    export CDC_DATABASE_URL=$DATABASE_URL PYTHONPATH=$ROOT/src CDC_TRUSTED_PROXIES=${CDC_TRUSTED_PROXIES:-127.0.0.1}
    CDC_SECRET=$(cat "$STATE/secret")
    export CDC_SECRET
}

cdc() {
    (export_cdc_env && "$PYTHON" -m cdc_dashboard.cli "$@")
}

# -- processes ------------------------------------------------------------------------------------------------

# A pid file names a process of ours while that pid is alive (not a zombie) and its command line still
# mentions what we started (a recycled pid belongs to someone else).
running() {
    local name=$1 pid
    [[ -f $STATE/$name.pid && -s $STATE/$name.match ]] || return 1
    pid=$(cat "$STATE/$name.pid")
    [[ -r /proc/$pid/cmdline ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$(cat "$STATE/$name.match")"
}

# start NAME MATCH COMMAND...: in its own session (a Ctrl-C in this terminal does not reach it), output to
# $STATE/NAME.log, pid to $STATE/NAME.pid. MATCH is a piece of the command line that `running` checks.
start() {
    local name=$1 match=$2
    shift 2
    if running "$name"; then
        return 0
    fi
    echo "$match" >"$STATE/$name.match"
    (
        export_cdc_env
        setsid "$@" >>"$STATE/$name.log" 2>&1 </dev/null &
        echo $! >"$STATE/$name.pid"
    )
}

# stop NAME [SIGNAL]: signal it (default SIGTERM), wait for it to exit (SIGKILL after 20 s), forget its pid.
stop() {
    local name=$1 signal=${2:-TERM} pid i
    if running "$name"; then
        pid=$(cat "$STATE/$name.pid")
        kill "-$signal" "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            running "$name" || break
            sleep 0.1
        done
        if running "$name"; then
            say "$name (pid $pid) still running after 20 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE/$name.pid"
}

wait_http_200() {
    local url=$1 name=$2 i
    for ((i = 0; i < 600; i++)); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true) == 200 ]]; then
            return 0
        fi
        if [[ -n $name ]] && ! running "$name"; then
            tail -n 20 "$STATE/$name.log" >&2 || true
            die "$name exited; its log is $STATE/$name.log"
        fi
        sleep 0.1
    done
    die "no 200 from $url after 60 s"
}

# HAProxy's opinion of a gateway (UP, DOWN, MAINT, ...), from its stats page.
proxy_state() {
    { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/;csv" || true; } |
        awk -F, -v sv="$1" '$1 == "gateways" && $2 == sv {print $18}'
}

start_gateway() {
    start "gateway-$1" "cdc_dashboard.cli serve" \
        env CDC_HTTP_HOST=127.0.0.1 CDC_HTTP_PORT=$((PORT + $1)) "$PYTHON" -m cdc_dashboard.cli serve
}

start_listener() {
    start "listener-$1" "cdc_dashboard.cli listen" "$PYTHON" -m cdc_dashboard.cli listen
}

# A listener has started when its log, past line $2, says it is live (it holds leadership) or waiting as a
# hot standby.
wait_listener() {
    local name=$1 skip=$2 i
    for ((i = 0; i < 600; i++)); do
        if tail -n +$((skip + 1)) "$STATE/$name.log" | grep -q -e '"listener live"' -e 'waiting as hot standby'; then
            return 0
        fi
        running "$name" || die "$name exited; its log is $STATE/$name.log"
        sleep 0.1
    done
    die "$name neither live nor standby after 60 s; its log is $STATE/$name.log"
}

log_lines() {
    if [[ -f $STATE/$1.log ]]; then wc -l <"$STATE/$1.log"; else echo 0; fi
}

# The active listener, from its own bookkeeping row (node = host:pid of the leader; `state` says live).
leader_pid() {
    (export_cdc_env && "$PYTHON" -c '
import os, psycopg
with psycopg.connect(os.environ["CDC_DATABASE_URL"], connect_timeout=3) as conn:
    row = conn.execute("select state, node from dashboard.listener_state").fetchone()
print(row[1].rsplit(":", 1)[1] if row and row[0] in ("live", "catching_up") and row[1] else "")
' 2>/dev/null) || true
}

start_haproxy() {
    if ! command -v haproxy >/dev/null; then
        say "installing Debian's haproxy"
        (apt-get install -y -qq haproxy >/dev/null 2>&1) ||
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null) ||
            die "could not install haproxy (apt-get install haproxy)"
    fi
    # The committed config with this cluster's ports and one server line per gateway.
    local servers="" k
    for ((k = 1; k <= GATEWAYS; k++)); do
        servers+="    server gw$k 127.0.0.1:$((PORT + k))\n"
    done
    awk -v servers="$servers" -v port="$PORT" -v stats="$STATS_PORT" '
        /^    # BEGIN servers/ { print; printf "%s", servers; skip = 1; next }
        /^    # END servers/ { skip = 0 }
        skip { next }
        /^    bind 127\.0\.0\.1:8000$/ { print "    bind 127.0.0.1:" port; next }
        /^    bind 127\.0\.0\.1:8404$/ { print "    bind 127.0.0.1:" stats; next }
        { print }
    ' "$ROOT/deploy/haproxy/haproxy.cfg" >"$STATE/haproxy.cfg"
    haproxy -q -c -f "$STATE/haproxy.cfg" || die "the generated $STATE/haproxy.cfg is invalid"
    start haproxy "$STATE/haproxy.cfg" haproxy -db -f "$STATE/haproxy.cfg"
}

# -- commands -------------------------------------------------------------------------------------------------

cmd_up() {
    mkdir -p "$STATE"
    load_settings
    [[ -x $PYTHON ]] || die "no Python at $PYTHON: run \`make install\`, or set CDC_CLUSTER_PYTHON"
    if [[ -z $DATABASE_URL ]]; then
        # pgserver leaves the server running when this helper exits (cleanup_mode=None); `down` stops it by
        # the postmaster's pid.
        say "starting the embedded PostgreSQL under $STATE/pgdata"
        DATABASE_URL=$(PYTHONPATH="$ROOT/src" "$PYTHON" -c '
import sys
from cdc_dashboard.db.embedded import start_embedded
print(start_embedded(sys.argv[1], cleanup_mode=None).get_uri())' "$STATE" 2>>"$STATE/postgres.log")
        touch "$STATE/embedded"
    fi
    save_settings
    if [[ ! -s $STATE/secret ]]; then
        if [[ -n ${CDC_SECRET:-} ]]; then
            (umask 077 && printf %s "$CDC_SECRET" >"$STATE/secret")
        else
            (umask 077 && head -c 48 /dev/urandom | base64 -w0 >"$STATE/secret")
        fi
    fi
    say "db apply"
    cdc db apply >>"$STATE/db-apply.log" 2>&1 ||
        die "db apply failed; see $STATE/db-apply.log"
    local k
    for ((k = 1; k <= GATEWAYS; k++)); do
        start_gateway "$k"
    done
    for ((k = 1; k <= GATEWAYS; k++)); do
        wait_http_200 "http://127.0.0.1:$((PORT + k))/readyz" "gateway-$k"
    done
    # listener-1 first, so that it is the active one and listener-2 the standby.
    local lines
    for ((k = 1; k <= LISTENERS; k++)); do
        running "listener-$k" && continue
        lines=$(log_lines "listener-$k")
        start_listener "$k"
        wait_listener "listener-$k" "$lines"
    done
    start_haproxy
    wait_http_200 "http://127.0.0.1:$PORT/readyz" haproxy
    say "up: http://127.0.0.1:$PORT (HAProxy stats: http://127.0.0.1:$STATS_PORT/)"
    say "an admin token: CDC_STATE_DIR=$STATE PYTHONPATH=$ROOT/src $PYTHON -m cdc_dashboard.cli token --admin"
}

cmd_down() {
    if [[ ! -d $STATE ]]; then
        say "nothing to stop ($STATE does not exist)"
        return 0
    fi
    load_settings
    # The proxy first (no new requests), then the gateways (they drain their streams), then the listeners
    # (standby first, so leadership does not move on the way out), then the database.
    local k
    stop haproxy
    for ((k = 1; k <= GATEWAYS; k++)); do stop "gateway-$k" & done
    wait
    for ((k = LISTENERS; k >= 1; k--)); do stop "listener-$k"; done
    if [[ -f $STATE/embedded && -f $STATE/pgdata/postmaster.pid ]]; then
        local pid i
        pid=$(head -n 1 "$STATE/pgdata/postmaster.pid")
        # SIGINT is PostgreSQL's "fast" shutdown: sessions end, the data is checkpointed.
        if kill -INT "$pid" 2>/dev/null; then
            for ((i = 0; i < 300; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
    fi
    rm -f "$STATE/embedded" "$STATE/cluster.env"
    say "down"
}

cmd_status() {
    [[ -f $STATE/cluster.env ]] || { say "not up ($STATE/cluster.env missing)"; return 1; }
    load_settings
    local leader k name line code
    leader=$(leader_pid)
    printf '%-11s %-8s %-8s %s\n' PROCESS PID STATE DETAIL
    if running haproxy; then
        printf '%-11s %-8s %-8s %s\n' haproxy "$(cat "$STATE/haproxy.pid")" running "http://127.0.0.1:$PORT"
    else
        printf '%-11s %-8s %-8s\n' haproxy - stopped
    fi
    for ((k = 1; k <= GATEWAYS; k++)); do
        name=gateway-$k
        if running "$name"; then
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:$((PORT + k))/readyz" || true)
            line="port $((PORT + k)), readyz $code, in HAProxy: $(proxy_state "gw$k")"
            printf '%-11s %-8s %-8s %s\n' "$name" "$(cat "$STATE/$name.pid")" running "$line"
        else
            printf '%-11s %-8s %-8s %s\n' "$name" - stopped "in HAProxy: $(proxy_state "gw$k")"
        fi
    done
    for ((k = 1; k <= LISTENERS; k++)); do
        name=listener-$k
        if running "$name"; then
            line=standby
            [[ $(cat "$STATE/$name.pid") == "$leader" ]] && line="active (holds leadership)"
            printf '%-11s %-8s %-8s %s\n' "$name" "$(cat "$STATE/$name.pid")" running "$line"
        else
            printf '%-11s %-8s %-8s\n' "$name" - stopped
        fi
    done
    [[ -n $leader ]] || echo "no listener holds leadership right now"
}

# One process: `stop NAME` (SIGTERM, wait for the exit; for the active listener, also until the standby holds
# leadership), `start NAME` (and wait until it serves: a gateway ready and UP in HAProxy, a listener live or
# standby), `restart NAME` (both).
check_name() {
    [[ -f $STATE/cluster.env ]] || die "not up"
    load_settings
    case $1 in
        gateway-[0-9]*) ((${1#gateway-} >= 1 && ${1#gateway-} <= GATEWAYS)) || die "no $1 (gateways 1-$GATEWAYS)" ;;
        listener-[0-9]*) ((${1#listener-} >= 1 && ${1#listener-} <= LISTENERS)) || die "no $1 (listeners 1-$LISTENERS)" ;;
        *) die "name gateway-K or listener-K" ;;
    esac
}

cmd_stop() {
    local name=$1 other="" was_leader="" i
    check_name "$name"
    if [[ $name == listener-* ]]; then
        other=listener-$((3 - ${name#listener-}))
        [[ $(leader_pid) == "$(cat "$STATE/$name.pid" 2>/dev/null)" ]] && was_leader=1
    fi
    stop "$name"
    # The active listener: wait until the standby holds leadership, so that starting this one again cannot
    # take the lock back first (the standby would never have been exercised).
    if [[ -n $was_leader ]] && running "$other"; then
        for ((i = 0; i < 300; i++)); do
            [[ $(leader_pid) == "$(cat "$STATE/$other.pid")" ]] && break
            sleep 0.1
        done
        [[ $(leader_pid) == "$(cat "$STATE/$other.pid")" ]] || die "$other did not take over within 30 s"
    fi
    say "$name stopped"
}

cmd_start() {
    local name=$1 i lines
    check_name "$name"
    case $name in
        gateway-*)
            local k=${name#gateway-}
            start_gateway "$k"
            wait_http_200 "http://127.0.0.1:$((PORT + k))/readyz" "$name"
            # Back in rotation only when HAProxy's checks have seen it (rise 2): restarting the next gateway
            # before that would leave one fewer to take its streams.
            for ((i = 0; i < 300; i++)); do
                [[ $(proxy_state "gw$k") == UP ]] && break
                sleep 0.1
            done
            ;;
        listener-*)
            if ! running "$name"; then
                lines=$(log_lines "$name")
                start_listener "${name#listener-}"
                wait_listener "$name" "$lines"
            fi
            ;;
    esac
    say "$name started (pid $(cat "$STATE/$name.pid"))"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    stop) cmd_stop "${2:-}" ;;
    start) cmd_start "${2:-}" ;;
    restart) cmd_stop "${2:-}" && cmd_start "${2:-}" ;;
    *) echo "usage: $0 up|down|status|stop NAME|start NAME|restart NAME (NAME: gateway-K, listener-K)" >&2; exit 2 ;;
esac
