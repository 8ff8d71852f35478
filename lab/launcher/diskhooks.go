package main

// The SOAP methods that change a VM's disk layers or change tracking run
// under the VM's disk mutex; after the simulator served one, the layers
// follow what it did (judged from the snapshot tree and config before and
// after, so a failed call changes nothing).

import (
	"log"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

var diskMethods = map[string]bool{
	"CreateSnapshot_Task": true, "RemoveSnapshot_Task": true, "RevertToSnapshot_Task": true,
	"RevertToCurrentSnapshot_Task": true, "RemoveAllSnapshots_Task": true, "ReconfigVM_Task": true,
	"Destroy_Task": true,
}

type vmBefore struct {
	snaps   map[types.ManagedObjectReference]bool
	current *types.ManagedObjectReference
}

func snapshotState(vm *simulator.VirtualMachine) vmBefore {
	st := vmBefore{snaps: make(map[types.ManagedObjectReference]bool)}
	simulator.Map.WithLock(vm, func() {
		if vm.Snapshot == nil {
			return
		}
		if vm.Snapshot.CurrentSnapshot != nil {
			c := *vm.Snapshot.CurrentSnapshot
			st.current = &c
		}
		var walk func([]types.VirtualMachineSnapshotTree)
		walk = func(ts []types.VirtualMachineSnapshotTree) {
			for _, t := range ts {
				st.snaps[t.Snapshot] = true
				walk(t.ChildSnapshotList)
			}
		}
		walk(vm.Snapshot.RootSnapshotList)
	})
	return st
}

const extraNoTracking = "vmrep.lab.noChangeTracking"

// refuseTracking turns change tracking back off on a VM marked as unable to
// have it (the flag reads false afterwards, as on a VM without CBT support).
func refuseTracking(vm *simulator.VirtualMachine) bool {
	refused := false
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil || !strings.EqualFold(extraConfig(vm)[extraNoTracking], "true") {
			return
		}
		vm.Config.ChangeTrackingEnabled = types.NewBool(false)
		refused = true
	})
	return refused
}

var taskReturn = regexp.MustCompile(`<returnval[^>]*>\s*(task-[^<\s]+)\s*</returnval>`)

func taskSucceeded(resp []byte) bool {
	m := taskReturn.FindSubmatch(resp)
	if m == nil {
		return false
	}
	t, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: string(m[1])}).(*simulator.Task)
	if !ok {
		return false
	}
	var state types.TaskInfoState
	simulator.Map.WithLock(t, func() { state = t.Info.State })
	return state == types.TaskInfoStateSuccess
}

// diskHook is called before the simulator serves method; the function it
// returns must be called after (with the response), and releases the VM's
// disk mutex.
func (l *lab) diskHook(method string, this types.ManagedObjectReference) func(served bool, resp []byte) {
	if !diskMethods[method] {
		return func(bool, []byte) {}
	}
	vmRef := this
	if this.Type == "VirtualMachineSnapshot" {
		s, ok := simulator.Map.Get(this).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return func(bool, []byte) {}
		}
		vmRef = s.Vm
	}
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		return func(bool, []byte) {}
	}
	v := l.disks.vm(vmRef)
	v.mu.Lock()
	descs, _, tracking, err := vmInfo(vm)
	if err == nil {
		v.refresh(descs, tracking)
	}
	before := snapshotState(vm)
	var kept []string
	if method == "RemoveSnapshot_Task" || method == "RemoveAllSnapshots_Task" {
		kept = keepDiskFiles(descs)
	}
	return func(served bool, resp []byte) {
		defer v.mu.Unlock()
		restoreDiskFiles(kept)
		if !served {
			return
		}
		if err := l.afterDiskMethod(method, this, vm, v, before, resp); err != nil {
			log.Printf("lab: disks of %s after %s: %v", vm.Self, method, err)
		}
	}
}

// 0.24.2's snapshot removal deletes the files its layout lists under the
// snapshot's data key, which after a storage refresh can be a disk's
// descriptor or -flat.vmdk: hard links taken before put them back after.
func keepDiskFiles(descs []diskDesc) []string {
	var kept []string
	for _, d := range descs {
		for _, p := range []string{d.flat, strings.TrimSuffix(d.flat, "-flat.vmdk") + ".vmdk"} {
			link := filepath.Join(filepath.Dir(p), ".lab-keep-"+filepath.Base(p))
			_ = os.Remove(link)
			if os.Link(p, link) == nil {
				kept = append(kept, p)
			}
		}
	}
	return kept
}

func restoreDiskFiles(kept []string) {
	for _, p := range kept {
		link := filepath.Join(filepath.Dir(p), ".lab-keep-"+filepath.Base(p))
		if _, err := os.Stat(p); os.IsNotExist(err) {
			if err := os.Rename(link, p); err != nil {
				log.Printf("lab: restoring %s: %v", p, err)
			}
			continue
		}
		_ = os.Remove(link)
	}
}

func (l *lab) afterDiskMethod(method string, this types.ManagedObjectReference, vm *simulator.VirtualMachine,
	v *vmDisks, before vmBefore, resp []byte) error {
	if method == "Destroy_Task" {
		if simulator.Map.Get(vm.Self) == nil {
			for _, ds := range v.disks {
				ds.removeAll()
			}
			l.disks.forget(vm.Self)
		}
		return nil
	}
	descs, _, tracking, err := vmInfo(vm)
	if err != nil {
		return err
	}
	after := snapshotState(vm)

	switch method {
	case "ReconfigVM_Task":
		if tracking && refuseTracking(vm) {
			tracking = false
		}
		v.refresh(descs, tracking) // tracking on/off, resized disks
		return nil
	case "CreateSnapshot_Task":
		for s := range after.snaps {
			if before.snaps[s] {
				continue
			}
			ids := make(map[int32]string)
			for _, ds := range v.disks {
				if err := ds.freeze(s); err != nil {
					return err
				}
				if ds.cbt != nil {
					ids[ds.key] = ds.cbt.mark(s)
				}
			}
			setChangeIDs(vm, s, ids)
		}
		return nil
	case "RevertToSnapshot_Task", "RevertToCurrentSnapshot_Task":
		target := this
		if method == "RevertToCurrentSnapshot_Task" {
			if before.current == nil {
				return nil
			}
			target = *before.current
		}
		if !taskSucceeded(resp) {
			return nil
		}
		for _, ds := range v.disks {
			if err := ds.revert(target); err != nil {
				return err
			}
		}
		return nil
	default: // RemoveSnapshot_Task, RemoveAllSnapshots_Task
		for s := range before.snaps {
			if after.snaps[s] {
				continue
			}
			for _, ds := range v.disks {
				if err := ds.dropSnapshot(s); err != nil {
					return err
				}
			}
		}
		return nil
	}
}
