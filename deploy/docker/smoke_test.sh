#!/usr/bin/env bash
# Runs a built Unmask image the way a user would and checks it end to end:
#   deploy/docker/smoke_test.sh [IMAGE] [HOST_PORT] [SERVE_ARGS...]   (defaults: unmask:cpu 18000)
# 1. `docker run -d -p HOST_PORT:8000 IMAGE SERVE_ARGS...` (none: the bundled model)
# 2. the image's own HEALTHCHECK turns "healthy"
# 3. a chat request gets an answer, and /metrics counts it; with no SERVE_ARGS the bundled
#    model must give the exact answer to a prompt in its task format
# 4. the process runs as a non-root user
# 5. `docker stop` (SIGTERM) drains and the container exits 0
# Extra `docker run` options (e.g. --gpus all) can be passed in DOCKER_RUN_ARGS.
set -euo pipefail

image=${1:-unmask:cpu}
port=${2:-18000}
shift $(( $# > 2 ? 2 : $# ))
name=unmask-smoke-$$
base=http://127.0.0.1:$port

cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# shellcheck disable=SC2086
docker run -d --name "$name" -p "$port:8000" ${DOCKER_RUN_ARGS:-} "$image" "$@" >/dev/null
echo "started $name from $image on $base"

for _ in $(seq 1 120); do
    status=$(docker inspect --format '{{.State.Health.Status}}' "$name")
    [ "$status" = healthy ] && break
    if [ "$(docker inspect --format '{{.State.Running}}' "$name")" != true ]; then
        docker logs "$name"; echo "FAIL: container exited"; exit 1
    fi
    sleep 2
done
[ "$status" = healthy ] || { docker logs "$name"; echo "FAIL: health status $status"; exit 1; }
echo "ok: HEALTHCHECK reports healthy"

# A sorting task in the bundled model's training format; served with no model argument,
# the image's bundled model must answer it exactly (as in the README's curl example).
prompt='Sort these numbers from smallest to largest: 42, 7, 19'
expected='Answer: 7, 19, 42'
model=$(curl -sf "$base/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
body=$(python3 -c 'import json,sys; print(json.dumps({"model": sys.argv[1], "max_tokens": 32, "cache": "dual",
    "unmask": "threshold", "messages": [{"role": "user", "content": sys.argv[2]}]}))' "$model" "$prompt")
reply=$(curl -sf "$base/v1/chat/completions" -H 'Content-Type: application/json' -d "$body") \
    || { docker logs "$name" | tail -20; echo "FAIL: the chat request was refused"; exit 1; }
answer=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' <<<"$reply")
if [ $# -eq 0 ]; then
    [ "$answer" = "$expected" ] || { echo "FAIL: answer '$answer', expected '$expected'"; exit 1; }
else
    [ -n "$answer" ] || { echo "FAIL: empty answer from $model"; exit 1; }
fi
echo "ok: $model answers: $answer"

metrics=$(curl -sf "$base/metrics")  # read it whole: `curl | grep -q` can fail on SIGPIPE under pipefail
grep -q '^unmask_http_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0$' <<<"$metrics" \
    || { echo "FAIL: /metrics does not count the chat request"; exit 1; }
echo "ok: /metrics counts the request"

uid=$(docker exec "$name" id -u)
[ "$uid" != 0 ] || { echo "FAIL: runs as root"; exit 1; }
echo "ok: runs as uid $uid"

docker stop --time 60 "$name" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { docker logs "$name" | tail -20; echo "FAIL: exit code $code after docker stop"; exit 1; }
echo "ok: docker stop drains and exits 0"
echo "PASS: $image"
