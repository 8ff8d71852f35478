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


def _spec(view: Any, types: dict[type, Sequence[str]], objects: Sequence[tuple[Any, type, Sequence[str]]] = ()
          ) -> vmodl.query.PropertyCollector.FilterSpec:
    PC = vmodl.query.PropertyCollector
    obj_specs = []
    if view is not None:
        traverse = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        obj_specs.append(PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse]))
    prop_specs = [PC.PropertySpec(type=t, pathSet=list(p), all=False) for t, p in types.items()]
    for obj, t, paths in objects:
        obj_specs.append(PC.ObjectSpec(obj=obj, skip=False))
        if t not in types:
            prop_specs.append(PC.PropertySpec(type=t, pathSet=list(paths), all=False))
    return PC.FilterSpec(objectSet=obj_specs, propSet=prop_specs)


def _collect(client: Client, spec: Any, what: str) -> list[Obj]:
    pc = client.content.propertyCollector
    options = vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=1000)
    result = client.call(what, pc.RetrievePropertiesEx, [spec], options, method_name="RetrievePropertiesEx")
    out: list[Obj] = []
    while result is not None:
        for oc in result.objects or []:
            out.append(Obj(ref=oc.obj, props={p.name: p.val for p in (oc.propSet or [])}))
        token = getattr(result, "token", None)
        if not token:
            break
        result = client.call(what, pc.ContinueRetrievePropertiesEx, token,
                             method_name="ContinueRetrievePropertiesEx")
    return out


def _view(client: Client, types: Sequence[type], what: str) -> Any:
    """A container view over the whole inventory, kept for the session (created once, so a
    read costs one round trip, not three)."""
    views = client.cache.views
    key = tuple(sorted(t.__name__ for t in types))
    view = views.get(key)
    if view is None:
        vm = client.content.viewManager
        view = client.call(what, vm.CreateContainerView, client.content.rootFolder, list(types), True,
                           method_name="CreateContainerView")
        views[key] = view
    return view


def _view_gone(exc: BaseException) -> bool:
    """The kept view no longer exists (its session ended): `Client.call` raised the
    fault itself or a NotFound made from it."""
    return isinstance(exc, vmodl.fault.ManagedObjectNotFound) or isinstance(
        exc.__cause__, vmodl.fault.ManagedObjectNotFound)


def retrieve_types(client: Client, types: dict[type, Sequence[str]],
                   objects: Sequence[tuple[Any, type, Sequence[str]]] = ()) -> list[Obj]:
    """Read several object types of the whole inventory (plus single objects) in one round trip."""
    what = "/".join(t.__name__.rsplit(".", 1)[-1] for t in types) + " inventory"
    for attempt in (1, 2):
        view = _view(client, list(types), what)
        try:
            return _collect(client, _spec(view, types, objects), what)
        except Exception as exc:  # noqa: BLE001 - a view dies with its session
            if attempt == 2 or not _view_gone(exc):
                raise
            client.cache.views.clear()
    raise AssertionError("unreachable")  # pragma: no cover


def retrieve(
    client: Client,
    obj_type: type,
    paths: Sequence[str],
    *,
    container: Any = None,
    objects: Iterable[Any] | None = None,
) -> list[Obj]:
    """Read `paths` of every `obj_type` in the inventory (or below `container`), or of the given objects."""
    what = f"{obj_type.__name__.rsplit('.', 1)[-1]} inventory"
    if objects is not None:
        objs = [(o, obj_type, paths) for o in objects]
        if not objs:
            return []
        return _collect(client, _spec(None, {}, objs), what)
    if container is None:
        return retrieve_types(client, {obj_type: paths})
    vm = client.content.viewManager
    view = client.call(what, vm.CreateContainerView, container, [obj_type], True, method_name="CreateContainerView")
    try:
        return _collect(client, _spec(view, {obj_type: paths}), what)
    finally:
        try:
            client.call(what, view.DestroyView, method_name="DestroyView")
        except Exception:  # noqa: BLE001 - a leaked view is harmless, a failed read is not
            pass


def retrieve_one(client: Client, obj: Any, paths: Sequence[str]) -> Obj:
    found = retrieve(client, type(obj), paths, objects=[obj])
    return found[0] if found else Obj(ref=obj, props={})
