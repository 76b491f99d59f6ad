"""Benchmark: what authenticating one request costs, by credential kind, in one run.

    python bench/bench_auth.py                 # 7 interleaved rounds, medians
    python bench/bench_auth.py --rounds 11 --tokens 2000

Times `gateway.auth.authenticate.authenticate()` in process (no HTTP, no
network: the issuer's JWKS is loaded into the verifier directly) for:

- API key, cached: the key's secret already verified by this process
  (`VerifiedKeys` hit): a dict lookup and the per-request checks. The baseline.
- API key, cached, with issuers configured: the same, plus the look at the
  token that sends JWTs elsewhere.
- API key, first time: parse, SHA-256 over salt and key, checks (the
  foundation's check, before keys were cached).
- JWT, cached: a token verified before (`TokenVerifier` hit): dict lookup,
  expiry, tenant and scope.
- JWT, first time (RS256 2048-bit, and ES256 P-256): header and claims
  decoded, signature verified (PyJWT over OpenSSL), claims checked, principal
  built. Every call presents a token never seen before.

Each figure is ns per call (median over rounds, and the best round), and its
ratio to the cached API key. Compare figures from the same run; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import uuid

import cryptography
import jwt
from cryptography.hazmat.backends.openssl.backend import backend as openssl
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth.authenticate import VerifiedKeys, authenticate
from gateway.auth.keys import mint_key
from gateway.auth.oidc import TokenVerifier
from gateway.config import AuthConfig, IssuerConfig
from gateway.snapshot import KeyEntry, Snapshot, TenantEntry

ISSUER = "https://issuer.bench.test"
RESOURCE = "https://gateway.bench.test"
TENANT = uuid.uuid4()


def _snapshot(keys: int) -> tuple[Snapshot, list[str]]:
    entries, plaintexts = {}, []
    for _ in range(keys):
        minted = mint_key()
        plaintexts.append(minted.plaintext)
        entries[minted.prefix] = KeyEntry(
            id=uuid.uuid4(), prefix=minted.prefix, key_hash=minted.key_hash, salt=minted.salt, tenant_id=TENANT,
            user_id=uuid.uuid4(), role="USER", scopes=frozenset({"proxy"}), rate_limit_per_hour=1000,
            rate_limit_per_day=10000, expires_at=None, key_active=True, user_active=True,
        )
    tenants = {TENANT: TenantEntry(id=TENANT, name="bench", status="active", is_platform=False)}
    return Snapshot(version=1, tenants=tenants, keys_by_prefix=entries, servers={}), plaintexts


def _verifier() -> tuple[TokenVerifier, dict]:
    verifier = TokenVerifier(AuthConfig(
        resource_uri=RESOURCE, issuers=[IssuerConfig(issuer=ISSUER, tenant_map={"t": "bench"})]
    ))
    signers = {
        "RS256": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa-1"),
        "ES256": (ec.generate_private_key(ec.SECP256R1()), "ec-1"),
    }
    jwks = {"keys": []}
    for alg, (key, kid) in signers.items():
        jwk = jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key(), as_dict=True)
        jwks["keys"].append({**jwk, "kid": kid, "use": "sig"})
    verifier.issuers[ISSUER].load(jwks)
    return verifier, signers


def _tokens(signers: dict, alg: str, count: int) -> list[str]:
    key, kid = signers[alg]
    now = int(time.time())
    return [
        jwt.encode(
            {"iss": ISSUER, "sub": f"user-{i}", "aud": RESOURCE, "iat": now, "nbf": now, "exp": now + 3600,
             "tenant": "t", "roles": ["USER"]},
            key, algorithm=alg, headers={"kid": kid},
        )
        for i in range(count)
    ]


def _pass(run, headers: list[str]) -> float:
    """ns per call of `run(header)` over one pass through `headers`."""
    started = time.perf_counter_ns()
    for header in headers:
        run(header)
    return (time.perf_counter_ns() - started) / len(headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--keys", type=int, default=2000, help="API keys in the snapshot, and cached tokens")
    parser.add_argument("--tokens", type=int, default=1000, help="distinct JWTs per first-time pass")
    args = parser.parse_args()

    snapshot, plaintexts = _snapshot(args.keys)
    key_headers = [f"Bearer {p}" for p in plaintexts]
    verifier, signers = _verifier()
    verified = VerifiedKeys()
    for header in key_headers:  # every key verified once: later passes are cache hits
        authenticate(snapshot, header, "proxy", verified=verified)
    cached_tokens = [f"Bearer {t}" for t in _tokens(signers, "RS256", args.keys)]
    for header in cached_tokens:
        authenticate(snapshot, header, "proxy", tokens=verifier)
    fresh = {alg: [_tokens(signers, alg, args.tokens) for _ in range(args.rounds)] for alg in ("RS256", "ES256")}

    def first_time(alg: str, round_: int):
        def run() -> float:
            headers = [f"Bearer {t}" for t in fresh[alg][round_]]  # never presented before
            return _pass(lambda h: authenticate(snapshot, h, "proxy", tokens=verifier), headers)
        return run

    cases = {
        "API key, cached": lambda r: _pass(
            lambda h: authenticate(snapshot, h, "proxy", verified=verified), key_headers),
        "API key, cached, issuers configured": lambda r: _pass(
            lambda h: authenticate(snapshot, h, "proxy", verified=verified, tokens=verifier), key_headers),
        "API key, first time (SHA-256)": lambda r: _pass(
            lambda h: authenticate(snapshot, h, "proxy"), key_headers),
        "JWT, cached": lambda r: _pass(
            lambda h: authenticate(snapshot, h, "proxy", tokens=verifier), cached_tokens),
        "JWT, first time (RS256, 2048-bit)": lambda r: first_time("RS256", r)(),
        "JWT, first time (ES256, P-256)": lambda r: first_time("ES256", r)(),
    }
    # Interleaved: each round runs every case once, so a busy moment of the
    # machine touches all of them alike; medians are reported.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        for name, case in cases.items():
            samples[name].append(case(round_))
    results = {name: statistics.median(values) for name, values in samples.items()}
    best = {name: min(values) for name, values in samples.items()}

    base = results["API key, cached"]
    width = max(len(name) for name in results)
    print(f"{'credential':<{width}}  {'ns/call':>9}  {'best':>9}  {'x cached key':>12}")
    for name, ns in results.items():
        print(f"{name:<{width}}  {ns:>9.0f}  {best[name]:>9.0f}  {ns / base:>11.1f}x")
    print()
    print("conditions:")
    print(f"  cpu: {_cpu()} ({os.cpu_count()} logical); load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} (other work on the machine inflates every figure)")
    print(f"  python {platform.python_version()} ({sys.implementation.name}), PyJWT {jwt.__version__}, "
          f"cryptography {cryptography.__version__}, {openssl.openssl_version_text()}")
    print(f"  {args.keys} API keys in the snapshot (and {args.keys} cached tokens), {args.tokens} unseen tokens "
          f"per first-time pass, {args.rounds} interleaved rounds; in process, one thread, no network")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
