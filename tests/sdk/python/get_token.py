"""Gets one token the way an unmodified application in a pod does, and prints what it got.

Run inside a pod network namespace by podid's tests:
    python get_token.py --credential mi|dac [--client-id ID] [--resource-id ID] [--object-id ID]
                        [--scope SCOPE] [--async]

Prints one JSON line: {"ok": true, "expires_on": ..., "claims": {...}, "sha256": ...} or
{"ok": false, "error": <exception class>, "message": ..., "seconds": ...}. The token itself is
never printed: tests compare its SHA-256 and its claims.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import time


def claims_of(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


def credential(args, aio):
    if aio:
        from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential
    else:
        from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
    if args.credential == "dac":
        return DefaultAzureCredential()
    kwargs = {}
    if args.client_id:
        kwargs["client_id"] = args.client_id
    if args.resource_id:
        kwargs["identity_config"] = {"resource_id": args.resource_id}
    if args.object_id:
        kwargs["identity_config"] = {"object_id": args.object_id}
    return ManagedIdentityCredential(**kwargs)


async def get_async(args):
    async with credential(args, aio=True) as cred:
        return await cred.get_token(args.scope)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--credential", choices=["mi", "dac"], required=True)
    parser.add_argument("--client-id")
    parser.add_argument("--resource-id")
    parser.add_argument("--object-id")
    parser.add_argument("--scope", default="https://management.azure.com/.default")
    parser.add_argument("--async", dest="aio", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        if args.aio:
            token = asyncio.run(get_async(args))
        else:
            token = credential(args, aio=False).get_token(args.scope)
    except Exception as e:  # the test asserts on the class and message
        print(json.dumps({
            "ok": False,
            "error": type(e).__name__,
            "message": str(e)[:2000],
            "seconds": time.monotonic() - started,
        }))
        return 1
    print(json.dumps({
        "ok": True,
        "expires_on": token.expires_on,
        "claims": claims_of(token.token),
        "sha256": hashlib.sha256(token.token.encode()).hexdigest(),
        "seconds": time.monotonic() - started,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
