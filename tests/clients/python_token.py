"""An unchanged Azure SDK caller: ManagedIdentityCredential() with no arguments and no environment variables.

Prints one JSON line: {"ok": true, "token": ..., "expires_on": ...} or {"ok": false, "error": <exception class>,
"message": ...}. An optional argv[1] is a client id, passed as ManagedIdentityCredential(client_id=...), to ask for a
specific identity as a workload with several would.
"""
import json
import sys
import time

from azure.identity import CredentialUnavailableError, ManagedIdentityCredential

SCOPE = "https://vault.azure.net/.default"


def main() -> int:
    kwargs = {"client_id": sys.argv[1]} if len(sys.argv) > 1 and sys.argv[1] else {}
    started = time.monotonic()
    try:
        token = ManagedIdentityCredential(**kwargs).get_token(SCOPE)
    except CredentialUnavailableError as e:
        out = {"ok": False, "error": "CredentialUnavailableError", "message": str(e)}
    except Exception as e:  # the test asserts on the class name
        out = {"ok": False, "error": type(e).__name__, "message": str(e)}
    else:
        out = {"ok": True, "token": token.token, "expires_on": token.expires_on}
    out["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
