package main

// Guest simulation: VMware Tools, heartbeat and guest networking of every VM,
// derived from its power state, boot time and configuration.
//
// The simulator calls RegisterObject handlers (Map.AddHandler) on every
// Put/Update/Remove of a managed object; guestSim is one, so it learns which
// VMs changed without walking the inventory. A VM is (re)evaluated when it was
// created or changed, when a task on it completed, when its boot delay expires,
// and by a slow safety sweep. Evaluation runs under the VM's lock
// (Map.WithLock, the lock the SOAP dispatcher takes for calls on the VM) and
// applies changes with Map.Update, which is what emits property updates to
// PropertyCollector filters and WaitForUpdatesEx.

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"log"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	extraNeverBoot = "vmrep.lab.neverBoot"
	extraIP        = "guestinfo.vmrep.ip"
	toolsRunning   = "guestToolsRunning"
	toolsNotRun    = "guestToolsNotRunning"
)

type customization struct {
	key string   // config.tools.pendingCustomization while pending
	ips []string // fixed IP per NIC index, "" where DHCP/unknown
}

type guestSim struct {
	self types.ManagedObjectReference

	mu        sync.Mutex
	due       map[types.ManagedObjectReference]time.Time
	bootDelay time.Duration
	neverBoot map[string]bool
	pending   map[types.ManagedObjectReference]customization
	applied   map[types.ManagedObjectReference][]string
	firstOn   map[types.ManagedObjectReference]time.Time
	// seen: a fingerprint per VM and property of what configChanges reports
	seen map[types.ManagedObjectReference]map[string]string

	sweep time.Duration
	tick  time.Duration
}

func newGuestSim(bootDelay time.Duration) *guestSim {
	return &guestSim{
		self:      types.ManagedObjectReference{Type: "LabGuestSimulation", Value: "lab-guest-sim"},
		due:       make(map[types.ManagedObjectReference]time.Time),
		bootDelay: bootDelay,
		neverBoot: make(map[string]bool),
		pending:   make(map[types.ManagedObjectReference]customization),
		applied:   make(map[types.ManagedObjectReference][]string),
		firstOn:   make(map[types.ManagedObjectReference]time.Time),
		seen:      make(map[types.ManagedObjectReference]map[string]string),
		sweep:     10 * time.Second,
		tick:      100 * time.Millisecond,
	}
}

// --- simulator.RegisterObject -------------------------------------------------

func (g *guestSim) Reference() types.ManagedObjectReference { return g.self }

func (g *guestSim) PutObject(o mo.Reference) {
	if ref := o.Reference(); ref.Type == "VirtualMachine" {
		// A VM is Put before its configuration is filled in (CreateVM runs
		// under the folder's lock, not the VM's): look at it a bit later.
		g.schedule(ref, time.Now().Add(300*time.Millisecond))
	}
}

func (g *guestSim) UpdateObject(o mo.Reference, changes []types.PropertyChange) {
	ref := o.Reference()
	switch ref.Type {
	case "VirtualMachine":
		for _, c := range changes {
			if !ownChange(c.Name) {
				g.schedule(ref, time.Now())
				return
			}
		}
	case "Task":
		// ReconfigVM_Task etc. change a VM without Map.Update: catch their end.
		task, ok := o.(*mo.Task)
		if !ok || task.Info.Entity == nil || task.Info.Entity.Type != "VirtualMachine" {
			return
		}
		for _, c := range changes {
			if c.Name == "info.state" && (c.Val == types.TaskInfoStateSuccess || c.Val == types.TaskInfoStateError) {
				g.schedule(*task.Info.Entity, time.Now())
				return
			}
		}
	}
}

func (g *guestSim) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachine" {
		return
	}
	g.mu.Lock()
	delete(g.due, ref)
	delete(g.pending, ref)
	delete(g.applied, ref)
	delete(g.firstOn, ref)
	delete(g.seen, ref)
	g.mu.Unlock()
}

// ownChange: properties only this simulation writes (its own updates must not
// trigger another evaluation).
func ownChange(name string) bool {
	return strings.HasPrefix(name, "guest.") || name == "guest" ||
		strings.HasPrefix(name, "summary.guest.") || name == "guestHeartbeatStatus" ||
		name == "summary.quickStats.guestHeartbeatStatus" || name == "runtime.bootTime"
}

// --- scheduling ---------------------------------------------------------------

func (g *guestSim) schedule(ref types.ManagedObjectReference, at time.Time) {
	g.mu.Lock()
	if t, ok := g.due[ref]; !ok || at.Before(t) {
		g.due[ref] = at
	}
	g.mu.Unlock()
}

func (g *guestSim) scheduleAll() {
	now := time.Now()
	for _, e := range simulator.Map.All("VirtualMachine") {
		g.schedule(e.Reference(), now)
	}
}

// evaluateAll evaluates every VM now (at start, before READY).
func (g *guestSim) evaluateAll() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		g.evaluate(e.Reference())
	}
}

func (g *guestSim) setBootDelay(d time.Duration) {
	g.mu.Lock()
	g.bootDelay = d
	g.mu.Unlock()
	g.scheduleAll()
}

func (g *guestSim) getBootDelay() time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.bootDelay
}

// setNeverBoot marks a VM (by name) as never booting; returns how many VMs
// currently carry that name.
func (g *guestSim) setNeverBoot(name string, never bool) int {
	g.mu.Lock()
	if never {
		g.neverBoot[name] = true
	} else {
		delete(g.neverBoot, name)
	}
	g.mu.Unlock()

	n := 0
	now := time.Now()
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		var vmName string
		simulator.Map.WithLock(vm, func() { vmName = vm.Name })
		if vmName == name {
			n++
			g.schedule(vm.Self, now)
		}
	}
	return n
}

func (g *guestSim) neverBootNames() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	names := make([]string, 0, len(g.neverBoot))
	for n := range g.neverBoot {
		names = append(names, n)
	}
	return names
}

// recordCustomization notes a CustomizeVM_Task spec accepted by the simulator
// (it is applied at the next power-on).
func (g *guestSim) recordCustomization(ref types.ManagedObjectReference, key string, spec *types.CustomizationSpec) {
	ips := make([]string, len(spec.NicSettingMap))
	for i, s := range spec.NicSettingMap {
		if ip, ok := s.Adapter.Ip.(*types.CustomizationFixedIp); ok {
			ips[i] = ip.IpAddress
		}
	}
	g.mu.Lock()
	g.pending[ref] = customization{key: key, ips: ips}
	g.mu.Unlock()
}

func (g *guestSim) run(stop <-chan struct{}) {
	ticker := time.NewTicker(g.tick)
	defer ticker.Stop()
	lastSweep := time.Now()
	for {
		select {
		case <-stop:
			return
		case now := <-ticker.C:
			if now.Sub(lastSweep) >= g.sweep {
				lastSweep = now
				g.scheduleAll()
			}
			g.mu.Lock()
			var work []types.ManagedObjectReference
			for ref, t := range g.due {
				if !t.After(now) {
					work = append(work, ref)
					delete(g.due, ref)
				}
			}
			g.mu.Unlock()
			for _, ref := range work {
				g.evaluate(ref)
			}
		}
	}
}

// evaluate brings one VM's guest state in line with its power state now.
func (g *guestSim) evaluate(ref types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	defer func() {
		if r := recover(); r != nil {
			log.Printf("lab: guest simulation of %s: %v", ref, r)
			g.schedule(ref, time.Now().Add(time.Second))
		}
	}()
	simulator.Map.WithLock(vm, func() { g.apply(vm) })
}

func extraConfig(vm *simulator.VirtualMachine) map[string]string {
	ec := make(map[string]string)
	for _, o := range vm.Config.ExtraConfig {
		v := o.GetOptionValue()
		if s, ok := v.Value.(string); ok {
			ec[v.Key] = s // the simulator appends on every reconfigure: last one wins
		}
	}
	return ec
}

// apply runs with the VM locked.
func (g *guestSim) apply(vm *simulator.VirtualMachine) {
	ref := vm.Self
	if vm.Config == nil || vm.Guest == nil || vm.Summary.Guest == nil {
		g.schedule(ref, time.Now().Add(300*time.Millisecond))
		return
	}
	now := time.Now()
	ec := extraConfig(vm)
	ps := vm.Runtime.PowerState

	g.mu.Lock()
	delay := g.bootDelay
	never := g.neverBoot[vm.Name] || strings.EqualFold(ec[extraNeverBoot], "true")
	if p, ok := g.pending[ref]; ok && vm.Config.Tools != nil && vm.Config.Tools.PendingCustomization != p.key {
		// the simulator applied (and cleared) the pending customization at power-on
		g.applied[ref] = p.ips
		delete(g.pending, ref)
	}
	custom := g.applied[ref]
	var bootTime *time.Time
	if ps == types.VirtualMachinePowerStatePoweredOn {
		if bt := vm.Summary.Runtime.BootTime; bt != nil {
			bootTime = bt
		} else if bt := vm.Runtime.BootTime; bt != nil {
			bootTime = bt
		} else {
			t, ok := g.firstOn[ref]
			if !ok {
				t = now
				g.firstOn[ref] = t
			}
			bootTime = &t
		}
	} else {
		delete(g.firstOn, ref)
	}
	g.mu.Unlock()

	running := false
	if ps == types.VirtualMachinePowerStatePoweredOn && !never {
		if up := bootTime.Add(delay); now.Before(up) {
			g.schedule(ref, up)
		} else {
			running = true
		}
	}

	// One guest.net entry per NIC, in device order.
	old := make(map[int32]types.GuestNicInfo)
	for _, n := range vm.Guest.Net {
		old[n.DeviceConfigId] = n
	}
	var nets []types.GuestNicInfo
	var firstIP string
	// NICs in device key order (the order guest customization maps them in),
	// not list order (the simulator moves an edited device to the end).
	var cards []*types.VirtualEthernetCard
	for _, d := range vm.Config.Hardware.Device {
		if card, ok := d.(types.BaseVirtualEthernetCard); ok {
			cards = append(cards, card.GetVirtualEthernetCard())
		}
	}
	sort.Slice(cards, func(a, b int) bool { return cards[a].Key < cards[b].Key })
	for i, c := range cards {
		prev := old[c.Key]
		n := types.GuestNicInfo{
			Network:        networkName(c.Backing, prev.Network),
			MacAddress:     c.MacAddress,
			Connected:      running,
			DeviceConfigId: c.Key,
			DnsConfig:      prev.DnsConfig,
		}
		if running {
			ip := nicIP(ref, i, custom, ec)
			if i == 0 {
				firstIP = ip
			}
			n.IpAddress = []string{ip}
			origin := "dhcp"
			if i < len(custom) && custom[i] != "" {
				origin = "manual"
			}
			n.IpConfig = &types.NetIpConfigInfo{IpAddress: []types.NetIpConfigInfoIpAddress{{
				IpAddress: ip, PrefixLength: 24, Origin: origin, State: "preferred",
			}}}
		}
		nets = append(nets, n)
	}

	toolsRun, toolsStatus, state, hb := toolsNotRun, types.VirtualMachineToolsStatusToolsNotRunning, "notRunning", types.ManagedEntityStatusGray
	if running {
		toolsRun, toolsStatus, state, hb = toolsRunning, types.VirtualMachineToolsStatusToolsOk, "running", types.ManagedEntityStatusGreen
	}

	var changes []types.PropertyChange
	str := func(name, cur, want string) {
		if cur != want {
			var v interface{}
			if want != "" {
				v = want
			}
			changes = append(changes, types.PropertyChange{Name: name, Val: v})
		}
	}
	str("guest.toolsRunningStatus", vm.Guest.ToolsRunningStatus, toolsRun)
	if vm.Guest.ToolsStatus != toolsStatus {
		changes = append(changes, types.PropertyChange{Name: "guest.toolsStatus", Val: toolsStatus})
	}
	str("guest.guestState", vm.Guest.GuestState, state)
	str("guest.ipAddress", vm.Guest.IpAddress, firstIP)
	if running && vm.Guest.HostName == "" {
		str("guest.hostName", "", vm.Name)
	}
	if !reflect.DeepEqual(vm.Guest.Net, nets) {
		var v interface{}
		if len(nets) != 0 {
			v = nets
		}
		changes = append(changes, types.PropertyChange{Name: "guest.net", Val: v})
	}
	if vm.GuestHeartbeatStatus != hb {
		changes = append(changes, types.PropertyChange{Name: "guestHeartbeatStatus", Val: hb})
	}
	if vm.Summary.Guest.ToolsStatus != toolsStatus {
		changes = append(changes, types.PropertyChange{Name: "summary.guest.toolsStatus", Val: toolsStatus})
	}
	str("summary.guest.toolsRunningStatus", vm.Summary.Guest.ToolsRunningStatus, toolsRun)
	str("summary.guest.ipAddress", vm.Summary.Guest.IpAddress, firstIP)
	if vm.Summary.QuickStats.GuestHeartbeatStatus != hb {
		changes = append(changes, types.PropertyChange{Name: "summary.quickStats.guestHeartbeatStatus", Val: hb})
	}
	if ps == types.VirtualMachinePowerStatePoweredOn && vm.Summary.Runtime.BootTime != nil &&
		(vm.Runtime.BootTime == nil || !vm.Runtime.BootTime.Equal(*vm.Summary.Runtime.BootTime)) {
		changes = append(changes, types.PropertyChange{Name: "runtime.bootTime", Val: *vm.Summary.Runtime.BootTime})
	}

	changes = append(changes, g.configChanges(vm)...)
	if len(changes) != 0 {
		simulator.Map.Update(vm, changes)
	}
}

// configChanges: property changes vCenter reports to WaitForUpdatesEx that 0.24.2's
// ReconfigVM_Task, snapshot and custom-value methods make without Map.Update (its
// ReconfigVM reports config.hardware.device only: an annotation or extraConfig change
// reached no PropertyCollector filter). Each property is compared with what this
// function saw last (a JSON fingerprint: the values are nested and shared); the first
// look at a VM only records. Runs with the VM locked, at every evaluation (a task on
// the VM ended, a change, the sweep).
func (g *guestSim) configChanges(vm *simulator.VirtualMachine) []types.PropertyChange {
	props := []struct {
		name string
		val  interface{}
	}{
		{"config.annotation", vm.Config.Annotation},
		{"config.extraConfig", vm.Config.ExtraConfig},
		{"customValue", vm.CustomValue},
		{"snapshot", vm.Snapshot},
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	seen, known := g.seen[vm.Self]
	if !known {
		seen = make(map[string]string)
		g.seen[vm.Self] = seen
	}
	var out []types.PropertyChange
	for _, p := range props {
		b, err := json.Marshal(p.val)
		if err != nil {
			continue
		}
		fp := string(b)
		if known && seen[p.name] != fp {
			out = append(out, types.PropertyChange{Name: p.name, Op: types.PropertyChangeOpAssign, Val: p.val})
		}
		seen[p.name] = fp
	}
	return out
}

func networkName(backing types.BaseVirtualDeviceBackingInfo, fallback string) string {
	switch b := backing.(type) {
	case *types.VirtualEthernetCardNetworkBackingInfo:
		if b.DeviceName != "" {
			return b.DeviceName
		}
		if b.Network != nil {
			if e, ok := simulator.Map.Get(*b.Network).(mo.Entity); ok {
				return e.Entity().Name
			}
		}
	case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
		ref := types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey}
		if e, ok := simulator.Map.Get(ref).(mo.Entity); ok {
			return e.Entity().Name
		}
	case *types.VirtualEthernetCardOpaqueNetworkBackingInfo:
		return b.OpaqueNetworkId
	}
	return fallback
}

// nicIP: customization fixed IP, else extraConfig guestinfo.vmrep.ip (NIC 0) /
// guestinfo.vmrep.ip.N (NIC N), else an address generated from the moref:
// 10.N.x.y, unique per VM for the first 65,024 morefs, stable across restarts.
func nicIP(ref types.ManagedObjectReference, nic int, custom []string, ec map[string]string) string {
	if nic < len(custom) && custom[nic] != "" {
		return custom[nic]
	}
	key := extraIP
	if nic > 0 {
		key = fmt.Sprintf("%s.%d", extraIP, nic)
	}
	if ip := strings.TrimSpace(ec[key]); ip != "" {
		return ip
	}
	var n uint32
	if i := strings.LastIndexByte(ref.Value, '-'); i >= 0 {
		if v, err := strconv.ParseUint(ref.Value[i+1:], 10, 32); err == nil {
			n = uint32(v)
		}
	}
	if n == 0 {
		h := fnv.New32a()
		_, _ = h.Write([]byte(ref.Value))
		n = h.Sum32()
	}
	n %= 254 * 256
	return fmt.Sprintf("10.%d.%d.%d", nic%256, n/254, n%254+1)
}
