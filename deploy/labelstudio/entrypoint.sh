#!/bin/sh
# Wait (up to 3 min) for the database to accept connections, then start Label Studio:
# compose starts services together and no healthcheck runs without systemd.
set -eu
if [ "${DJANGO_DB:-sqlite}" = default ]; then
    python3 - <<'PY'
import os, socket, sys, time
host, port = os.environ["POSTGRE_HOST"], int(os.environ.get("POSTGRE_PORT", "5432"))
deadline = time.monotonic() + 180
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"database {host}:{port} unreachable for 180 s: {exc}")
        time.sleep(1)
PY
fi
exec label-studio start --no-browser --internal-host 0.0.0.0 --port 8080 \
    --data-dir /label-studio/data
