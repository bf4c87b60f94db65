#!/usr/bin/env bash
# Property-based API testing of the real server against docs/openapi.json.
#
# Builds the release binary, starts it on a temporary copy of config.example.toml (free
# port, temporary database, 1-day tokens), mints a token for the demo client, and runs
# Schemathesis over every operation of the served document: no 5xx, every status code,
# content type, header and body as documented. Fails on any failure, or if fewer than
# MIN_CASES test cases ran.
#
# Usage: .ci/schemathesis.sh            (from anywhere; needs cargo, python3 and pip)
# Env:   MAX_EXAMPLES (default 120) cases per operation and phase; MIN_CASES (default
#        1000); MAX_TIME (default 180) seconds for the whole Schemathesis run;
#        SCHEMATHESIS_SEED to replay a run; SKIP_INSTALL=1 to use the installed one.
set -euo pipefail

cd "$(dirname "$0")/.."

MAX_EXAMPLES="${MAX_EXAMPLES:-120}"
MIN_CASES="${MIN_CASES:-1000}"
MAX_TIME="${MAX_TIME:-180}"

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4.32,<5'
fi
# The CLI entry point may not be on PATH (pip --user installs); run it as a module.
st() { python3 -m schemathesis.cli "$@"; }
echo "schemathesis $(python3 -c 'import importlib.metadata as m; print(m.version("schemathesis"))')"

cargo build --release --quiet

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# The example config with a free port, a throw-away database and tokens that outlive the run.
sed -e 's|^listen = .*|listen = "127.0.0.1:0"|' \
    -e "s|^path = .*|path = \"$work/cosmopoints.redb\"|" \
    -e 's|^token_ttl_seconds = .*|token_ttl_seconds = 86400|' \
    config.example.toml >"$work/config.toml"
grep -q '^listen = "127.0.0.1:0"' "$work/config.toml"
grep -q '^token_ttl_seconds = 86400' "$work/config.toml"

"${CARGO_TARGET_DIR:-target}/release/cosmopoints" serve --config "$work/config.toml" >"$work/server.log" 2>&1 &
server_pid=$!

# Port 0: the server logs the address it got.
addr=""
for _ in $(seq 1 100); do
    addr="$(grep -oE 'listening on [0-9.]+:[0-9]+' "$work/server.log" | head -n1 | awk '{print $3}' || true)"
    [[ -n "$addr" ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "the server exited" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$addr" ]] || { cat "$work/server.log"; echo "no 'listening on' line in the log" >&2; exit 1; }
base="http://$addr"

for _ in $(seq 1 100); do
    curl -fsS "$base/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "$base/healthz" >/dev/null

token="$(curl -fsS -X POST "$base/v1/auth" -H 'Content-Type: application/json' \
    -d '{"clientId":"demo-pos","clientSecret":"cosmo-demo-secret"}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["accessToken"])')"

# The document cannot know this server's program ids, so random ones mostly get 422 and
# would leave the success paths to the examples. This hook swaps in a configured program
# id in about two thirds of the generated bodies and queries that carry one (and widens
# some date ranges to all time), so that 200/201 bodies get checked against their
# schemas too. Hypothesis draws the choice, so a seed still replays a run.
programs="$(curl -fsS "$base/v1/programs" -H "Authorization: Bearer $token" |
    python3 -c 'import json, sys; print(json.dumps([p["id"] for p in json.load(sys.stdin)]))')"
cat >"$work/hooks.py" <<PY
import json

import schemathesis
from hypothesis import strategies as st

PROGRAMS = json.loads('$programs')


def _with_program(value):
    if not isinstance(value, dict) or not isinstance(value.get("programId"), str):
        return st.just(value)
    choices = st.sampled_from(PROGRAMS + PROGRAMS + [value["programId"]])
    return choices.map(lambda p: {**value, "programId": p})


@schemathesis.hook
def flatmap_body(context, body):
    return _with_program(body)


@schemathesis.hook
def flatmap_query(context, query):
    widened = st.just(query)
    if isinstance(query, dict) and "startDate" in query and "endDate" in query:
        widened = st.sampled_from(
            [query, {**query, "startDate": "0000000000", "endDate": "9999999999"}]
        )
    return widened.flatmap(_with_program)
PY
export SCHEMATHESIS_HOOKS="$work/hooks.py"

seed_args=()
[[ -n "${SCHEMATHESIS_SEED:-}" ]] && seed_args=(--seed "$SCHEMATHESIS_SEED")

# One worker: with two, Hypothesis describing lambdas from two threads trips CPython
# 3.11's "AST constructor recursion depth mismatch" (a tool error, not a finding).
status=0
st run "$base/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
    --phases examples,coverage,fuzzing,stateful \
    --mode all \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --workers 1 \
    --request-timeout 10 \
    --suppress-health-check all \
    --continue-on-failure \
    --generation-database none \
    --no-color \
    "${seed_args[@]}" 2>&1 | tee "$work/schemathesis.log" || status=$?

# The case count, from Schemathesis's summary ("Test cases: N generated, N passed, ...").
cases="$(grep -A1 '^Test cases:' "$work/schemathesis.log" | tail -n1 | sed 's/^ *//' || true)"
generated="$(grep -oE '^[0-9]+ generated' <<<"$cases" | grep -oE '^[0-9]+' || true)"
echo "schemathesis test cases: ${cases:-no case count found}"

if grep -qE 'panicked|backtrace' "$work/server.log"; then
    echo "the server log shows a panic:" >&2
    grep -nE -A5 'panicked|backtrace' "$work/server.log" >&2
    status=1
fi
if [[ -z "$generated" || "$generated" -lt "$MIN_CASES" ]]; then
    echo "only ${generated:-0} test cases ran; at least $MIN_CASES are required" >&2
    status=1
fi
if [[ "$status" -ne 0 ]]; then
    echo "schemathesis: FAILED" >&2
    exit "$status"
fi
echo "schemathesis: OK ($generated cases, 0 failures)"
