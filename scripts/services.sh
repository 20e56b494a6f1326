#!/usr/bin/env bash
# Starts the local services the test-suite uses when one is not answering.
# Each start command is the machine's own; a service that is up is left alone.
set -u

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {
  local port=$1 name=$2
  for _ in $(seq 1 50); do up "$port" && return 0; sleep 0.2; done
  echo "services: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

start() {
  local port=$1 name=$2; shift 2
  up "$port" && return 0
  echo "services: starting $name"
  "$@" >/dev/null 2>&1 || true
  wait_up "$port" "$name"
}

status=0
if command -v pg_ctlcluster >/dev/null 2>&1; then
  start 5432 postgresql pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || status=1
fi
if command -v redis-server >/dev/null 2>&1; then
  start 6379 redis redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || status=1
fi
if [ -x /usr/sbin/nats-server ]; then
  start 4222 nats start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || status=1
fi
# A missing service is not fatal here: under CI=true the tests that need it fail loudly.
exit 0
