#!/usr/bin/env bash
# A local switchboard cluster without Docker: Redis shard(s), N nodes and HAProxy (with
# deploy/haproxy/haproxy.cfg), all on 127.0.0.1 on ports chosen at run time.
#
#   deploy/local/cluster.sh up [--nodes N] [--shards S] [--dir DIR] [--release|--debug|--binary PATH]
#   deploy/local/cluster.sh status [--dir DIR]
#   deploy/local/cluster.sh down [--dir DIR]
#
# The same settings as environment variables: NODES (default 3, at most 9), SHARDS (default 1),
# CLUSTER_DIR (default target/cluster), SWITCHBOARD_BIN (a binary to use), NODE_FLAGS (extra
# flags for every node, e.g. "--drain-grace-ms 2000"). SB_CHECK_INTER and the other SB_*
# variables of haproxy.cfg are passed on to HAProxy.
#
# `up` builds nothing: it runs target/release/switchboard (or target/debug/switchboard with
# --debug), and says so if it is missing. It records every process it starts in DIR/pids/ and
# `down` stops exactly those processes (checking that each pid still runs the program it
# started): HAProxy, then the nodes, then Redis. Logs stay in DIR/logs/; DIR/cluster.env holds
# the URLs and ports.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
cfg=$root/deploy/haproxy/haproxy.cfg

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 64
}

command=${1:-}
[ $# -gt 0 ] && shift
nodes=${NODES:-3}
shards=${SHARDS:-1}
dir=${CLUSTER_DIR:-target/cluster}
binary=${SWITCHBOARD_BIN:-target/release/switchboard}
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
    --shards) shards=${2:?--shards needs a value}; shift 2 ;;
    --dir) dir=${2:?--dir needs a value}; shift 2 ;;
    --release) binary=target/release/switchboard; shift ;;
    --debug) binary=target/debug/switchboard; shift ;;
    --binary) binary=${2:?--binary needs a value}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "cluster.sh: unknown argument $1" >&2; usage ;;
  esac
done
case $dir in /*) ;; *) dir=$root/$dir ;; esac
pids=$dir/pids
logs=$dir/logs
read -r -a node_flags <<<"${NODE_FLAGS:-}"

die() { echo "cluster.sh: $*" >&2; exit 1; }

# A TCP port nobody listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to $1 tenths of a second for the command after it to succeed.
wait_for() {
  local tries=$1 i
  shift
  for ((i = 0; i < tries; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# Starts a program in its own session (so a closed terminal does not stop it) and records its
# pid and program path in DIR/pids/NAME.pid; stdout and stderr go to DIR/logs/NAME.log.
start() { # name program args...
  local name=$1
  shift
  setsid "$@" </dev/null >"$logs/$name.log" 2>&1 &
  local pid=$!
  echo "$pid $(command -v "$1")" >"$pids/$name.pid"
  echo "$pid"
}

# The pid recorded for NAME if that process still runs the recorded program, else nothing.
live_pid() { # name
  local file=$pids/$1.pid pid program
  [ -f "$file" ] || return 0
  read -r pid program <"$file"
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$program")" ] \
    && echo "$pid"
  return 0
}

# True once the process has exited (a zombie, not yet reaped, has no executable any more).
exited() { # pid
  [ -z "$(readlink "/proc/$1/exe" 2>/dev/null)" ]
}

# Recorded process names of one kind: haproxy, node or redis.
recorded() { # kind
  [ -d "$pids" ] || return 0
  find "$pids" -name "$1*.pid" -printf '%f\n' | sed 's/\.pid$//' | sort
}

# Sends SIGTERM to the recorded processes of one kind that still run, then waits for them to exit
# (nodes drain, closing their clients with 1001), with SIGKILL after 30 s.
stop_kind() { # kind
  local name pid entry stopped=()
  for name in $(recorded "$1"); do
    pid=$(live_pid "$name")
    if [ -n "$pid" ]; then
      kill -TERM "$pid" 2>/dev/null || true
      stopped+=("$name:$pid")
    fi
  done
  for entry in ${stopped[@]+"${stopped[@]}"}; do
    name=${entry%%:*} pid=${entry##*:}
    if ! wait_for 300 exited "$pid"; then
      echo "cluster.sh: $name ($pid) still running after 30 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stopped $name ($pid)"
  done
}

# HAProxy first (no new clients), then the nodes (which still need Redis to leave the cluster
# cleanly), then Redis.
down() {
  stop_kind haproxy
  stop_kind node
  stop_kind redis
  [ -d "$pids" ] && rm -f "$pids"/*.pid
  rm -f "$dir/cluster.env" "$dir/haproxy.sock"
  return 0
}

# Reads "public internal" from a node's JSON log once it has announced its ports.
node_ports() { # log file
  python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if "public" in fields and "internal" in fields:
        print(fields["public"], fields["internal"])
        break
else:
    sys.exit(1)
PY
}

up() {
  [[ $nodes =~ ^[1-9]$ ]] || die "--nodes must be 1 to 9 (haproxy.cfg has 9 server slots), not $nodes"
  [[ $shards =~ ^[1-9][0-9]*$ ]] || die "--shards must be a positive number, not $shards"
  case $binary in /*) ;; *) binary=$root/$binary ;; esac
  [ -x "$binary" ] || die "no switchboard binary at $binary: build it first (cargo build --release, or cargo build and --debug)"
  command -v redis-server >/dev/null || die "redis-server is not installed (apt-get install redis-server)"
  command -v haproxy >/dev/null || die "haproxy is not installed (apt-get install haproxy)"

  local name any_live=no any_dead=no
  for name in $(recorded haproxy) $(recorded node) $(recorded redis); do
    if [ -n "$(live_pid "$name")" ]; then any_live=yes; else any_dead=yes; fi
  done
  if [ $any_live = yes ]; then
    if [ $any_dead = no ]; then
      echo "cluster.sh: already up" >&2
      status
      return 0
    fi
    die "part of the cluster in $dir is down: run '$0 down --dir $dir' first"
  fi

  mkdir -p "$pids" "$logs"
  rm -f "$pids"/*.pid
  # From here on, a failure stops whatever was started.
  trap 'echo "cluster.sh: up failed; stopping what was started" >&2; down >/dev/null' EXIT

  local i port urls=()
  for ((i = 0; i < shards; i++)); do
    port=$(free_port)
    start "redis$i" redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --protected-mode no >/dev/null
    wait_for 100 redis-cli -p "$port" ping || die "redis-server on port $port did not answer (see $logs/redis$i.log)"
    urls+=("redis://127.0.0.1:$port")
  done
  local redis
  redis=$(IFS=,; echo "${urls[*]}")

  local public=() internal=() ports
  for ((i = 1; i <= nodes; i++)); do
    start "node$i" "$binary" --node-id "local-$i" --redis "$redis" \
      --listen 127.0.0.1:0 --internal-listen 127.0.0.1:0 --log-format json \
      ${node_flags[@]+"${node_flags[@]}"} >/dev/null
  done
  for ((i = 1; i <= nodes; i++)); do
    wait_for 100 node_ports "$logs/node$i.log" || die "node$i did not start (see $logs/node$i.log)"
    read -r ports < <(node_ports "$logs/node$i.log")
    public[i]=${ports% *}
    internal[i]=${ports#* }
    wait_for 100 curl -fsS "http://${internal[i]}/readyz" || die "node$i never became ready (see $logs/node$i.log)"
  done

  local lb_port stats_port
  lb_port=$(free_port)
  stats_port=$(free_port)
  (
    export SB_PUBLIC_BIND=127.0.0.1:$lb_port SB_STATS_BIND=127.0.0.1:$stats_port
    export SB_STATS_SOCKET=$dir/haproxy.sock
    # Sized for this machine's open-files limit: HAProxy needs two files per connection.
    export SB_MAXCONN=${SB_MAXCONN:-4000} SB_FRONTEND_MAXCONN=${SB_FRONTEND_MAXCONN:-3900}
    export SB_SERVER_MAXCONN=${SB_SERVER_MAXCONN:-2000}
    for ((i = 1; i <= nodes; i++)); do
      export "SB_NODE$i=${public[i]}" "SB_NODE${i}_CHECK_PORT=${internal[i]##*:}"
    done
    haproxy -c -q -f "$cfg" || die "haproxy -c -f $cfg failed"
    start haproxy haproxy -f "$cfg" >/dev/null
  )
  local stats=http://127.0.0.1:$stats_port
  wait_for 100 curl -fsS "$stats/healthz" || die "HAProxy did not start (see $logs/haproxy.log)"
  wait_for 100 all_up "$stats" "$nodes" || die "HAProxy does not see every node UP (see $stats/stats)"
  trap - EXIT

  {
    echo "WS_URL=ws://127.0.0.1:$lb_port/ws"
    echo "SSE_URL=http://127.0.0.1:$lb_port/sse"
    echo "POLL_URL=http://127.0.0.1:$lb_port/poll"
    echo "HAPROXY_STATS_URL=$stats/stats"
    echo "HAPROXY_METRICS_URL=$stats/metrics"
    echo "HAPROXY_SOCKET=$dir/haproxy.sock"
    echo "REDIS=$redis"
    for ((i = 1; i <= nodes; i++)); do
      echo "NODE${i}_WS_URL=ws://${public[i]}/ws"
      echo "NODE${i}_INTERNAL_URL=http://${internal[i]}"
    done
  } >"$dir/cluster.env"
  echo "cluster up: $nodes node(s), $shards Redis shard(s); state in $dir"
  urls_of
}

# True when HAProxy reports exactly N servers of the backend and all of them UP.
all_up() { # stats-url nodes
  local up
  up=$(curl -fsS "$1/stats;csv" | awk -F, '$1 == "switchboard" && $2 ~ /^node/ && $18 == "UP"' | wc -l)
  [ "$up" -eq "$2" ]
}

urls_of() {
  [ -f "$dir/cluster.env" ] || return 0
  sed -e 's/^/  /' -e 's/=/: /' "$dir/cluster.env"
}

status() {
  local name pid state ready url any=no
  for name in $(recorded haproxy) $(recorded node) $(recorded redis); do
    any=yes
    pid=$(live_pid "$name")
    if [ -n "$pid" ]; then state="running (pid $pid)"; else state="NOT RUNNING"; fi
    ready=""
    case $name in
      node*)
        url=$(sed -n "s/^${name^^}_INTERNAL_URL=//p" "$dir/cluster.env" 2>/dev/null || true)
        if [ -n "$pid" ] && [ -n "$url" ]; then
          ready=", /readyz $(curl -s -o /dev/null -w '%{http_code}' "$url/readyz" || true)"
        fi ;;
      haproxy)
        url=$(sed -n 's/^HAPROXY_STATS_URL=//p' "$dir/cluster.env" 2>/dev/null || true)
        if [ -n "$pid" ] && [ -n "$url" ]; then
          ready=", servers: $(curl -fsS "$url;csv" 2>/dev/null \
            | awk -F, '$1 == "switchboard" && $2 ~ /^node/ { printf "%s%s %s", sep, $2, $18; sep = ", " }')"
        fi ;;
    esac
    printf '%-8s %s%s\n' "$name" "$state" "$ready"
  done
  [ $any = yes ] || { echo "no cluster recorded in $dir"; return 0; }
  urls_of
}

case $command in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
