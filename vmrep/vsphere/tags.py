"""vSphere tags, read through the vAPI REST endpoint (`/rest/com/vmware/cis/...`).

Tags are not in the SOAP API; they carry roles vSphere cannot see (a domain controller).
All VMs' tags come back in one `list-attached-tags-on-objects` call, plus one call per
distinct tag to learn its name.
"""

from __future__ import annotations

from typing import Any, Iterable

from vmrep.errors import TransientError
from vmrep.vsphere.connection import Client, http_session, http_verify


def tags_for(client: Client) -> "Tags":
    """The client's tag reader, kept with it so the REST session is logged in once."""
    if client.cache.tags is None:
        client.cache.tags = Tags(client)
    return client.cache.tags


class Tags:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.base = f"https://{client.host}:{client.port}/rest"
        self.http = http_session(client.site)
        self._names: dict[str, str] = {}

    def _login(self) -> None:
        r = self.http.post(f"{self.base}/com/vmware/cis/session", auth=(self.client.site.user, self.client._password),
                           verify=http_verify(self.client.site), timeout=self.client.site.timeout_seconds)
        if r.status_code != 200:
            raise TransientError(f"site {self.client.site.name}: vAPI login answered HTTP {r.status_code}")
        token = r.json().get("value")
        if token:
            self.http.headers["vmware-api-session-id"] = token

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        def go() -> Any:
            if "vmware-api-session-id" not in self.http.headers:
                self._login()
            r = self.http.request(method, f"{self.base}{path}", verify=http_verify(self.client.site),
                                  timeout=self.client.site.timeout_seconds, **kw)
            if r.status_code == 401:
                self.http.headers.pop("vmware-api-session-id", None)
                raise TransientError(f"site {self.client.site.name}: vAPI session expired")
            if r.status_code in (502, 503, 504):
                raise TransientError(f"site {self.client.site.name}: vAPI HTTP {r.status_code}")
            r.raise_for_status()
            return r.json().get("value") if r.content else None

        return self.client.call(path, go, method_name=f"vAPI {path.rsplit('/', 1)[-1]}")

    def tag_name(self, tag_id: str) -> str:
        if tag_id not in self._names:
            self._names[tag_id] = self._call("GET", f"/com/vmware/cis/tagging/tag/id:{tag_id}")["name"]
        return self._names[tag_id]

    def of_vms(self, vm_refs: Iterable[Any]) -> dict[str, set[str]]:
        """VM moid -> names of its tags."""
        ids = [{"type": "VirtualMachine", "id": ref._moId} for ref in vm_refs]
        if not ids:
            return {}
        found = self._call("POST", "/com/vmware/cis/tagging/tag-association",
                           params={"~action": "list-attached-tags-on-objects"}, json={"object_ids": ids}) or []
        return {o["object_id"]["id"]: {self.tag_name(t) for t in (o.get("tag_ids") or [])} for o in found}

    # -- writing (the lab and the tests mark VMs this way) ------------------------------

    def ensure_tag(self, category: str, name: str) -> str:
        cats = self._call("GET", "/com/vmware/cis/tagging/category") or []
        cat_id = next((c for c in cats if self._call("GET", f"/com/vmware/cis/tagging/category/id:{c}")["name"]
                       == category), None)
        if cat_id is None:
            cat_id = self._call("POST", "/com/vmware/cis/tagging/category", json={"create_spec": {
                "name": category, "description": "", "cardinality": "MULTIPLE", "associable_types": []}})
        for t in self._call("GET", "/com/vmware/cis/tagging/tag") or []:
            if self.tag_name(t) == name:
                return t
        return self._call("POST", "/com/vmware/cis/tagging/tag", json={"create_spec": {
            "name": name, "description": "", "category_id": cat_id}})

    def attach(self, tag_id: str, vm_ref: Any) -> None:
        self._call("POST", f"/com/vmware/cis/tagging/tag-association/id:{tag_id}", params={"~action": "attach"},
                   json={"object_id": {"type": "VirtualMachine", "id": vm_ref._moId}})
