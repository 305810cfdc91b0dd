#!/usr/bin/env bash
# Make sure a Redis answers where the worker will look (REDIS_PUBLIC_URL > REDIS_URL >
# REDIS_HOST/PORT, default redis://127.0.0.1:6379). If none does and the target is this
# machine, start a private redis-server (no persistence) whose files live in .run/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

target=$("$PY" - <<'PY'
import os
from worker.settings import redis_settings_from_env
r = redis_settings_from_env(os.environ)
print(r.host, r.port)
PY
)
read -r host port <<<"$target"

# 0: Redis answers. 3: nothing listens there (we may start one). 1: something answers but is not
# usable (wrong password, TLS, not Redis): starting another redis-server would not help.
status=0
"$PY" - <<'PY' || status=$?
import asyncio, os, sys
from worker.redis_probe import RedisUnreachable, probe
from worker.settings import redis_settings_from_env
try:
    asyncio.run(probe(redis_settings_from_env(os.environ), 2.0))
except RedisUnreachable as exc:
    if exc.kind != "refused":
        print(f"Redis not usable: {exc}", file=sys.stderr)
    sys.exit(3 if exc.kind == "refused" else 1)
PY
case "$status" in
  0) exit 0 ;;
  3) ;;
  *) exit 1 ;;
esac

case "$host" in
  127.0.0.1|localhost|::1) ;;
  *) echo "No Redis answers at $host:$port (from your REDIS_* settings); check the URL and the network." >&2; exit 1 ;;
esac
if ! command -v redis-server >/dev/null 2>&1; then
  echo "No Redis answers at $host:$port and redis-server is not installed." >&2
  echo "Install one (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2
  echo "or point REDIS_URL at a running Redis." >&2
  exit 1
fi
mkdir -p .run
echo "No Redis at $host:$port: starting a private redis-server there (data in .run/, not persisted)." >&2
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$PWD/.run" \
  --daemonize yes --pidfile "$PWD/.run/redis-$port.pid" --logfile "$PWD/.run/redis-$port.log"
for _ in $(seq 1 50); do
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "It keeps running after the worker stops; stop it with: make stop-redis" >&2
    exit 0
  fi
  sleep 0.1
done
echo "redis-server did not come up; see .run/redis-$port.log" >&2
exit 1
