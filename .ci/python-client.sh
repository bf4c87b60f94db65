#!/usr/bin/env bash
# A Python client generated from docs/openapi.json must come out whole and parse what the
# real server sends, errors included.
#
# Installs openapi-python-client from PyPI, generates a client with --fail-on-warning (a
# response it cannot model is a warning, and the client would silently drop it), and also
# fails if the generator's output mentions a warning at all. Then starts the release
# binary on a temporary copy of config.example.toml and drives it through the generated
# client: a failed login, a login, the profile, an issue and a refused issue, each parsed
# into the generated models (a problem+json body into `Problem`), and an OAuth2 token
# request and a refused one (an RFC 6749 error into `OAuthError`).
#
# Usage: .ci/python-client.sh           (from anywhere; needs cargo, python3 and pip)
# Env:   SKIP_INSTALL=1 to use the installed openapi-python-client.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    python3 -m pip install --quiet --disable-pip-version-check 'openapi-python-client>=0.26,<0.30'
fi
echo "openapi-python-client $(python3 -c 'import importlib.metadata as m; print(m.version("openapi-python-client"))')"

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

# The generator exits 0 after warnings unless told otherwise; its output is checked too,
# in case a later version reports some warnings without failing.
status=0
python3 -m openapi_python_client generate --path docs/openapi.json --meta none \
    --output-path "$work/cosmopoints_client" --fail-on-warning >"$work/generate.log" 2>&1 || status=$?
cat "$work/generate.log"
if [[ "$status" -ne 0 ]] || grep -qi 'warning' "$work/generate.log"; then
    echo "openapi-python-client: the document does not generate a clean client" >&2
    exit 1
fi

cargo build --release --quiet
sed -e 's|^listen = .*|listen = "127.0.0.1:0"|' \
    -e "s|^path = .*|path = \"$work/cosmopoints.redb\"|" \
    config.example.toml >"$work/config.toml"
"${CARGO_TARGET_DIR:-target}/release/cosmopoints" serve --config "$work/config.toml" >"$work/server.log" 2>&1 &
server_pid=$!
addr=""
for _ in $(seq 1 100); do
    addr="$(grep -oE 'listening on [0-9.]+:[0-9]+' "$work/server.log" | head -n1 | awk '{print $3}' || true)"
    [[ -n "$addr" ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "the server exited" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$addr" ]] || { cat "$work/server.log"; echo "no 'listening on' line in the log" >&2; exit 1; }

PYTHONPATH="$work" python3 - "http://$addr" <<'PY'
import sys

from cosmopoints_client import AuthenticatedClient, Client
from cosmopoints_client.api.authentication import authenticate, oauth_token
from cosmopoints_client.api.business import get_profile
from cosmopoints_client.api.transactions import issue_points
from cosmopoints_client.models import AuthRequest, IssueRequest, Problem, Profile, Token, Issued
from cosmopoints_client.models import OAuthError, OAuthToken, OAuthTokenRequest, OAuthTokenRequestGrantType

base = sys.argv[1]
anonymous = Client(base_url=base, raise_on_unexpected_status=True)


def problem(reply, status, kind):
    assert reply.status_code == status, (reply.status_code, reply.content)
    assert isinstance(reply.parsed, Problem), reply.parsed
    assert reply.parsed.type_ == f"urn:cosmopoints:problem:{kind}", reply.parsed.type_
    assert reply.parsed.status == status and reply.parsed.detail
    print(f"{status} parsed as Problem: {reply.parsed.detail}")


wrong = AuthRequest(client_id="demo-pos", client_secret="not-the-secret")
problem(authenticate.sync_detailed(client=anonymous, body=wrong), 401, "invalid-credentials")

right = AuthRequest(client_id="demo-pos", client_secret="cosmo-demo-secret")
token = authenticate.sync_detailed(client=anonymous, body=right).parsed
assert isinstance(token, Token), token
client = AuthenticatedClient(base_url=base, token=token.access_token, raise_on_unexpected_status=True)

profile = get_profile.sync_detailed(client=client).parsed
assert isinstance(profile, Profile), profile
print(f"profile parsed: {profile.to_dict()}")

body = IssueRequest(program_id="skywards", value=3673, user_id="EK123456", reference_number="py-1")
issued = issue_points.sync_detailed(client=client, body=body)
assert issued.status_code == 201 and isinstance(issued.parsed, Issued), issued.content
print(f"201 parsed as Issued: {issued.parsed.id}")

body = IssueRequest(program_id="nowhere", value=3673, user_id="EK123456", reference_number="py-2")
problem(issue_points.sync_detailed(client=client, body=body), 422, "unprocessable")

# OAuth 2.0 client credentials in the form; its errors parse into OAuthError (RFC 6749).
grant = OAuthTokenRequestGrantType.CLIENT_CREDENTIALS
oauth = oauth_token.sync_detailed(
    client=anonymous,
    body=OAuthTokenRequest(grant_type=grant, client_id="demo-pos", client_secret="cosmo-demo-secret"),
)
assert oauth.status_code == 200 and isinstance(oauth.parsed, OAuthToken), oauth.content
assert oauth.parsed.token_type == "Bearer"
print(f"200 parsed as OAuthToken, expires in {oauth.parsed.expires_in} s")
refused = oauth_token.sync_detailed(
    client=anonymous,
    body=OAuthTokenRequest(grant_type=grant, client_id="demo-pos", client_secret="wrong"),
)
assert refused.status_code == 401 and isinstance(refused.parsed, OAuthError), refused.content
assert refused.parsed.error == "invalid_client"
print(f"401 parsed as OAuthError: {refused.parsed.error_description}")

expired = AuthenticatedClient(base_url=base, token="not-a-token", raise_on_unexpected_status=True)
problem(get_profile.sync_detailed(client=expired), 401, "unauthenticated")
print("python client: OK")
PY
