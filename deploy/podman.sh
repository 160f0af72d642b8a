#!/usr/bin/env bash
# podman as this project runs it on a host without systemd: the runc runtime (crun fails
# here: "setrlimit RLIMIT_NOFILE: Operation not permitted") and default ulimits no higher
# than this process's own, which runc refuses to raise. Arguments go to podman unchanged.
set -euo pipefail
conf="${TMPDIR:-/tmp}/visionloop-containers.conf"
nofile=$(ulimit -Hn)
cat > "$conf" <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
CONTAINERS_CONF="$conf" exec podman "$@"
