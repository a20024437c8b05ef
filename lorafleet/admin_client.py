"""A typed client for a running gateway's admin API, and how the command line finds that gateway.

Every command that changes what a running gateway serves (publish, promote,
retire, policies, tenants, keys, grants, limits) goes through this client when
a gateway is running over the same data directory, so the gateway applies the
change at once (loads the adapter, drops its caches) instead of finding it
later. The gateway says where it listens in ``<data_dir>/gateway.json`` while
it runs; ``--gateway`` / ``LORAFLEET_GATEWAY_URL`` names one explicitly.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from contract.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from contract.settings import CommonSettings
from contract.store import OPTIONAL_FILES
from serving.config import GATEWAY_FILE  # written by the gateway while it runs: {"url", "pid"}


class AdminError(RuntimeError):
    """The admin API refused a call or could not be reached; the message is the gateway's own."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def running_gateway(settings: CommonSettings) -> str | None:
    """The URL of the gateway that serves ``settings.data_dir``, if one is running and answers."""
    explicit = os.environ.get("LORAFLEET_GATEWAY_URL")
    if explicit:
        return explicit.rstrip("/")
    try:
        info = json.loads((settings.data_dir / GATEWAY_FILE).read_text("utf-8"))
        url, pid, instance = str(info["url"]), int(info["pid"]), str(info["instance"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        health = httpx.get(f"{url}/healthz", timeout=2.0)
        answered = health.json().get("instance") if health.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    # Another gateway on that port (or an app not listening where its settings say) is not this data dir's.
    return url if answered == instance else None


def admin_key_of(settings: CommonSettings, given: str | None = None) -> str | None:
    """``--admin-key``, else ``LORAFLEET_ADMIN_KEY``, else the demo's ``<data_dir>/admin.key``."""
    key = given or os.environ.get("LORAFLEET_ADMIN_KEY")
    key_file = settings.data_dir / "admin.key"
    if not key and key_file.is_file():
        key = key_file.read_text().strip()
    return key or None


@dataclass
class AdminClient:
    url: str
    key: str | None
    timeout: float = 120.0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        """One call; an error response raises ``AdminError`` with the gateway's message."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if method == "POST" and body is None and "content" not in kw:
            body = {}  # every admin POST carries a JSON body
        try:
            resp = httpx.request(
                method,
                f"{self.url}{path}",
                json=body,
                headers=headers | kw.pop("headers", {}),
                timeout=self.timeout,
                **kw,
            )
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the gateway at {self.url}: {exc} (is `lorafleet serve` running?)") from exc
        if resp.status_code >= 400:
            try:
                error = resp.json()["error"]
                message, code = error["message"], error.get("code")
            except (ValueError, KeyError, TypeError):
                message, code = resp.text[:300], None
            raise AdminError(f"{resp.status_code}: {message}", resp.status_code, code)
        return resp.json() if resp.content else None

    # -- adapters ----------------------------------------------------------------------------------

    def publish(self, source: Path, alias: str) -> dict[str, Any]:
        """Upload the adapter directory as a tar archive (only the adapter's own files travel)."""
        return self.call(
            "POST",
            f"/admin/adapters/{alias}/versions",
            content=adapter_archive(source),
            headers={"Content-Type": "application/x-tar"},
        )

    def promote(self, alias: str, version: int, *, force: bool = False, reason: str = "") -> dict[str, Any]:
        body = {"version": version, "force": force, "reason": reason}
        result: dict[str, Any] = self.call("POST", f"/admin/adapters/{alias}/promote", body)
        return result

    def retire(self, alias: str, version: int, *, reason: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "DELETE", f"/admin/adapters/{alias}/versions/{version}", params={"reason": reason}
        )
        return result

    def policy(self, alias: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/admin/aliases/{alias}/policy")
        return result

    def set_policy(self, alias: str, json_mode: str | None, default_schema: dict[str, Any] | None) -> dict[str, Any]:
        body = {"json_mode": json_mode, "default_schema": default_schema}
        result: dict[str, Any] = self.call("PUT", f"/admin/aliases/{alias}/policy", body)
        return result

    # -- tenants -----------------------------------------------------------------------------------

    def tenant(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/admin/tenants/{name}")
        return result

    def create_tenant(self, name: str, aliases: list[str], limits: dict[str, int | None]) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", "/admin/tenants", {"name": name, "aliases": aliases, "limits": limits}
        )
        return result

    def patch_tenant(self, name: str, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.call("PATCH", f"/admin/tenants/{name}", changes)
        return result

    def grant(self, name: str, alias: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("PUT", f"/admin/tenants/{name}/grants/{alias}")
        return result

    def revoke_grant(self, name: str, alias: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("DELETE", f"/admin/tenants/{name}/grants/{alias}")
        return result

    def issue_key(self, name: str, *, rotate: bool = False) -> str:
        result = self.call("POST", f"/admin/tenants/{name}/keys", params={"rotate": str(rotate).lower()})
        return str(result["api_key"])

    def revoke_key(self, name: str, key_id: str) -> None:
        self.call("DELETE", f"/admin/tenants/{name}/keys/{key_id}")


def adapter_archive(source: Path) -> bytes:
    """The adapter directory's files as an uncompressed tar (safetensors do not compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in (WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE, *OPTIONAL_FILES):
            path = Path(source) / name
            if path.is_file():
                tar.add(path, arcname=name)
    return buffer.getvalue()
