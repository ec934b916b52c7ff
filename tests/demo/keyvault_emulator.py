"""A small Azure Key Vault emulator for `cargo xtask demo`: HTTPS, challenge-based auth, per-secret access policy.

    keyvault_emulator.py --listen IP:PORT --dir DIR --policy access-policy.json --secrets secrets.json

Startup: makes a throwaway CA and a server certificate whose only SAN is the listen IP (the vault URL is an IP,
there is no DNS in the demo), writes the CA to DIR/ca.pem for clients to trust, then prints `ready` on stdout.

Requests, as the Key Vault data plane answers them (only what the secrets client's `get_secret` needs):
- no `Authorization` header: 401 with the challenge the SDK's ChallengeAuthPolicy parses
  (`WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"`);
- a bearer token whose `aud` is not https://vault.azure.net, or that has expired: 401 (AKV10022 / AKV10032);
- `GET /secrets/{name}[/{version}]?api-version=...`: 200 with the secret bundle if the token's `appid` (the calling
  identity's client id; the IMDS emulator puts it in `appid` and `oid`) is listed for that secret in the access
  policy, else 403 `Forbidden` in Key Vault's error shape; an unknown secret is 404 `SecretNotFound`.

Tokens are not signature-checked: the IMDS emulator issues unsigned JWTs. What this vault trusts is what the
agent asked IMDS for, which is the point of the demo. One JSON line per decision goes to stderr.
"""

import argparse
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# From azure-identity's own requirements (it depends on `cryptography` directly), so the venv that holds the
# SDK clients always has it; no host tool and no extra requirement needed.
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AUDIENCE = "https://vault.azure.net"
TENANT = "00000000-0000-0000-0000-0000000000e0"  # the IMDS emulator's `tid`
VERSION_RE = re.compile(r"^/secrets/([0-9A-Za-z-]{1,127})(?:/([0-9a-f]{32}))?/?$")


def make_certs(ip: str, directory: str) -> tuple:
    """CA + server certificate for `ip`; returns (cert path, key path) and writes `ca.pem` for clients."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nmi-agent demo CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.open(paths["server.key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths["server.pem"], paths["server.key"]


def jwt_claims(token: str) -> dict:
    """The claims of an (unverified) JWT; {} when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


class Vault:
    def __init__(self, policy: dict, secrets: dict):
        # secret name -> allowed client ids (lower case); `_`-prefixed keys are comments.
        self.policy = {
            name: {cid.lower() for cid in ids} for name, ids in policy.items() if not name.startswith("_")
        }
        self.secrets = {name: value for name, value in secrets.items() if not name.startswith("_")}
        self.created = int(time.time())

    def version_of(self, name: str) -> str:
        return hashlib.sha256(f"{name}:{self.secrets[name]}".encode()).hexdigest()[:32]


class Handler(BaseHTTPRequestHandler):
    server_version = "nmi-demo-keyvault/1"
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes; with Nagle on, the body waits for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    vault: Vault

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass  # decisions are logged as JSON by `decide`

    def do_GET(self):
        url = urlsplit(self.path)
        match = VERSION_RE.match(url.path)
        if not match:
            return self.error(404, "NotFound", "Only GET /secrets/{name}[/{version}] is emulated.", "bad_path")
        if "api-version" not in parse_qs(url.query):
            return self.error(400, "BadParameter", "The 'api-version' query parameter is missing.", "no_api_version")
        name = match.group(1)

        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            # The SDK's first request carries no token on purpose: the vault's challenge tells it which tenant and
            # which resource to ask for.
            return self.error(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                "challenge", secret=name,
                headers={
                    "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                    f'resource="{AUDIENCE}"'
                },
            )
        claims = jwt_claims(auth[len("Bearer "):].strip())
        caller = str(claims.get("appid") or claims.get("oid") or "").lower()
        if claims.get("aud") != AUDIENCE:
            return self.error(
                401, "Unauthorized", f"AKV10022: Invalid audience. Expected {AUDIENCE}, found: {claims.get('aud')}.",
                "wrong_audience", caller=caller, secret=name,
            )
        if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
            return self.error(401, "Unauthorized", "AKV10032: Invalid issuer or expired token.", "expired",
                              caller=caller, secret=name)
        if name not in self.vault.secrets:
            return self.error(404, "SecretNotFound",
                              f"A secret with (name/id) {name} was not found in this key vault.", "not_found",
                              caller=caller, secret=name)
        if caller not in self.vault.policy.get(name, set()):
            return self.error(
                403,
                "Forbidden",
                f"The user, group or application 'appid={caller};oid={claims.get('oid')};iss={claims.get('iss')}' "
                f"does not have secrets get permission on secret '{name}' of key vault '{self.headers.get('Host')}'.",
                "not_in_policy",
                caller=caller,
                secret=name,
                inner="AccessDenied",
            )
        version = self.vault.version_of(name)
        if match.group(2) and match.group(2) != version:
            return self.error(404, "SecretNotFound", f"Version {match.group(2)} of secret {name} not found.",
                              "no_such_version", caller=caller, secret=name)
        self.decide(200, "allowed", caller=caller, secret=name)
        self.send_json(
            200,
            {
                "value": self.vault.secrets[name],
                "id": f"https://{self.headers.get('Host')}/secrets/{name}/{version}",
                "attributes": {
                    "enabled": True,
                    "created": self.vault.created,
                    "updated": self.vault.created,
                    "recoveryLevel": "Recoverable+Purgeable",
                    "recoverableDays": 90,
                },
                "tags": {},
            },
        )

    def error(self, status, code, message, why, headers=None, caller="", secret="", inner=None):
        self.decide(status, why, caller=caller, secret=secret)
        body = {"error": {"code": code, "message": message}}
        if inner:
            body["error"]["innererror"] = {"code": inner}
        self.send_json(status, body, headers)

    def decide(self, status, why, caller="", secret=""):
        line = {"target": "keyvault", "status": status, "decision": why, "caller": caller, "secret": secret}
        print(json.dumps(line), file=sys.stderr, flush=True)

    def send_json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-keyvault-service-version", "1.9.0.0")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="IP:PORT")
    parser.add_argument("--dir", required=True, help="where the CA and server certificate are written")
    parser.add_argument("--policy", required=True, help="JSON: secret name -> allowed client ids")
    parser.add_argument("--secrets", required=True, help="JSON: secret name -> value")
    args = parser.parse_args()
    ip, _, port = args.listen.rpartition(":")

    with open(args.policy) as f:
        policy = json.load(f)
    with open(args.secrets) as f:
        secrets = json.load(f)
    Handler.vault = Vault(policy, secrets)

    cert, key = make_certs(ip, args.dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer((ip, int(port)), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
