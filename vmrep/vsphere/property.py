"""Bulk reads through the PropertyCollector: one round trip for N objects.

Unset properties are simply absent from the result (reading them lazily through
pyvmomi would cost a round trip each and panics the 0.24.2 simulator). Continuation
tokens are followed, as a real vCenter pages large results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pyVmomi import vim, vmodl

from vmrep.vsphere.connection import Client


@dataclass
class Obj:
    """One object's properties as read: `props` holds only what is set."""

    ref: Any
    props: dict[str, Any]

    def get(self, path: str, default: Any = None) -> Any:
        return self.props.get(path, default)

    @property
    def name(self) -> str:
        return self.props.get("name", self.ref._moId)


def _spec_for_view(view: Any, obj_type: type, paths: Sequence[str]) -> vmodl.query.PropertyCollector.FilterSpec:
    traverse = vmodl.query.PropertyCollector.TraversalSpec(
        name="view", path="view", skip=False, type=vim.view.ContainerView
    )
    obj_spec = vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traverse])
    prop_spec = vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=list(paths), all=False)
    return vmodl.query.PropertyCollector.FilterSpec(objectSet=[obj_spec], propSet=[prop_spec])


def _spec_for_objects(objs: Iterable[Any], obj_type: type, paths: Sequence[str]) -> vmodl.query.PropertyCollector.FilterSpec:
    obj_specs = [vmodl.query.PropertyCollector.ObjectSpec(obj=o, skip=False) for o in objs]
    prop_spec = vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=list(paths), all=False)
    return vmodl.query.PropertyCollector.FilterSpec(objectSet=obj_specs, propSet=[prop_spec])


def _collect(client: Client, spec: Any, what: str) -> list[Obj]:
    pc = client.content.propertyCollector
    options = vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=1000)
    result = client.call(what, pc.RetrievePropertiesEx, [spec], options, name="RetrievePropertiesEx")
    out: list[Obj] = []
    while result is not None:
        for oc in result.objects or []:
            out.append(Obj(ref=oc.obj, props={p.name: p.val for p in (oc.propSet or [])}))
        token = getattr(result, "token", None)
        if not token:
            break
        result = client.call(what, pc.ContinueRetrievePropertiesEx, token, name="ContinueRetrievePropertiesEx")
    return out


def retrieve(
    client: Client,
    obj_type: type,
    paths: Sequence[str],
    *,
    container: Any = None,
    objects: Iterable[Any] | None = None,
) -> list[Obj]:
    """Read `paths` of every `obj_type` below `container` (default: root folder), or of the given objects."""
    what = f"{obj_type.__name__.rsplit('.', 1)[-1]} inventory"
    if objects is not None:
        objs = list(objects)
        if not objs:
            return []
        return _collect(client, _spec_for_objects(objs, obj_type, paths), what)
    vm = client.content.viewManager
    root = container or client.content.rootFolder
    view = client.call(what, vm.CreateContainerView, root, [obj_type], True, name="CreateContainerView")
    try:
        return _collect(client, _spec_for_view(view, obj_type, paths), what)
    finally:
        try:
            client.call(what, view.DestroyView, name="DestroyView")
        except Exception:  # noqa: BLE001 - a leaked view is harmless, a failed read is not
            pass


def retrieve_one(client: Client, obj: Any, paths: Sequence[str]) -> Obj:
    found = retrieve(client, type(obj), paths, objects=[obj])
    return found[0] if found else Obj(ref=obj, props={})
