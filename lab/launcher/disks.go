package main

// Disks as ESXi keeps them: a base extent (the -flat.vmdk) and, after each
// snapshot, a delta (redo log) that takes the guest's writes while the layers
// below it stay frozen. See README.md ("Disks, snapshots and guest I/O").
//
// The simulator's snapshots are metadata only; the launcher keeps the layers.
// Every guest I/O and every snapshot operation of a VM runs under that VM's
// mutex (vmDisks.mu), so a guest write lands wholly before or wholly after a
// snapshot. Lock order: vmDisks.mu, then the simulator's lock on the VM.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// layer is one file of a disk's chain: the base extent or a delta.
type layer struct {
	path     string // data: the -flat.vmdk (base) or a -delta.vmdk
	desc     string // descriptor of a delta; "" for the base
	base     bool
	parent   *layer
	children []*layer
	held     extents // delta only: the bytes it holds
}

type diskState struct {
	key      int32
	flat     string // local path of the base extent
	capacity int64
	base     *layer
	cur      *layer                                  // where guest writes go (always a leaf)
	snaps    map[types.ManagedObjectReference]*layer // snapshot -> the layer frozen by it
	cbt      *tracking                               // nil: change tracking off
}

type vmDisks struct {
	mu       sync.Mutex
	disks    map[int32]*diskState
	tracking bool // config.changeTrackingEnabled as last seen
}

type diskLab struct {
	mu       sync.Mutex
	vms      map[types.ManagedObjectReference]*vmDisks
	maxAreas int // QueryChangedDiskAreas: areas per answer
}

func newDiskLab(maxAreas int) *diskLab {
	return &diskLab{vms: make(map[types.ManagedObjectReference]*vmDisks), maxAreas: maxAreas}
}

func (d *diskLab) vm(ref types.ManagedObjectReference) *vmDisks {
	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.vms[ref]
	if v == nil {
		v = &vmDisks{disks: make(map[int32]*diskState)}
		d.vms[ref] = v
	}
	return v
}

func (d *diskLab) forget(ref types.ManagedObjectReference) {
	d.mu.Lock()
	delete(d.vms, ref)
	d.mu.Unlock()
}

func (d *diskLab) areasPerCall() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.maxAreas
}

// --- the VM's disks as the simulator describes them ----------------------------

type diskDesc struct {
	key      int32
	bus      int32
	ctrl     int32
	unit     int32
	label    string
	file     string // '[ds] vm/disk0.vmdk'
	flat     string // local path of the -flat.vmdk
	capacity int64
}

var errNoDatastore = errors.New("datastore not found")

// vmInfo reads the VM's disks (in controller order: bus, controller, unit),
// power state and change tracking flag. Must not run under the VM's lock.
func vmInfo(vm *simulator.VirtualMachine) (disks []diskDesc, power types.VirtualMachinePowerState, tracking bool, err error) {
	simulator.Map.WithLock(vm, func() {
		power = vm.Runtime.PowerState
		if vm.Config == nil {
			return
		}
		tracking = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		var host *simulator.HostSystem
		if vm.Runtime.Host != nil {
			host, _ = simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
		}
		buses := make(map[int32]int32)
		for _, dev := range vm.Config.Hardware.Device {
			if c, ok := dev.(types.BaseVirtualController); ok {
				buses[dev.GetVirtualDevice().Key] = c.GetVirtualController().BusNumber
			}
		}
		for _, dev := range vm.Config.Hardware.Device {
			disk, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			fb, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
			if !ok {
				continue
			}
			file := fb.GetVirtualDeviceFileBackingInfo().FileName
			local, e := localPath(host, strings.Replace(file, ".vmdk", "-flat.vmdk", 1))
			if e != nil {
				err = fmt.Errorf("disk %d of %s: %v", disk.Key, vm.Name, e)
				return
			}
			dd := diskDesc{key: disk.Key, ctrl: disk.ControllerKey, bus: buses[disk.ControllerKey], file: file,
				flat: local, capacity: diskCapacity(disk)}
			if disk.UnitNumber != nil {
				dd.unit = *disk.UnitNumber
			}
			if disk.DeviceInfo != nil {
				dd.label = disk.DeviceInfo.GetDescription().Label
			}
			disks = append(disks, dd)
		}
	})
	sort.SliceStable(disks, func(i, j int) bool {
		a, b := disks[i], disks[j]
		if a.bus != b.bus {
			return a.bus < b.bus
		}
		if a.ctrl != b.ctrl {
			return a.ctrl < b.ctrl
		}
		return a.unit < b.unit
	})
	return disks, power, tracking, err
}

func diskCapacity(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes > 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

// localPath maps '[ds] dir/file' to the datastore's local directory.
func localPath(host *simulator.HostSystem, dsPath string) (string, error) {
	if !strings.HasPrefix(dsPath, "[") || !strings.Contains(dsPath, "]") {
		return "", fmt.Errorf("not a datastore path: %q", dsPath)
	}
	name := dsPath[1:strings.Index(dsPath, "]")]
	rel := strings.TrimSpace(dsPath[strings.Index(dsPath, "]")+1:])
	var dir string
	if host != nil {
		if ds, ok := simulator.Map.FindByName(name, host.Datastore).(*simulator.Datastore); ok {
			dir = ds.Info.GetDatastoreInfo().Url
		}
	}
	if dir == "" {
		for _, e := range simulator.Map.All("Datastore") {
			if ds := e.(*simulator.Datastore); ds.Name == name {
				dir = ds.Info.GetDatastoreInfo().Url
				break
			}
		}
	}
	if dir == "" {
		return "", fmt.Errorf("%w: %s", errNoDatastore, name)
	}
	return filepath.Join(dir, filepath.FromSlash(path.Clean("/"+rel))), nil
}

// refresh brings the VM's disk states in line with its devices (added,
// removed, moved or resized disks). Runs under v.mu.
func (v *vmDisks) refresh(descs []diskDesc, tracking bool) {
	seen := make(map[int32]bool, len(descs))
	for _, dd := range descs {
		seen[dd.key] = true
		ds := v.disks[dd.key]
		if ds == nil {
			base := &layer{path: dd.flat, base: true}
			ds = &diskState{key: dd.key, base: base, cur: base, snaps: make(map[types.ManagedObjectReference]*layer)}
			if tracking {
				ds.cbt = newTracking()
			}
			v.disks[dd.key] = ds
		}
		if ds.capacity != 0 && ds.capacity != dd.capacity && ds.cbt != nil {
			ds.cbt.reset() // a resize invalidates every change id handed out before it
		}
		ds.capacity = dd.capacity
		ds.flat = dd.flat
		ds.base.path = dd.flat
	}
	for k := range v.disks {
		if !seen[k] {
			delete(v.disks, k)
		}
	}
	if tracking && !v.tracking {
		for _, ds := range v.disks {
			ds.cbt = newTracking()
		}
	} else if !tracking {
		for _, ds := range v.disks {
			ds.cbt = nil
		}
	}
	v.tracking = tracking
}

// --- reading and writing a chain --------------------------------------------

func (ds *diskState) chain(top *layer) []*layer {
	var out []*layer
	for l := top; l != nil; l = l.parent {
		out = append(out, l)
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out // base first
}

// readAt: what the guest sees at [off, off+n) through the layers up to top.
func (ds *diskState) readAt(top *layer, off int64, n int) ([]byte, error) {
	buf := make([]byte, n)
	for _, l := range ds.chain(top) {
		if l.base {
			if err := preadZeroFill(l.path, buf, off); err != nil {
				return nil, err
			}
			continue
		}
		for _, sp := range l.held.within(off, off+int64(n)) {
			if err := preadZeroFill(l.path, buf[sp.off-off:sp.end-off], sp.off); err != nil {
				return nil, err
			}
		}
	}
	return buf, nil
}

// preadZeroFill reads len(buf) bytes at off; past the file's end reads as zeros.
func preadZeroFill(p string, buf []byte, off int64) error {
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		for i := range buf {
			buf[i] = 0
		}
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := f.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return err
	}
	for i := n; i < len(buf); i++ {
		buf[i] = 0
	}
	return nil
}

// pwriteSync writes data at off and fsyncs: the write is durable when it returns.
func pwriteSync(p string, data []byte, off int64) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(data, off); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// write is a guest write into the current layer; change tracking notes it.
func (ds *diskState) write(off int64, data []byte) error {
	if err := pwriteSync(ds.cur.path, data, off); err != nil {
		return err
	}
	if !ds.cur.base {
		ds.cur.held.add(off, off+int64(len(data)))
	}
	if ds.cbt != nil {
		ds.cbt.note(off, off+int64(len(data)))
	}
	return nil
}

// --- snapshots ----------------------------------------------------------------

// freeze: at a snapshot, the current layer is frozen and a new delta takes the writes.
func (ds *diskState) freeze(snap types.ManagedObjectReference) error {
	frozen := ds.cur
	if err := ds.newDelta(snap.Value); err != nil {
		return err
	}
	ds.snaps[snap] = frozen
	return nil
}

// newDelta puts a new, empty delta on top of ds.cur and makes it current.
func (ds *diskState) newDelta(snapName string) error {
	stem := strings.TrimSuffix(ds.flat, "-flat.vmdk")
	var data, desc string
	for i := 1; ; i++ {
		data = fmt.Sprintf("%s-%06d-delta.vmdk", stem, i)
		desc = fmt.Sprintf("%s-%06d.vmdk", stem, i)
		if _, err := os.Stat(data); errors.Is(err, os.ErrNotExist) {
			break
		}
	}
	f, err := os.OpenFile(data, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	// As long as the disk, holes where the delta holds nothing.
	err = f.Truncate(ds.capacity)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		os.Remove(data)
		return err
	}
	parentName := filepath.Base(ds.flat)
	if !ds.cur.base {
		parentName = filepath.Base(ds.cur.desc)
	}
	text := fmt.Sprintf("# Disk DescriptorFile (vcsim-lab redo log)\nversion=1\ncreateType=\"vmfsSparse\"\n"+
		"parentFileNameHint=%q\nsnapshot=%q\n\nRW %d VMFSSPARSE %q\n", parentName, snapName,
		ds.capacity/512, filepath.Base(data))
	if err := os.WriteFile(desc, []byte(text), 0o644); err != nil {
		os.Remove(data)
		return err
	}
	l := &layer{path: data, desc: desc, parent: ds.cur}
	ds.cur.children = append(ds.cur.children, l)
	ds.cur = l
	return nil
}

// revert: the writes since the snapshot are discarded; a new delta on top of
// the snapshot's layer takes the writes from now on.
func (ds *diskState) revert(snap types.ManagedObjectReference) error {
	at, ok := ds.snaps[snap]
	if !ok {
		return fmt.Errorf("no layer for snapshot %s", snap.Value)
	}
	old := ds.cur
	ds.cur = at
	if err := ds.newDelta("revert to " + snap.Value); err != nil {
		ds.cur = old
		return err
	}
	if ds.cbt != nil {
		ds.cbt.reset() // the disk went back in time: earlier change ids do not describe it any more
	}
	return ds.tidy()
}

// dropSnapshot: the snapshot is gone; its layer need not be kept apart any more.
func (ds *diskState) dropSnapshot(snap types.ManagedObjectReference) error {
	delete(ds.snaps, snap)
	if ds.cbt != nil {
		delete(ds.cbt.marks, snap)
	}
	return ds.tidy()
}

// tidy consolidates: a layer no snapshot needs is deleted when nothing sits on
// it, and takes its only child's bytes into itself otherwise (a removed
// snapshot's delta is consolidated into its parent, the -flat.vmdk at last).
func (ds *diskState) tidy() error {
	for {
		referenced := make(map[*layer]bool)
		for _, l := range ds.snaps {
			referenced[l] = true
		}
		var target *layer
		var walk func(l *layer)
		walk = func(l *layer) {
			if target != nil {
				return
			}
			if l != ds.cur && !referenced[l] && (len(l.children) == 1 || (len(l.children) == 0 && !l.base)) {
				target = l
				return
			}
			for _, c := range l.children {
				walk(c)
			}
		}
		walk(ds.base)
		if target == nil {
			return nil
		}
		if len(target.children) == 0 {
			p := target.parent
			for i, c := range p.children {
				if c == target {
					p.children = append(p.children[:i:i], p.children[i+1:]...)
					break
				}
			}
			removeLayerFiles(target)
			continue
		}
		if err := ds.merge(target, target.children[0]); err != nil {
			return err
		}
	}
}

// merge copies child's bytes into l and puts l in child's place.
func (ds *diskState) merge(l, child *layer) error {
	for _, sp := range child.held {
		for off := sp.off; off < sp.end; {
			n := sp.end - off
			if n > 4<<20 {
				n = 4 << 20
			}
			buf := make([]byte, n)
			if err := preadZeroFill(child.path, buf, off); err != nil {
				return err
			}
			f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE, 0o644)
			if err != nil {
				return err
			}
			_, err = f.WriteAt(buf, off)
			f.Close()
			if err != nil {
				return err
			}
			off += n
		}
		if !l.base {
			l.held.add(sp.off, sp.end)
		}
	}
	if err := syncFile(l.path); err != nil {
		return err
	}
	l.children = child.children
	for _, c := range l.children {
		c.parent = l
	}
	for s, x := range ds.snaps {
		if x == child {
			ds.snaps[s] = l
		}
	}
	if ds.cur == child {
		ds.cur = l
	}
	removeLayerFiles(child)
	return nil
}

func syncFile(p string) error {
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	f.Close()
	return err
}

func removeLayerFiles(l *layer) {
	if l.base {
		return
	}
	for _, p := range []string{l.path, l.desc} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.Printf("lab: removing %s: %v", p, err)
		}
	}
}

// removeAll deletes every delta (the VM is destroyed).
func (ds *diskState) removeAll() {
	var walk func(l *layer)
	walk = func(l *layer) {
		for _, c := range l.children {
			walk(c)
		}
		removeLayerFiles(l)
	}
	walk(ds.base)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
