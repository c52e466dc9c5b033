"""A small, real OpenID Connect provider for tests: HTTP on 127.0.0.1, its own RSA key per run.

It serves discovery, a JWKS, ``/authorize`` (approves the configured test user at
once: redirects to the client's registered redirect URI with a code and the
state, and remembers the PKCE challenge) and ``/token`` (checks the code, the
client, the redirect URI and the PKCE verifier, then issues an RS256 ID token).
No medserve code is involved: medserve talks to it over HTTP as to a hospital's IdP.

    with OIDCProvider(clients={"medserve-console": Client(redirect_uri=..., secret=None)}) as idp:
        idp.user = {"sub": "dr-house", "roles": ["clinician"], "department": "radiology"}
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


@functools.lru_cache(maxsize=1)
def _run_key() -> rsa.RSAPrivateKey:
    """The provider's signing key: a new one each test run (generating one per test costs 0.5 s)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Client:
    redirect_uri: str
    secret: str | None = None  # None: a public client (PKCE only)


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    user: dict[str, Any]


@dataclass
class OIDCProvider:
    clients: dict[str, Client]
    user: dict[str, Any] = field(default_factory=lambda: {"sub": "staff-0001", "roles": ["clinician"]})
    # Claims merged into every ID token after the real ones (to issue a token for another audience, say).
    id_token_overrides: dict[str, Any] = field(default_factory=dict)
    # Issuer the discovery document names (None: the real one).
    advertised_issuer: str | None = None
    id_token_lifetime_s: int = 300
    # A key other than the published one to sign ID tokens with (a forged token).
    sign_with: Any = None

    def __post_init__(self) -> None:
        self.key = _run_key()
        self.kid = "test-idp-" + secrets.token_hex(4)
        self.grants: dict[str, _Grant] = {}
        self.challenges: list[str] = []  # every code_challenge /authorize received
        self.token_requests: list[dict[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        assert self._server is not None, "start the provider first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "OIDCProvider":
        provider = self

        class Handler(_Handler):
            idp = provider

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="test-oidc-provider", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- documents -----------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.advertised_issuer or self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        }

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    # --- the two endpoints ---------------------------------------------------------------

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        client = self.clients.get(query.get("client_id", ""))
        if client is None or query.get("redirect_uri") != client.redirect_uri:
            # Never redirect to an unregistered URI: answer the browser directly.
            return 400, {}, {"error": "invalid_request", "error_description": "unknown client or redirect_uri"}
        refuse = None
        if query.get("response_type") != "code":
            refuse = "unsupported_response_type"
        elif "openid" not in query.get("scope", "").split():
            refuse = "invalid_scope"
        elif query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            refuse = "invalid_request"
        back: dict[str, str] = {"state": query["state"]} if "state" in query else {}
        if refuse:
            return 302, {"Location": f"{client.redirect_uri}?{urlencode({'error': refuse, **back})}"}, None
        code = secrets.token_urlsafe(24)
        with self._lock:
            self.challenges.append(query["code_challenge"])
            self.grants[code] = _Grant(query["client_id"], query["redirect_uri"], query["code_challenge"],
                                       query.get("nonce"), dict(self.user))
        return 302, {"Location": f"{client.redirect_uri}?{urlencode({'code': code, **back})}"}, None

    def token(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        self.token_requests.append(dict(form))
        client_id = form.get("client_id")
        presented_secret = None
        if authorization and authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            client_id, presented_secret = unquote(user), unquote(password)
        client = self.clients.get(client_id or "")
        if client is None or (client.secret is not None and not hmac.compare_digest(
                (presented_secret or "").encode(), client.secret.encode())):
            return 401, {"error": "invalid_client", "error_description": f"client {client_id} failed to authenticate"}
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        with self._lock:
            grant = self.grants.pop(form.get("code", ""), None)  # a code works once
        if grant is None or grant.client_id != client_id or grant.redirect_uri != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant", "error_description": "unknown code, client or redirect_uri"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not hmac.compare_digest(challenge, grant.code_challenge):
            # The description names the user, as real providers' sometimes do: it must not reach the browser.
            return 400, {"error": "invalid_grant",
                         "error_description": f"PKCE verification failed for {grant.user.get('sub')}"}
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": client_id, "iat": now, "exp": now + self.id_token_lifetime_s,
                  **({"nonce": grant.nonce} if grant.nonce else {}), **grant.user, **self.id_token_overrides}
        claims = {k: v for k, v in claims.items() if v is not None}
        id_token = jwt.encode(claims, self.sign_with or self.key, algorithm="RS256", headers={"kid": self.kid})
        return 200, {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer", "expires_in": 300,
                     "id_token": id_token}


class _Handler(BaseHTTPRequestHandler):
    idp: OIDCProvider

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _send(self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path == "/.well-known/openid-configuration":
            self._send(200, self.idp.discovery())
        elif url.path == "/jwks":
            self._send(200, self.idp.jwks())
        elif url.path == "/authorize":
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            status, headers, body = self.idp.authorize(query)
            self._send(status, body, headers)
        else:
            self._send(404, {"error": "not_found"})

    def do_POST(self) -> None:  # noqa: N802
        if urlsplit(self.path).path != "/token":
            self._send(404, {"error": "not_found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        status, body = self.idp.token(form, self.headers.get("Authorization"))
        self._send(status, body)
