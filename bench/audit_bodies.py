"""Benchmark: what preparing an audit entry costs for calls shaped like real MCP traffic, and which the screen walks.

    python bench/audit_bodies.py                     # this tree
    python bench/audit_bodies.py --against 528f7dd   # and the tree of that commit, in the same run
    python bench/audit_bodies.py --repeat 15 --per-call 100

The proxy and records benchmarks send one body, a tools/call whose text is a
single run of x's: the audit screen's best case. Real calls carry paths, web
addresses, prose in any language, newlines, ids, and words such as "token" or
"password" in a sentence. The screen (`_fast/screen`) decides whether a body
can skip the sanitizer's walk, and `plain_details` whether its details are
written from the raw text; each call it cannot rule out costs several times
more. This runs `AuditTrail.prepare` (screen, details, finished row, the
`gateway.audit` line to /dev/null) in one process over CALLS, a catalogue of
calls modelled on common MCP servers' tools (file system, git and GitHub,
search, fetch, SQL, chat, memory, a resource read through the gateway, a
coding agent writing a source file and a page of docs past the sanitizer's
1,024-character bound, ...),
`--per-call` entries of each in one batch, best of `--repeat` batches, and
prints per call: its size, whether the screen passes it, and µs per entry;
then the mean over the catalogue. CPU time of one process: compare figures
from the same run (`--against REV` builds that commit's tree, as
records_cost.py does, and runs it in a child process right after this one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records_cost import RESOURCE_URI, build_tree, this_tree  # noqa: E402 - bench/, this script's directory

def _call(name: str, arguments: dict, request_id: int = 1) -> tuple[str, str, bytes]:
    message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
               "params": {"name": name, "arguments": arguments}}
    return "tools/call", name, json.dumps(message, ensure_ascii=False).encode()  # UTF-8, as the SDKs send it


# What a coding agent writes: a source file and a page of docs, each past the sanitizer's 1,024-character bound
# (so the screen gives up and the walk cuts them), naming tokens, keys and passwords as such code and docs do.
SOURCE = "".join(f'''
def refresh_access_token_{i}(session, client_id, scopes):
    """Exchange the session's refresh token for a new access token; retry once when the server says 401."""
    refresh = session.get("refresh_token")
    if not refresh:
        raise AuthError("no refresh token in the session: sign in again")
    for attempt in range(2):
        response = http.post(TOKEN_URL, data={{"grant_type": "refresh_token", "client_id": client_id}})
        if response.status != 401:
            break
    session["access_token"] = response.json()["access_token"]  # the api_key stays in the keyring
    return session
''' for i in range(6))
DOCS = "".join(f"""
## Step {i}: configure the client

Create an API key in the console, then store it where the client can read it: the `API_KEY` environment
variable or the keyring. Never paste the key or your password into a chat, a ticket or a commit message; if
one leaks, revoke it at once and create another. Tokens expire after an hour; the client refreshes them with
the refresh token it keeps, so a long-running job needs no new sign-in.
""" for i in range(1, 7))

# label -> (method, target, body): what a client sends; the answers are not part of an entry.
CALLS = {
    "read_file": _call("read_file", {"path": "/home/alice/projects/api/src/server.py"}),
    "write_file": _call("write_file", {"path": "/tmp/notes.md",
                                       "content": "# Notes\n\n- fix the login flow\n- deploy on Monday\n"}),
    "create_issue": _call("create_issue", {"owner": "acme", "repo": "webapp", "title": "Login fails on Safari",
                                           "body": "Steps: open /login, submit. Expected: a redirect. Got: 500."}),
    "get_pull_request": _call("get_pull_request", {"owner": "acme", "repo": "webapp", "pull_number": 4521}),
    "get_commit": _call("get_commit", {"owner": "acme", "repo": "webapp",
                                       "sha": "9fceb02d0ae598e95dc970b74767f19372d61af8"}),
    "git_commit": _call("git_commit", {"repo_path": "/srv/repo",
                                       "message": "Fix token refresh race in session middleware"}),
    "web_search": _call("brave_web_search", {"query": "python asyncio cancel task gracefully", "count": 10}),
    "fetch": _call("fetch", {"url": "https://docs.example.com/guide/install?lang=en&page=2", "max_length": 5000}),
    "query": _call("query", {"sql": "SELECT id, email FROM users WHERE created_at > now() - interval '7 days'"}),
    "post_message": _call("slack_post_message", {"channel_id": "C01ABCDEF23", "text": "Deploy finished :rocket:"}),
    "create_entities": _call("create_entities", {"entities": [
        {"name": "Alice", "entityType": "person", "observations": ["works at Acme", "likes tea"]}]}),
    "sequential_thinking": _call("sequentialthinking", {"thought": "First, list the constraints.",
                                                        "thoughtNumber": 1, "totalThoughts": 5,
                                                        "nextThoughtNeeded": True}),
    "get_current_time": _call("get_current_time", {"timezone": "Europe/Paris"}),
    "generate": _call("generate", {"prompt": "Summarize the meeting notes.", "max_tokens": 500,
                                   "temperature": 0.7}),
    "click": _call("puppeteer_click", {"selector": "#submit-button"}),
    "geocode": _call("maps_geocode", {"address": "1600 Amphitheatre Parkway, Mountain View, CA"}),
    "jira_create": _call("jira_create", {"project_key": "OPS", "summary": "Rotate the database password",
                                         "issue_type": "Task"}),
    "kubectl_get": _call("kubectl_get", {"resource": "pods", "namespace": "payments", "label_selector": "app=api"}),
    "get_order": _call("get_order", {"order_id": "6f1d0c2e-9a4b-4c1e-8f00-1a2b3c4d5e6f"}),
    "send_email": _call("send_email", {"to": "bob@example.com", "subject": "Hello", "body": "See you at 10:00."}),
    "ask_french": _call("ask", {"question": "Quelle est la m\u00e9t\u00e9o \u00e0 Paris demain\u00a0?"}),
    "ask_japanese": _call("ask", {"question": "\u660e\u65e5\u306e\u6771\u4eac\u306e\u5929\u6c17\u306f\uff1f"}),
    "resources_read": ("resources/read", RESOURCE_URI, json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "resources/read", "params": {"uri": RESOURCE_URI}}).encode()),
    "tools_list": ("tools/list", None, b'{"jsonrpc":"2.0","id":3,"method":"tools/list"}'),
    "write_source": _call("write_file", {"path": "/srv/app/auth/refresh.py", "content": SOURCE}),
    "write_docs": _call("write_file", {"path": "/srv/app/docs/setup.md", "content": DOCS}),
}


def measure(per_call: int, repeat: int) -> dict:
    """Per call label: [body bytes, screened plain?, µs per prepared entry]; this process's gateway."""
    import logging
    import time
    import timeit
    import uuid
    from datetime import datetime, timezone

    from gateway._fast.auditentry import mcp_row
    from gateway.dataplane.server import _RowIds
    from gateway.records.audit import AuditLogHandler, AuditTrail, McpDetails, audit_log
    from gateway.records.sanitize import DEFAULT

    audit_log.handlers[:] = [AuditLogHandler(open(os.devnull, "w"))]
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False

    class Key:
        tenant_id, user_id, id, role = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3), "USER"

    trail = AuditTrail()
    trail.new_id = _RowIds().next
    now = datetime.now(timezone.utc)
    figures = {}
    for label, (method, target, body) in CALLS.items():
        def batch(method=method, target=target, body=body):
            trail.prepare([mcp_row(McpDetails, Key, "srv", method, target, body, 200, None, None, 1.5, "192.0.2.1",
                                   now, False) for _ in range(per_call)])

        batch()  # caches, imports
        best = min(timeit.repeat(batch, number=1, repeat=repeat, timer=time.process_time))
        figures[label] = [len(body), DEFAULT.unchanged(body), best / per_call * 1e6]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="also measure the tree of this commit, in the same run")
    parser.add_argument("--per-call", type=int, default=200, help="entries of each call in a batch (default 200)")
    parser.add_argument("--repeat", type=int, default=9, help="batches of each call; the best counts (default 9)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("CHILD " + json.dumps(measure(args.per_call, args.repeat)))
        return
    trees: dict[str, dict] = {"this tree": measure(args.per_call, args.repeat)}
    if args.against:
        with tempfile.TemporaryDirectory() as work:
            print(f"building the tree of {args.against} ...", file=sys.stderr)
            src = build_tree(args.against, Path(work))
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--per-call",
                                   str(args.per_call), "--repeat", str(args.repeat)],
                                  env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the tree of {args.against} failed:\n{done.stderr[-3000:]}")
            trees[args.against] = json.loads(done.stdout.split("CHILD ", 1)[1])
    labels = list(trees)
    print(f"\n{'call':22s}{'bytes':>7s}" + "".join(f"{label:>22s}" for label in labels))
    for call in CALLS:
        size = trees[labels[0]][call][0]
        cells = "".join(f"{('plain' if t[call][1] else 'walked'):>10s} {t[call][2]:8.2f} us" for t in trees.values())
        print(f"{call:22s}{size:7d}{cells}")
    means = [sum(t[c][2] for c in CALLS) / len(CALLS) for t in trees.values()]
    walked = [sum(not t[c][1] for c in CALLS) for t in trees.values()]
    print(f"{'mean':22s}{'':7s}" + "".join(f"{w:>7d} walked {m:8.2f} us" for w, m in zip(walked, means))
          + (f"   ratio {means[0] / means[1]:.2f}x" if len(means) == 2 else ""))
    print(f"\nconditions: AuditTrail.prepare of {args.per_call} entries of each of {len(CALLS)} calls in a batch, "
          f"best of {args.repeat} batches, CPU time of one process (its log line to /dev/null); CPython "
          f"{sys.version.split()[0]}; {os.cpu_count()} CPUs; this tree: {this_tree()}")


if __name__ == "__main__":
    main()
