package main

// Changed block tracking (CBT), as ESXi answers it: a change id per disk at
// each snapshot (backing.changeId), and QueryChangedDiskAreas(snapshot,
// deviceKey, startOffset, changeId) with the areas the guest wrote between
// that change id and the snapshot ("*": the areas allocated at the snapshot),
// at most maxAreas areas per answer. See README.md ("Change tracking").

import (
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"
)

type cbtMark struct {
	gen string
	seq int
}

// tracking of one disk. epochs[i] holds the writes made after change id
// gen/i was handed out and before gen/i+1; the last epoch is open.
type tracking struct {
	gen    string
	epochs []extents
	marks  map[types.ManagedObjectReference]cbtMark // snapshot -> its change id
}

func newTracking() *tracking {
	return &tracking{gen: randomHex(8), epochs: []extents{nil}, marks: make(map[types.ManagedObjectReference]cbtMark)}
}

// reset forgets every change id (after a resize, a revert or the lab's reset
// control, as a host does after a tracking reset): older ids are refused.
func (t *tracking) reset() {
	t.gen = randomHex(8)
	t.epochs = []extents{nil}
}

func (t *tracking) note(off, end int64) {
	t.epochs[len(t.epochs)-1].add(off, end)
}

// mark closes the open epoch at a snapshot and returns the snapshot's change id.
func (t *tracking) mark(snap types.ManagedObjectReference) string {
	seq := len(t.epochs)
	t.epochs = append(t.epochs, nil)
	t.marks[snap] = cbtMark{t.gen, seq}
	return changeID(t.gen, seq)
}

func changeID(gen string, seq int) string { return fmt.Sprintf("%s/%d", gen, seq) }

func parseChangeID(id string) (string, int, bool) {
	i := strings.LastIndexByte(id, '/')
	if i <= 0 {
		return "", 0, false
	}
	n, err := strconv.Atoi(id[i+1:])
	return id[:i], n, err == nil && n >= 0
}

// changedAreas answers QueryChangedDiskAreas for one disk (under the VM's mutex).
func (ds *diskState) changedAreas(snap types.ManagedObjectReference, changeId string) (extents, types.BaseMethodFault, string) {
	if ds.cbt == nil {
		return nil, &types.FileFault{File: ds.flat}, "change tracking is not enabled for this disk"
	}
	at, ok := ds.snaps[snap]
	if !ok {
		return nil, &types.InvalidArgument{InvalidProperty: "snapshot"}, "the snapshot does not belong to this VM"
	}
	if changeId == "*" {
		all, err := ds.allocated(at)
		if err != nil {
			return nil, &types.FileFault{File: ds.flat}, err.Error()
		}
		return all, nil, ""
	}
	gen, seq, ok := parseChangeID(changeId)
	if !ok {
		return nil, &types.InvalidArgument{InvalidProperty: "changeId"}, fmt.Sprintf("malformed change id %q", changeId)
	}
	m, ok := ds.cbt.marks[snap]
	if gen != ds.cbt.gen || !ok || m.gen != ds.cbt.gen || seq > m.seq {
		// what a host answers for an id from before a tracking reset
		return nil, &types.FileFault{File: ds.flat}, fmt.Sprintf("change id %s is not valid for this disk (tracking was reset)", changeId)
	}
	var out extents
	for i := seq; i < m.seq; i++ {
		out.union(ds.cbt.epochs[i])
	}
	return out, nil, ""
}

const (
	seekData = 3 // SEEK_DATA (Linux)
	seekHole = 4 // SEEK_HOLE
)

// allocated: the areas holding data at the state frozen in `at`: the base
// extent's data regions (not its holes) and every byte of the deltas below.
func (ds *diskState) allocated(at *layer) (extents, error) {
	var out extents
	f, err := os.Open(ds.base.path)
	if err == nil {
		fd := int(f.Fd())
		var off int64
		for off < ds.capacity {
			start, err := syscall.Seek(fd, off, seekData)
			if err != nil || start >= ds.capacity {
				break // ENXIO: no data past off
			}
			end, err := syscall.Seek(fd, start, seekHole)
			if err != nil || end > ds.capacity {
				end = ds.capacity
			}
			out.add(start, end)
			off = end
		}
		f.Close()
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	for _, l := range ds.chain(at) {
		if !l.base {
			out.union(l.held)
		}
	}
	return out, nil
}

// queryChangedDiskAreas serves the SOAP method (the simulator has none).
func (l *lab) queryChangedDiskAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, types.BaseMethodFault, string) {
	vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine)
	if !ok {
		return nil, &types.ManagedObjectNotFound{Obj: req.This}, "no such VM"
	}
	if req.Snapshot == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "snapshot"}, "a snapshot is required"
	}
	v := l.disks.vm(vm.Self)
	v.mu.Lock()
	defer v.mu.Unlock()
	descs, _, tracking, err := vmInfo(vm)
	if err != nil {
		return nil, &types.FileFault{}, err.Error()
	}
	v.refresh(descs, tracking)
	ds := v.disks[req.DeviceKey]
	if ds == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "deviceKey"}, fmt.Sprintf("no disk with device key %d", req.DeviceKey)
	}
	if req.StartOffset < 0 || req.StartOffset > ds.capacity {
		return nil, &types.InvalidArgument{InvalidProperty: "startOffset"}, fmt.Sprintf("startOffset %d outside the disk", req.StartOffset)
	}
	all, fault, msg := ds.changedAreas(*req.Snapshot, req.ChangeId)
	if fault != nil {
		return nil, fault, msg
	}
	areas := all.within(req.StartOffset, ds.capacity)
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: ds.capacity - req.StartOffset}
	if max := l.disks.areasPerCall(); max > 0 && len(areas) > max {
		areas = areas[:max]
		info.Length = areas[max-1].end - req.StartOffset // the caller goes on from StartOffset+Length
	}
	for _, a := range areas {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a.off, Length: a.end - a.off})
	}
	return info, nil, ""
}

// setChangeIDs gives the new snapshot its own copy of the device list, with
// each tracked disk's backing.changeId as of the snapshot, and the VM's
// current disks the same ids (as ESXi shows them after a snapshot).
func setChangeIDs(vm *simulator.VirtualMachine, snap types.ManagedObjectReference, ids map[int32]string) {
	copyDevices := func(devs []types.BaseVirtualDevice) []types.BaseVirtualDevice {
		out := make([]types.BaseVirtualDevice, len(devs))
		for i, d := range devs {
			out[i] = d
			disk, ok := d.(*types.VirtualDisk)
			if !ok {
				continue
			}
			id, ok := ids[disk.Key]
			if !ok {
				continue
			}
			b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			c := shallowClone(disk).(*types.VirtualDisk)
			nb := *b
			nb.ChangeId = id
			c.Backing = &nb
			out[i] = c
		}
		return out
	}
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil {
			return
		}
		// The simulator's snapshot config shares the VM's device slice: give each its own.
		devs := vm.Config.Hardware.Device
		if s, ok := simulator.Map.Get(snap).(*simulator.VirtualMachineSnapshot); ok {
			s.Config.Hardware.Device = copyDevices(devs)
		}
		vm.Config.Hardware.Device = copyDevices(devs)
	})
}

func (l *lab) serveQueryChangedDiskAreas(w http.ResponseWriter, body []byte) {
	m, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		writeSOAPFault(w, err.Error(), &types.InvalidRequest{})
		return
	}
	req, ok := m.Body.(*types.QueryChangedDiskAreas)
	if !ok {
		writeSOAPFault(w, "not a QueryChangedDiskAreas request", &types.InvalidRequest{})
		return
	}
	info, fault, msg := l.queryChangedDiskAreas(req)
	if fault != nil {
		writeSOAPFault(w, msg, fault)
		return
	}
	writeSOAPResponse(w, &methods.QueryChangedDiskAreasBody{Res: &types.QueryChangedDiskAreasResponse{Returnval: *info}})
}
