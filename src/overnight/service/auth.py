"""API keys mapped to tenants: `[auth] keys_env` names an environment variable holding
"key1:tenant-a,key2:tenant-b". A tenant sees only its own files and batches."""

from __future__ import annotations

import hmac
import os

from ..errors import UsageError

# Without [auth], every request is this tenant's and no key is asked for.
OPEN_TENANT = "default"


def parse_keys(value: str, origin: str) -> dict[str, str]:
    """{key: tenant} from "key1:tenant-a,key2:tenant-b" (whitespace and newlines around
    entries, as a file read into the variable leaves them, are ignored)."""
    keys: dict[str, str] = {}
    for n, entry in enumerate(value.split(","), 1):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, tenant = entry.rpartition(":")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise UsageError(
                f"{origin}: entry {n} is not KEY:TENANT (the variable holds"
                ' "key1:tenant-a,key2:tenant-b")'
            )
        if key in keys and keys[key] != tenant:
            raise UsageError(f"{origin}: entry {n}: a key given to two tenants")
        keys[key] = tenant
    if not keys:
        raise UsageError(f'{origin}: no keys (it holds "key1:tenant-a,key2:tenant-b")')
    return keys


def keys_from_env(env_name: str, config_origin: str) -> dict[str, str]:
    origin = f"{config_origin}: [auth] keys_env: ${env_name}"
    value = os.environ.get(env_name)
    if value is None:
        raise UsageError(f"{origin} is not set")
    return parse_keys(value, origin)


def tenant_of(keys: dict[str, str], authorization: str | None) -> str | None:
    """The tenant of `Authorization: Bearer KEY`, or None (no header, another scheme, an
    unknown key). Keys are compared in constant time."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    found = None
    for known, tenant in keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            found = tenant
    return found
