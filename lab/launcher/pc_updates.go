package main

// WaitForUpdatesEx as vCenter answers it, on every PropertyCollector of the lab
// (the root one of each session and those made with CreatePropertyCollector).
//
// govmomi 0.24.2's collector answers a queued change by collecting the whole
// filter again (every object, every property) once per change: at 5,000 VMs a
// pass with 250 changed VMs took ~530 s in the simulator. It also ignores
// WaitOptions.maxObjectUpdates (never truncates) and echoes the version it was
// given, so a client's paging of a truncated update set was never exercised.
//
// Here, as in vCenter:
//   - a change is reported by computing only the changed object's requested
//     properties (one object, the paths the change touches), coalesced per
//     object over all changes queued since the last answer;
//   - which objects a filter covers (its traversal of a container view, folders)
//     is worked out again only when something could change it: an object was
//     created or destroyed, or a traversed property (e.g. a view's "view")
//     changed; objects that entered get all their requested properties, those
//     that left a "leave";
//   - maxObjectUpdates is honoured: the answer holds at most that many object
//     updates, `truncated` is set and its version continues with the rest
//     (asked for at once by the client);
//   - versions advance ("1", "2", ...) with every answer that carries updates;
//     a version other than "" or the last one given is InvalidCollectorVersion,
//     as is any version after the collector's queue overflowed (a client that
//     stopped polling): the client starts over with a full read;
//   - maxWaitSeconds 0 is one update calculation, answered at once (the 0.24
//     collector waited for a 250 ms tick first).

import (
	"context"
	"path"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// collectorStats: what the lab's collectors read for WaitForUpdatesEx answers since the
// last reset (control endpoint /collector): objects whose properties were read, and
// scope evaluations (a filter's traversal without properties). Tests read it to see that
// a change costs its objects, not the filter.
var collectorStats struct {
	sync.Mutex
	ObjectsRead int `json:"objects_read"`
	Scopes      int `json:"scopes"`
}

func countRead(objects, scopes int) {
	collectorStats.Lock()
	collectorStats.ObjectsRead += objects
	collectorStats.Scopes += scopes
	collectorStats.Unlock()
}

// queueLimit: changes kept for a collector nobody polls; past it the collector
// forgets them and its next WaitForUpdatesEx is InvalidCollectorVersion.
const queueLimit = 200000

type queued struct {
	ref   types.ManagedObjectReference
	kind  types.ObjectUpdateKind
	names []string // changed property names (modify)
}

// filterState: what a filter has reported so far (its objects), per collector.
type filterState struct {
	refs map[types.ManagedObjectReference]struct{}
}

type pendingUpdate struct {
	filter types.ManagedObjectReference
	update types.ObjectUpdate
}

// updates is the lab collector's own state (the 0.24 collector's is unexported).
type updates struct {
	mu       sync.Mutex
	queue    []queued
	overflow bool
	wake     chan struct{}
	cancel   context.CancelFunc
	version  int
	filters  map[types.ManagedObjectReference]*filterState
	pending  []pendingUpdate // the rest of a truncated answer
	handler  *handler        // registered with the simulator while the collector lives
}

func (u *updates) push(q queued) {
	u.mu.Lock()
	if !u.overflow {
		if len(u.queue) >= queueLimit {
			u.overflow, u.queue = true, nil
		} else {
			u.queue = append(u.queue, q)
		}
	}
	if u.wake == nil {
		u.wake = make(chan struct{}, 1)
	}
	select {
	case u.wake <- struct{}{}:
	default:
	}
	u.mu.Unlock()
}

func (u *updates) wakeChan() chan struct{} {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.wake == nil {
		u.wake = make(chan struct{}, 1)
	}
	return u.wake
}

// handler is the collector's RegisterObject (the simulator calls it on every
// Put / Update / Remove). It has a reference of its own: the simulator keys its
// handlers by reference, and every session's root collector has the same one.
type handler struct {
	self types.ManagedObjectReference
	u    *updates
}

var handlers int64
var handlersMu sync.Mutex

func (h *handler) Reference() types.ManagedObjectReference { return h.self }

func (h *handler) PutObject(o mo.Reference) {
	h.u.push(queued{ref: o.Reference(), kind: types.ObjectUpdateKindEnter})
}

func (h *handler) UpdateObject(o mo.Reference, changes []types.PropertyChange) {
	names := make([]string, len(changes))
	for i := range changes {
		names[i] = changes[i].Name
	}
	h.u.push(queued{ref: o.Reference(), kind: types.ObjectUpdateKindModify, names: names})
}

func (h *handler) RemoveObject(ref types.ManagedObjectReference) {
	h.u.push(queued{ref: ref, kind: types.ObjectUpdateKindLeave})
}

func (pc *labPropertyCollector) listen() {
	pc.u.mu.Lock()
	h := pc.u.handler
	if h == nil {
		handlersMu.Lock()
		handlers++
		n := handlers
		handlersMu.Unlock()
		h = &handler{self: types.ManagedObjectReference{Type: "LabCollectorQueue", Value: strconv.FormatInt(n, 10)}, u: &pc.u}
		pc.u.handler = h
	}
	pc.u.mu.Unlock()
	simulator.Map.AddHandler(h) // idempotent: keyed by its reference
}

func (pc *labPropertyCollector) unlisten() {
	pc.u.mu.Lock()
	h := pc.u.handler
	pc.u.handler = nil
	pc.u.queue, pc.u.pending, pc.u.filters = nil, nil, nil
	pc.u.mu.Unlock()
	if h != nil {
		simulator.Map.RemoveHandler(h)
	}
}

// CreatePropertyCollector makes a lab collector (the 0.24 one would make its own type).
func (pc *labPropertyCollector) CreatePropertyCollector(ctx *simulator.Context, c *types.CreatePropertyCollector) soap.HasFault {
	cpc := &labPropertyCollector{}
	cpc.Self = types.ManagedObjectReference{Type: "PropertyCollector"} // Session.Put fills in the value
	return &methods.CreatePropertyCollectorBody{
		Res: &types.CreatePropertyCollectorResponse{Returnval: ctx.Session.Put(cpc).Reference()},
	}
}

// CreateFilter: the changes are queued from now on.
func (pc *labPropertyCollector) CreateFilter(ctx *simulator.Context, c *types.CreateFilter) soap.HasFault {
	res := pc.PropertyCollector.CreateFilter(ctx, c)
	pc.listen()
	return res
}

func (pc *labPropertyCollector) CancelWaitForUpdates(r *types.CancelWaitForUpdates) soap.HasFault {
	pc.u.mu.Lock()
	if pc.u.cancel != nil {
		pc.u.cancel()
	}
	pc.u.mu.Unlock()
	return &methods.CancelWaitForUpdatesBody{Res: new(types.CancelWaitForUpdatesResponse)}
}

func (pc *labPropertyCollector) DestroyPropertyCollector(ctx *simulator.Context, c *types.DestroyPropertyCollector) soap.HasFault {
	pc.CancelWaitForUpdates(&types.CancelWaitForUpdates{This: c.This})
	pc.unlisten()
	return pc.PropertyCollector.DestroyPropertyCollector(ctx, c)
}

// WaitForUpdates (deprecated, still used by some clients): no options.
func (pc *labPropertyCollector) WaitForUpdates(ctx *simulator.Context, r *types.WaitForUpdates) soap.HasFault {
	body := &methods.WaitForUpdatesBody{}
	res := pc.WaitForUpdatesEx(ctx, &types.WaitForUpdatesEx{This: r.This, Version: r.Version})
	if res.Fault() != nil {
		body.Fault_ = res.Fault()
	} else if rv := res.(*methods.WaitForUpdatesExBody).Res.Returnval; rv != nil {
		body.Res = &types.WaitForUpdatesResponse{Returnval: *rv}
	}
	return body
}

func faultBody(f types.BaseMethodFault) soap.HasFault {
	return &methods.WaitForUpdatesExBody{Fault_: simulator.Fault("", f)}
}

func (pc *labPropertyCollector) WaitForUpdatesEx(ctx *simulator.Context, r *types.WaitForUpdatesEx) soap.HasFault {
	wait, cancel := context.WithCancel(context.Background())
	oneUpdate, max := false, 0
	if r.Options != nil {
		if m := r.Options.MaxWaitSeconds; m != nil {
			oneUpdate = *m == 0
			if *m > 0 {
				cancel()
				wait, cancel = context.WithTimeout(context.Background(), time.Second*time.Duration(*m))
			}
		}
		max = int(r.Options.MaxObjectUpdates) // 0 or less: no limit of ours
	}
	defer cancel()
	pc.listen()
	pc.u.mu.Lock()
	pc.u.cancel = cancel
	initial := r.Version == ""
	if !initial && (pc.u.overflow || r.Version != strconv.Itoa(pc.u.version)) {
		pc.u.mu.Unlock()
		return faultBody(new(types.InvalidCollectorVersion))
	}
	if initial { // everything again: forget what was reported and queued
		pc.u.filters, pc.u.pending, pc.u.queue, pc.u.overflow = nil, nil, nil, false
	}
	pc.u.mu.Unlock()

	wake := pc.u.wakeChan()
	for {
		found, fault := pc.compute(ctx)
		if fault != nil {
			return faultBody(fault)
		}
		if len(found) > 0 || initial {
			return pc.answer(found, max)
		}
		if oneUpdate {
			return &methods.WaitForUpdatesExBody{Res: &types.WaitForUpdatesExResponse{}}
		}
		select {
		case <-wait.Done():
			if wait.Err() == context.Canceled {
				return faultBody(new(types.RequestCanceled)) // CancelWaitForUpdates
			}
			return &methods.WaitForUpdatesExBody{Res: &types.WaitForUpdatesExResponse{}} // maxWaitSeconds
		case <-wake:
			// let a burst of changes (a task's several updates) arrive together
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// answer: at most max object updates (the rest kept for the next version).
func (pc *labPropertyCollector) answer(found []pendingUpdate, max int) soap.HasFault {
	pc.u.mu.Lock()
	defer pc.u.mu.Unlock()
	truncated := false
	if max > 0 && len(found) > max {
		pc.u.pending = append([]pendingUpdate(nil), found[max:]...)
		found, truncated = found[:max], true
	} else {
		pc.u.pending = nil
	}
	pc.u.version++
	set := &types.UpdateSet{Version: strconv.Itoa(pc.u.version), Truncated: types.NewBool(truncated)}
	byFilter := map[types.ManagedObjectReference]int{}
	for _, p := range found {
		i, ok := byFilter[p.filter]
		if !ok {
			i = len(set.FilterSet)
			byFilter[p.filter] = i
			set.FilterSet = append(set.FilterSet, types.PropertyFilterUpdate{Filter: p.filter})
		}
		set.FilterSet[i].ObjectSet = append(set.FilterSet[i].ObjectSet, p.update)
	}
	return &methods.WaitForUpdatesExBody{Res: &types.WaitForUpdatesExResponse{Returnval: set}}
}

// compute: the rest of a truncated answer if any, else what the queued changes
// (and filters not yet reported) amount to.
func (pc *labPropertyCollector) compute(ctx *simulator.Context) ([]pendingUpdate, types.BaseMethodFault) {
	pc.u.mu.Lock()
	if len(pc.u.pending) > 0 {
		p := pc.u.pending
		pc.u.mu.Unlock()
		return p, nil
	}
	queue := pc.u.queue
	pc.u.queue = nil
	if pc.u.filters == nil {
		pc.u.filters = map[types.ManagedObjectReference]*filterState{}
	}
	states := pc.u.filters
	pc.u.mu.Unlock()

	var out []pendingUpdate
	live := map[types.ManagedObjectReference]bool{}
	for _, fref := range pc.Filter {
		live[fref] = true
		f, ok := ctx.Session.Get(fref).(*simulator.PropertyFilter)
		if !ok {
			continue
		}
		st := states[fref]
		var ups []types.ObjectUpdate
		var fault types.BaseMethodFault
		if st == nil { // a new filter (or version ""): all its objects enter
			st = &filterState{refs: map[types.ManagedObjectReference]struct{}{}}
			ups, fault = pc.enterAll(ctx, f, st)
		} else if len(queue) > 0 {
			ups, fault = pc.changes(ctx, f, st, queue)
		}
		if fault != nil {
			return nil, fault
		}
		pc.u.mu.Lock()
		states[fref] = st
		pc.u.mu.Unlock()
		for _, ou := range ups {
			out = append(out, pendingUpdate{filter: fref, update: ou})
		}
	}
	pc.u.mu.Lock()
	for fref := range states {
		if !live[fref] {
			delete(states, fref) // destroyed filter
		}
	}
	pc.u.mu.Unlock()
	return out, nil
}

// retrieve: RetrievePropertiesEx of the 0.24 collector (unset values left out).
func (pc *labPropertyCollector) retrieve(ctx *simulator.Context, spec types.PropertyFilterSpec) ([]types.ObjectContent, types.BaseMethodFault) {
	res := pc.PropertyCollector.RetrievePropertiesEx(ctx, &types.RetrievePropertiesEx{This: pc.Self, SpecSet: []types.PropertyFilterSpec{spec}})
	if f := res.Fault(); f != nil {
		if mf, ok := f.VimFault().(types.BaseMethodFault); ok {
			return nil, mf
		}
		return nil, &types.SystemError{Reason: f.String}
	}
	rv := res.(*methods.RetrievePropertiesExBody).Res.Returnval
	if rv == nil {
		return nil, nil
	}
	return rv.Objects, nil
}

func enterUpdate(o types.ObjectContent) types.ObjectUpdate {
	ou := types.ObjectUpdate{Obj: o.Obj, Kind: types.ObjectUpdateKindEnter, MissingSet: o.MissingSet}
	for _, p := range o.PropSet {
		ou.ChangeSet = append(ou.ChangeSet, types.PropertyChange{Op: types.PropertyChangeOpAssign, Name: p.Name, Val: p.Val})
	}
	return ou
}

func (pc *labPropertyCollector) enterAll(ctx *simulator.Context, f *simulator.PropertyFilter, st *filterState) ([]types.ObjectUpdate, types.BaseMethodFault) {
	objs, fault := pc.retrieve(ctx, f.Spec)
	if fault != nil {
		return nil, fault
	}
	countRead(len(objs), 0)
	out := make([]types.ObjectUpdate, 0, len(objs))
	for _, o := range objs {
		if _, seen := st.refs[o.Obj]; seen {
			continue
		}
		st.refs[o.Obj] = struct{}{}
		out = append(out, enterUpdate(o))
	}
	return out, nil
}

// traversed: the property paths the filter's traversal specs follow.
func traversed(spec types.PropertyFilterSpec) []string {
	var paths []string
	var walk func([]types.BaseSelectionSpec)
	walk = func(s []types.BaseSelectionSpec) {
		for _, ss := range s {
			if ts, ok := ss.(*types.TraversalSpec); ok {
				paths = append(paths, ts.Path)
				walk(ts.SelectSet)
			}
		}
	}
	for _, o := range spec.ObjectSet {
		walk(o.SelectSet)
	}
	return paths
}

// related: a change named `change` may change the value of path `want`.
func related(change, want string) bool {
	return change == want || strings.HasPrefix(change, want+".") || strings.HasPrefix(want, change+".")
}

// moTypes caches, per managed object type name, the mo struct behind it.
var moTypes sync.Map

func moType(ref types.ManagedObjectReference) reflect.Type {
	if t, ok := moTypes.Load(ref.Type); ok {
		return t.(reflect.Type)
	}
	obj := simulator.Map.Get(ref)
	if obj == nil {
		return nil
	}
	t := reflect.TypeOf(obj).Elem()
	for path.Base(t.PkgPath()) != "mo" && t.Kind() == reflect.Struct && t.NumField() > 0 {
		t = t.Field(0).Type // the simulator's wrappers embed the mo type first
	}
	moTypes.Store(ref.Type, t)
	return t
}

// wanted: the paths the filter asks of this object (all: every property).
func wanted(f *simulator.PropertyFilter, ref types.ManagedObjectReference) (paths []string, all bool) {
	var t reflect.Type
	for _, p := range f.Spec.PropSet {
		if p.Type != ref.Type {
			if t == nil {
				t = moType(ref)
			}
			if t == nil {
				continue
			}
			if field, ok := t.FieldByName(p.Type); !(ok && field.Anonymous) {
				continue
			}
		}
		if p.All != nil && *p.All {
			all = true
		}
		paths = append(paths, p.PathSet...)
	}
	return paths, all
}

// changes: a known filter's object updates for the queued changes.
func (pc *labPropertyCollector) changes(ctx *simulator.Context, f *simulator.PropertyFilter, st *filterState, queue []queued) ([]types.ObjectUpdate, types.BaseMethodFault) {
	trav := traversed(f.Spec)
	rescope := false
	touched := map[types.ManagedObjectReference][]string{}
	var order []types.ManagedObjectReference
	left := map[types.ManagedObjectReference]bool{}
	for _, q := range queue {
		switch q.kind {
		case types.ObjectUpdateKindEnter:
			rescope = rescope || len(trav) > 0
		case types.ObjectUpdateKindLeave:
			rescope = rescope || len(trav) > 0
			if _, ok := st.refs[q.ref]; ok {
				left[q.ref] = true
			}
		case types.ObjectUpdateKindModify:
			for _, n := range q.names {
				for _, p := range trav {
					if related(n, p) {
						rescope = true
					}
				}
			}
			if _, ok := st.refs[q.ref]; ok {
				if _, seen := touched[q.ref]; !seen {
					order = append(order, q.ref)
				}
				touched[q.ref] = append(touched[q.ref], q.names...)
			}
		}
	}

	var out []types.ObjectUpdate
	var entered []types.ManagedObjectReference
	if rescope {
		// which objects the filter covers now: its traversal, no property read
		spec := types.PropertyFilterSpec{ObjectSet: f.Spec.ObjectSet, ReportMissingObjectsInResults: types.NewBool(true)}
		for _, p := range f.Spec.PropSet {
			spec.PropSet = append(spec.PropSet, types.PropertySpec{Type: p.Type})
		}
		objs, fault := pc.retrieve(ctx, spec)
		if fault != nil {
			return nil, fault
		}
		countRead(0, 1)
		now := make(map[types.ManagedObjectReference]struct{}, len(objs))
		for _, o := range objs {
			now[o.Obj] = struct{}{}
			if _, ok := st.refs[o.Obj]; !ok {
				entered = append(entered, o.Obj)
			}
		}
		for ref := range st.refs {
			if _, ok := now[ref]; !ok {
				left[ref] = true
			}
		}
	}
	for ref := range left {
		delete(st.refs, ref)
		out = append(out, types.ObjectUpdate{Obj: ref, Kind: types.ObjectUpdateKindLeave})
	}
	if len(entered) > 0 {
		spec := types.PropertyFilterSpec{PropSet: f.Spec.PropSet, ReportMissingObjectsInResults: types.NewBool(true)}
		for _, ref := range entered {
			spec.ObjectSet = append(spec.ObjectSet, types.ObjectSpec{Obj: ref, Skip: types.NewBool(false)})
		}
		objs, fault := pc.retrieve(ctx, spec)
		if fault != nil {
			return nil, fault
		}
		countRead(len(objs), 0)
		for _, o := range objs {
			st.refs[o.Obj] = struct{}{}
			out = append(out, enterUpdate(o))
		}
	}
	for _, ref := range order {
		if left[ref] {
			continue
		}
		ou, ok := pc.modified(ctx, f, ref, touched[ref])
		if !ok { // gone meanwhile: its leave
			delete(st.refs, ref)
			out = append(out, types.ObjectUpdate{Obj: ref, Kind: types.ObjectUpdateKindLeave})
			continue
		}
		if len(ou.ChangeSet) > 0 || len(ou.MissingSet) > 0 {
			out = append(out, ou)
		}
	}
	return out, nil
}

// modified: the object's requested paths that the changes touch, read now from
// this one object (all of them without partialUpdates).
func (pc *labPropertyCollector) modified(ctx *simulator.Context, f *simulator.PropertyFilter, ref types.ManagedObjectReference, names []string) (types.ObjectUpdate, bool) {
	ou := types.ObjectUpdate{Obj: ref, Kind: types.ObjectUpdateKindModify}
	paths, all := wanted(f, ref)
	var want []string
	if all || !f.PartialUpdates {
		want = paths
	} else {
		seen := map[string]bool{}
		for _, p := range paths {
			for _, n := range names {
				if !seen[p] && related(n, p) {
					seen[p] = true
					want = append(want, p)
				}
			}
		}
		if len(want) == 0 {
			return ou, true
		}
	}
	spec := types.PropertyFilterSpec{
		ObjectSet: []types.ObjectSpec{{Obj: ref, Skip: types.NewBool(false)}},
		PropSet:   []types.PropertySpec{{Type: ref.Type, PathSet: want, All: types.NewBool(all)}},
	}
	objs, fault := pc.retrieve(ctx, spec)
	if fault != nil || len(objs) == 0 {
		return ou, false
	}
	countRead(1, 0)
	got := map[string]types.AnyType{}
	for _, p := range objs[0].PropSet {
		got[p.Name] = p.Val
	}
	if all {
		for _, p := range objs[0].PropSet {
			ou.ChangeSet = append(ou.ChangeSet, types.PropertyChange{Op: types.PropertyChangeOpAssign, Name: p.Name, Val: p.Val})
		}
	} else {
		for _, p := range want {
			// an unset value is an assign without a value, as vCenter reports it
			ou.ChangeSet = append(ou.ChangeSet, types.PropertyChange{Op: types.PropertyChangeOpAssign, Name: p, Val: got[p]})
		}
	}
	ou.MissingSet = objs[0].MissingSet
	return ou, true
}
