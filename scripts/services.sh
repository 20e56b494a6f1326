#!/usr/bin/env bash
# Makes sure the services the test-suite uses answer, starting the machine's own when not.
#
# The addresses are the tests' own: INTERLOCK_TEST_POSTGRES_URL, INTERLOCK_TEST_REDIS_URL and
# INTERLOCK_TEST_NATS_URL, by default the local services on their usual ports. Only a service
# at its default address is started here (with the machine's own start command); one set
# elsewhere is only checked. A service that is up is left alone. Kafka needs nothing here:
# the tests start their own broker.
#
# Exits 1, with one line per service naming what to do, when a service does not answer and
# cannot be started: `make test` stops there instead of running tests that could only fail
# (under CI=true) or skip.
set -u

hostport() { # URL -> "host port" ($2: the port when the URL names none)
  local rest=${1#*://}
  rest=${rest%%/*}
  rest=${rest%%\?*}
  rest=${rest##*@}
  if [[ $rest == *:* ]]; then echo "${rest%:*} ${rest##*:}"; else echo "$rest $2"; fi
}

up() { timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# need NAME VARIABLE DEFAULT_URL DEFAULT_PORT PROGRAM START_COMMAND...
need() {
  local name=$1 variable=$2 default=$3 default_port=$4 program=$5
  shift 5
  local url=${!variable:-$default} host port output
  read -r host port <<<"$(hostport "$url" "$default_port")"
  up "$host" "$port" && return 0
  if [ "$url" != "$default" ]; then
    echo "services: $name is not answering at $host:$port ($variable); start it there or unset $variable" >&2
    return 1
  fi
  if [ ! -x "$program" ] && ! command -v "$program" >/dev/null 2>&1; then
    echo "services: $name is not answering at $host:$port and $program is not installed; install $name or set $variable" >&2
    return 1
  fi
  echo "services: starting $name"
  if ! output=$("$@" 2>&1); then
    echo "services: starting $name failed: $(printf '%s' "$output" | tail -n 1)" >&2
    return 1
  fi
  for _ in $(seq 1 150); do up "$host" "$port" && return 0; sleep 0.2; done
  echo "services: $name was started but does not answer on $host:$port after 30 s" >&2
  return 1
}

status=0
need PostgreSQL INTERLOCK_TEST_POSTGRES_URL postgresql+psycopg://postgres@127.0.0.1:5432/test 5432 \
  pg_ctlcluster \
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql 2>/dev/null | head -n 1)" main start \
  || status=1
need Redis INTERLOCK_TEST_REDIS_URL redis://127.0.0.1:6379/0 6379 \
  redis-server \
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
  --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
  || status=1
need NATS INTERLOCK_TEST_NATS_URL nats://127.0.0.1:4222 4222 \
  /usr/sbin/nats-server \
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
  -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log \
  || status=1
exit $status
