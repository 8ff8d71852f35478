"""The lab's vCenter simulator launcher (lab/launcher, build/vcsim-lab), end to end.

One launcher process serves the module; every check goes through pyvmomi,
requests or ssl, as the product does. The binary is built when missing or older
than its sources (skipped when Go is not installed).
"""

from __future__ import annotations

import hashlib
import http.client
import http.cookies
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / "build" / "vcsim-lab"
SOURCES = REPO / "lab" / "launcher"
READY_KEYS = {"url", "host", "control_url", "pid", "ca_file", "thumbprint", "datastores"}
BOOT_DELAY = 0.3  # seconds, passed as -boot-delay

PC = vmodl.query.PropertyCollector


# --- launcher process -------------------------------------------------------------


def _ensure_binary() -> Path:
    newest = max(p.stat().st_mtime for p in SOURCES.glob("*.go"))
    if BINARY.exists() and BINARY.stat().st_mtime >= newest:
        return BINARY
    if shutil.which("go") is None:
        pytest.fail("Go is not installed: `make test` installs golang-go; cannot build build/vcsim-lab")
    subprocess.run(["make", "-f", "lab/launcher/build.mk", "build/vcsim-lab"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return BINARY


def _start(workdir: Path, *args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    binary = _ensure_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "launcher.log", "ab")
    proc = subprocess.Popen(
        [str(binary), "-tls-dir", str(workdir / "tls"), "-log", str(workdir / "launcher.log"), *args],
        stdout=subprocess.PIPE, stderr=log, env=dict(os.environ, TMPDIR=str(workdir)))
    log.close()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline().decode()
                assert line.startswith("VCSIM_READY "), f"unexpected first line: {line!r}"
                return proc, json.loads(line.split(" ", 1)[1])
            assert proc.poll() is None, (workdir / "launcher.log").read_text()[-2000:]
        raise AssertionError("launcher not ready in time")
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vcsim-lab")
    proc, info = _start(workdir, "-vm", "3", "-boot-delay", f"{int(BOOT_DELAY * 1000)}ms",
                        "-shutdown-delay", "200ms", "-state-file", str(workdir / "state.json"))
    info["workdir"] = workdir
    try:
        yield info
    finally:
        assert _stop(proc) == 0


@pytest.fixture(autouse=True)
def _no_leftover_faults(request):
    yield
    if "lab" in request.fixturenames:
        requests.delete(request.getfixturevalue("lab")["control_url"] + "/faults", timeout=5)


def connect(lab) -> vim.ServiceInstance:
    host, port = lab["host"].split(":")
    return SmartConnect(host=host, port=int(port), user="lab", pwd="lab",
                        sslContext=ssl.create_default_context(cafile=lab["ca_file"]))


@pytest.fixture
def si(lab):
    si = connect(lab)
    yield si
    try:
        Disconnect(si)
    except Exception:
        pass


_CONTENT: dict[int, tuple] = {}  # id(si) -> (si, content); holding si keeps its id unique


def content(si) -> vim.ServiceInstanceContent:
    """The service content, fetched once per connection (si.content would be a Fetch per use)."""
    if id(si) not in _CONTENT:
        _CONTENT[id(si)] = (si, si.RetrieveContent())
    return _CONTENT[id(si)][1]


def vm_by_name(si, name: str) -> vim.VirtualMachine:
    c = content(si)
    view = c.viewManager.CreateContainerView(c.rootFolder, [vim.VirtualMachine], True)
    try:
        for o in props(si, view, "view")["view"]:
            if props(si, o, "name")["name"] == name:
                return o
    finally:
        view.Destroy()
    raise LookupError(name)


def props(si, obj, *paths: str) -> dict:
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=obj)],
                         propSet=[PC.PropertySpec(type=type(obj), pathSet=list(paths))])
    res = content(si).propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
    return {p.name: p.val for p in res.objects[0].propSet}


def wait_task(si, task, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = props(si, task, "info.state")["info.state"]
        if state in ("success", "error"):
            return state
        time.sleep(0.05)
    raise AssertionError("task did not finish")


def guest_state(si, vm) -> dict:
    return props(si, vm, "runtime.powerState", "guest.toolsRunningStatus", "guest.toolsStatus",
                 "guestHeartbeatStatus", "guest.ipAddress", "guest.net")


def wait_for(fn, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def control(lab, method: str, path: str, **kw) -> requests.Response:
    r = requests.request(method, lab["control_url"] + path, timeout=10, **kw)
    r.raise_for_status()
    return r


def session_key(si) -> str:
    cookie = http.cookies.SimpleCookie()
    cookie.load(si._stub.cookie)
    return cookie["vmware_soap_session"].value


def folder_url(lab, rel: str) -> str:
    return f"https://{lab['host']}/folder/{rel}?dcPath=DC0&dsName=LocalDS_0"


# --- READY, TLS, shutdown -------------------------------------------------------------


def test_ready_line_and_state_file(lab):
    assert READY_KEYS <= set(lab) and set(lab) - READY_KEYS == {"workdir"}
    assert lab["url"] == f"https://{lab['host']}/sdk"
    assert lab["host"].startswith("127.0.0.1:") and lab["control_url"].startswith("http://127.0.0.1:")
    state = json.loads((lab["workdir"] / "state.json").read_text())
    assert state == {k: lab[k] for k in READY_KEYS}
    assert set(lab["datastores"]) == {"LocalDS_0", "LocalDS_1"}
    assert all(Path(d).is_dir() for d in lab["datastores"].values())
    assert control(lab, "GET", "/").json()["pid"] == lab["pid"]


def test_tls_is_verified_with_the_generated_ca(lab):
    host, port = lab["host"].split(":")
    for name in ("127.0.0.1", "localhost"):
        ctx = ssl.create_default_context(cafile=lab["ca_file"])
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
        assert hashlib.sha256(der).hexdigest() == lab["thumbprint"]
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_sigterm_exits_zero_and_removes_temp_dirs(tmp_path):
    proc, info = _start(tmp_path, "-vm", "1", "-state-file", str(tmp_path / "state.json"))
    try:
        dirs = list(info["datastores"].values())
        assert all(Path(d).is_dir() for d in dirs) and (tmp_path / "state.json").exists()
    finally:
        assert _stop(proc) == 0
    assert not any(Path(d).exists() for d in dirs)
    assert not (tmp_path / "state.json").exists()


# --- robustness of the SOAP endpoint ----------------------------------------------


def test_unset_property_reads_as_none(si):
    vm = vm_by_name(si, "DC0_H0_VM0")
    assert vm.snapshot is None  # lazy read: the Fetch method
    assert vm.parentVApp is None
    assert "snapshot" not in props(si, vm, "snapshot", "name")


def test_handler_panic_answers_a_soap_fault_and_keeps_the_connection(si):
    vm = vm_by_name(si, "DC0_H0_VM0")
    # 0.24.2 panics on a property path through an array
    with pytest.raises(vmodl.fault.SystemError) as err:
        props(si, vm, "config.hardware.device.key")
    assert "panic" in err.value.msg
    assert vm.name == "DC0_H0_VM0"


# --- fault injection ------------------------------------------------------------------

EXPECTED = {
    "NotAuthenticated": vim.fault.NotAuthenticated,
    "HostCommunication": vmodl.fault.HostCommunication,
    "NotFound": vim.fault.NotFound,
    "InvalidArgument": vmodl.fault.InvalidArgument,
    "InvalidState": vim.fault.InvalidState,
    "TaskInProgress": vim.fault.TaskInProgress,
    "SystemError": vmodl.fault.SystemError,
}


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_injected_fault_raises_the_matching_pyvmomi_class(lab, si, fault):
    vm = vm_by_name(si, "DC0_H0_VM0")
    rule = control(lab, "POST", "/faults", json={"method": "RetrievePropertiesEx", "action": "fault",
                                                  "fault": fault}).json()
    assert rule["count"] == 1
    with pytest.raises(EXPECTED[fault]):
        props(si, vm, "name")
    assert props(si, vm, "name") == {"name": "DC0_H0_VM0"}  # count 1: used up
    assert control(lab, "GET", "/faults").json() == []


def test_http503_drop_and_delay(lab, si):
    vm = vm_by_name(si, "DC0_H0_VM0")
    control(lab, "POST", "/faults", json={"method": "RetrievePropertiesEx", "action": "fault", "fault": "http503"})
    with pytest.raises(http.client.HTTPException, match="503"):
        props(si, vm, "name")

    control(lab, "POST", "/faults", json={"method": "RetrievePropertiesEx", "action": "drop"})
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)) as err:
        props(si, vm, "name")
    assert not isinstance(err.value, vmodl.MethodFault)

    control(lab, "POST", "/faults", json={"method": "RetrievePropertiesEx", "action": "delay", "delay_ms": 400})
    t0 = time.monotonic()
    assert props(si, vm, "name") == {"name": "DC0_H0_VM0"}
    assert time.monotonic() - t0 >= 0.4
    t0 = time.monotonic()
    props(si, vm, "name")
    assert time.monotonic() - t0 < 0.4


def test_fault_count_and_match(lab, si):
    a = vm_by_name(si, "DC0_H0_VM0")
    b = vm_by_name(si, "DC0_C0_RP0_VM2")
    control(lab, "POST", "/faults", json={"method": "RetrievePropertiesEx", "action": "fault",
                                          "fault": "HostCommunication", "count": 2, "match": b._moId})
    assert props(si, a, "name")  # other VM: no match
    for _ in range(2):
        with pytest.raises(vmodl.fault.HostCommunication):
            props(si, b, "name")
    assert props(si, b, "name") == {"name": "DC0_C0_RP0_VM2"}

    control(lab, "POST", "/faults", json={"method": "RetrievePropertiesEx", "action": "fault",
                                          "fault": "InvalidState", "count": 0})
    for _ in range(3):
        with pytest.raises(vim.fault.InvalidState):
            props(si, a, "name")
    [rule] = control(lab, "GET", "/faults").json()
    assert rule["count"] == 0 and rule["hits"] == 3
    assert control(lab, "DELETE", "/faults").json() == {"cleared": 1}
    assert props(si, a, "name")

    bad = requests.post(lab["control_url"] + "/faults", json={"method": "X", "action": "fault", "fault": "Nope"},
                        timeout=5)
    assert bad.status_code == 400


def test_calls_are_counted(lab, si):
    vm = vm_by_name(si, "DC0_H0_VM0")
    control(lab, "DELETE", "/calls")
    for _ in range(5):
        props(si, vm, "name")
    assert vm.name
    calls = control(lab, "GET", "/calls").json()
    assert calls == {"RetrievePropertiesEx": 5, "Fetch": 1}


# --- sessions and datastore files ---------------------------------------------------


def test_dropped_sessions_must_log_in_again(lab, si):
    c = content(si)
    vm = vm_by_name(si, "DC0_H0_VM0")
    rest = f"https://{lab['host']}/rest/com/vmware/cis"
    token = requests.post(rest + "/session", auth=("lab", "lab"), verify=lab["ca_file"], timeout=5).json()["value"]
    headers = {"vmware-api-session-id": token}
    assert requests.get(rest + "/tagging/category", headers=headers, verify=lab["ca_file"], timeout=5).ok
    assert control(lab, "DELETE", "/sessions").json()["terminated"] >= 2
    assert requests.get(rest + "/tagging/category", headers=headers, verify=lab["ca_file"],
                        timeout=5).status_code == 401
    with pytest.raises(vim.fault.NotAuthenticated):
        props(si, vm, "name")
    with pytest.raises(vim.fault.NotAuthenticated):
        _ = vm.name  # the property read is what must raise
    assert c.sessionManager.currentSession is None
    c.sessionManager.Login("lab", "lab")
    assert props(si, vm, "name") == {"name": "DC0_H0_VM0"}
    assert c.sessionManager.currentSession.userName == "lab"


def test_folder_demands_a_session_cookie_and_serves_ranges(lab, si):
    root = Path(lab["datastores"]["LocalDS_0"]) / "lab-test"
    root.mkdir(exist_ok=True)
    data = bytes(range(256)) * 64
    (root / "blob.bin").write_bytes(data)
    url = folder_url(lab, "lab-test/blob.bin")
    ca = lab["ca_file"]

    assert requests.get(url, verify=ca, timeout=5).status_code == 401
    assert requests.get(url, verify=ca, timeout=5, cookies={"vmware_soap_session": "bogus"}).status_code == 401

    cookies = {"vmware_soap_session": session_key(si)}
    r = requests.get(url, verify=ca, timeout=5, cookies=cookies, headers={"Range": "bytes=1000-1099"})
    assert r.status_code == 206 and r.content == data[1000:1100]

    put = folder_url(lab, "lab-test/new.bin")
    assert requests.put(put, data=b"x" * 10, verify=ca, timeout=5, cookies=cookies).status_code in (200, 201)
    assert (root / "new.bin").read_bytes() == b"x" * 10
    assert requests.delete(put, verify=ca, timeout=5, cookies=cookies).status_code in (200, 204)
    assert not (root / "new.bin").exists()
    assert requests.delete(put, verify=ca, timeout=5, cookies=cookies).status_code == 404

    calls = control(lab, "GET", "/calls").json()
    assert calls["DatastoreFile.GET"] >= 3 and calls["DatastoreFile.DELETE"] >= 2

    control(lab, "POST", "/faults", json={"method": "DatastoreFile.GET", "action": "fault", "fault": "http503"})
    assert requests.get(url, verify=ca, timeout=5, cookies=cookies).status_code == 503

    control(lab, "DELETE", "/sessions")
    assert requests.get(url, verify=ca, timeout=5, cookies=cookies).status_code == 401


# --- guest simulation -----------------------------------------------------------------


def _running(si, vm):
    g = guest_state(si, vm)
    return g if g.get("guest.toolsRunningStatus") == "guestToolsRunning" and g.get("guest.ipAddress") else None


def test_guest_tools_come_up_after_power_on(lab, si):
    vm = vm_by_name(si, "DC0_H0_VM0")
    pc = content(si).propertyCollector.CreatePropertyCollector()
    pc.CreateFilter(PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                                  propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["guest.ipAddress"])]),
                    True)
    version = pc.WaitForUpdatesEx("", PC.WaitOptions(maxWaitSeconds=1)).version

    if guest_state(si, vm)["runtime.powerState"] == "poweredOn":
        assert wait_task(si, vm.PowerOffVM_Task()) == "success"
    off = guest_state(si, vm)
    assert off["guest.toolsRunningStatus"] == "guestToolsNotRunning"
    assert off["guestHeartbeatStatus"] == "gray" and "guest.ipAddress" not in off

    assert wait_task(si, vm.PowerOnVM_Task()) == "success"
    t0 = time.monotonic()
    assert guest_state(si, vm)["guest.toolsRunningStatus"] == "guestToolsNotRunning"  # still booting
    g = wait_for(lambda: _running(si, vm))
    assert g, guest_state(si, vm)
    assert time.monotonic() - t0 >= BOOT_DELAY * 0.8
    assert g["guest.toolsStatus"] == "toolsOk" and g["guestHeartbeatStatus"] == "green"
    assert g["guest.ipAddress"].startswith("10.0.")
    [nic] = g["guest.net"]
    assert list(nic.ipAddress) == [g["guest.ipAddress"]] and nic.network == "DC0_DVPG0" and nic.macAddress

    # the same changes reach WaitForUpdatesEx
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and g["guest.ipAddress"] not in seen:
        update = pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=1))
        if update:
            version = update.version
            seen += [c.val for f in update.filterSet for o in f.objectSet for c in o.changeSet]
    assert g["guest.ipAddress"] in seen
    pc.Destroy()


def test_never_boot_vm_never_gets_tools(lab, si):
    vm = vm_by_name(si, "DC0_H0_VM1")
    assert control(lab, "POST", "/vms/never-boot", json={"name": "DC0_H0_VM1", "never": True}).json()[
        "matching_vms"] == 1
    if guest_state(si, vm)["runtime.powerState"] == "poweredOn":
        wait_task(si, vm.PowerOffVM_Task())
    wait_task(si, vm.PowerOnVM_Task())
    time.sleep(BOOT_DELAY + 0.4)
    g = guest_state(si, vm)
    assert g["runtime.powerState"] == "poweredOn"
    assert g["guest.toolsRunningStatus"] == "guestToolsNotRunning" and "guest.ipAddress" not in g
    assert g["guestHeartbeatStatus"] == "gray"
    with pytest.raises(vim.fault.ToolsUnavailable):
        vm.ShutdownGuest()

    control(lab, "POST", "/vms/never-boot", json={"name": "DC0_H0_VM1", "never": False})
    assert wait_for(lambda: _running(si, vm))


def test_never_boot_from_extra_config(si):
    vm = vm_by_name(si, "DC0_H0_VM2")
    spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="vmrep.lab.neverBoot", value="TRUE")])
    assert wait_task(si, vm.ReconfigVM_Task(spec)) == "success"
    if guest_state(si, vm)["runtime.powerState"] == "poweredOn":
        wait_task(si, vm.PowerOffVM_Task())
    wait_task(si, vm.PowerOnVM_Task())
    time.sleep(BOOT_DELAY + 0.4)
    assert guest_state(si, vm)["guest.toolsRunningStatus"] == "guestToolsNotRunning"


def test_shutdown_guest_powers_off_when_tools_run(si):
    vm = vm_by_name(si, "DC0_C0_RP0_VM0")
    if guest_state(si, vm)["runtime.powerState"] != "poweredOn":
        wait_task(si, vm.PowerOnVM_Task())
    assert wait_for(lambda: _running(si, vm))
    vm.ShutdownGuest()
    assert wait_for(lambda: guest_state(si, vm)["runtime.powerState"] == "poweredOff", timeout=5)
    assert guest_state(si, vm)["guest.toolsRunningStatus"] == "guestToolsNotRunning"
    with pytest.raises(vim.fault.InvalidPowerState):
        vm.ShutdownGuest()


def test_customization_and_extra_config_set_the_guest_ip(si):
    vm = vm_by_name(si, "DC0_C0_RP0_VM1")
    if guest_state(si, vm)["runtime.powerState"] == "poweredOn":
        wait_task(si, vm.PowerOffVM_Task())
    spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="guestinfo.vmrep.ip", value="172.16.5.5")])
    assert wait_task(si, vm.ReconfigVM_Task(spec)) == "success"
    wait_task(si, vm.PowerOnVM_Task())
    assert (wait_for(lambda: _running(si, vm)) or {}).get("guest.ipAddress") == "172.16.5.5"

    wait_task(si, vm.PowerOffVM_Task())
    custom = vim.vm.customization.Specification(
        identity=vim.vm.customization.LinuxPrep(hostName=vim.vm.customization.FixedName(name="rec"), domain="lab"),
        globalIPSettings=vim.vm.customization.GlobalIPSettings(),
        nicSettingMap=[vim.vm.customization.AdapterMapping(adapter=vim.vm.customization.IPSettings(
            ip=vim.vm.customization.FixedIp(ipAddress="192.168.50.7"), subnetMask="255.255.255.0"))])
    assert wait_task(si, vm.CustomizeVM_Task(custom)) == "success"
    wait_task(si, vm.PowerOnVM_Task())
    assert guest_state(si, vm)["guest.toolsRunningStatus"] == "guestToolsNotRunning"
    assert (wait_for(lambda: _running(si, vm)) or {}).get("guest.ipAddress") == "192.168.50.7"


def test_boot_delay_can_be_changed_at_run_time(lab):
    assert control(lab, "GET", "/guest-boot-delay").json() == {"ms": int(BOOT_DELAY * 1000)}
    control(lab, "POST", "/guest-boot-delay", json={"ms": 50})
    try:
        assert control(lab, "GET", "/guest-boot-delay").json() == {"ms": 50}
    finally:
        control(lab, "POST", "/guest-boot-delay", json={"ms": int(BOOT_DELAY * 1000)})
