"""An unchanged Azure SDK workload: reads Key Vault secrets with ManagedIdentityCredential() and no configuration.

    python_keyvault.py VAULT_URL SECRET [SECRET...]

Prints one JSON line per secret, in order: {"secret": ..., "ok": true, "value": ..., "elapsed_ms": ...} or
{"secret": ..., "ok": false, "status": <HTTP status or null>, "error": <exception class>, "code": <Key Vault error
code or null>, "message": ..., "elapsed_ms": ...}. The first secret's time includes the token request (through
nmi-agent) and Key Vault's auth challenge; later ones reuse the client's cached token.

The vault's CA is trusted through the environment only (REQUESTS_CA_BUNDLE for the requests transport,
SSL_CERT_FILE for anything using Python's default context), as a pod would mount a CA bundle: nothing here is
demo-specific.
"""
import json
import sys
import time

from azure.core.exceptions import HttpResponseError
from azure.identity import CredentialUnavailableError, ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient


def read(client: SecretClient, name: str) -> dict:
    started = time.monotonic()
    try:
        secret = client.get_secret(name)
    except CredentialUnavailableError as e:
        out = {"ok": False, "status": None, "error": "CredentialUnavailableError", "code": None, "message": str(e)}
    except HttpResponseError as e:
        code = e.error.code if e.error is not None else None
        out = {"ok": False, "status": e.status_code, "error": type(e).__name__, "code": code, "message": e.message}
    except Exception as e:  # reported, not raised: the caller compares outcomes
        out = {"ok": False, "status": None, "error": type(e).__name__, "code": None, "message": str(e)}
    else:
        out = {"ok": True, "value": secret.value, "version": secret.properties.version}
    out["secret"] = name
    out["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
    return out


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    vault_url, names = sys.argv[1], sys.argv[2:]
    # verify_challenge_resource=False: by default the SDK checks that the resource named in the vault's 401
    # challenge (https://vault.azure.net) is a parent domain of the vault's host, so that a look-alike host cannot
    # obtain a Key Vault token. The demo's vault is addressed by IP (there is no DNS inside the test topology), which
    # can never match, so the check is turned off. Keep it on against a real vault (*.vault.azure.net).
    client = SecretClient(vault_url, ManagedIdentityCredential(), verify_challenge_resource=False)
    for name in names:
        print(json.dumps(read(client, name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
