package main

// The front handler of the vCenter endpoint: wraps the simulator's ServeMux to
// add call counting, fault injection, panic recovery, session strictness,
// datastore file authentication and the guest-related method overrides.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type faultRule struct {
	ID        int    `json:"id"`
	Method    string `json:"method"`
	Action    string `json:"action"`
	Fault     string `json:"fault,omitempty"`
	DelayMS   int    `json:"delay_ms"`
	Count     int    `json:"count"` // remaining; 0 = until cleared
	Match     string `json:"match,omitempty"`
	Hits      int    `json:"hits"`
	unlimited bool
}

type lab struct {
	mux           http.Handler // the simulator's ServeMux
	client        *vim25.Client
	guest         *guestSim
	disks         *diskLab // disk layers (snapshots), guest I/O, change tracking
	shutdownDelay time.Duration

	mu       sync.Mutex
	calls    map[string]int
	rules    []*faultRule
	nextID   int
	sessions map[string]bool // session keys (cookie values) of logged-in sessions
	epoch    int             // incremented by every DELETE /sessions
}

func newLab(mux http.Handler, client *vim25.Client, guest *guestSim) *lab {
	return &lab{
		mux:           mux,
		client:        client,
		guest:         guest,
		disks:         newDiskLab(64),
		shutdownDelay: 500 * time.Millisecond,
		calls:         make(map[string]int),
		sessions:      make(map[string]bool),
	}
}

// --- bookkeeping --------------------------------------------------------------

func (l *lab) count(method string) {
	l.mu.Lock()
	l.calls[method]++
	l.mu.Unlock()
}

func (l *lab) takeRule(method string, subject []byte) *faultRule {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, r := range l.rules {
		switch {
		case r.Method == method:
		case r.Method == "*" && !strings.HasPrefix(method, "DatastoreFile."):
		case r.Method == "DatastoreFile.*" && strings.HasPrefix(method, "DatastoreFile."):
		default:
			continue
		}
		if r.Match != "" && !bytes.Contains(subject, []byte(r.Match)) {
			continue
		}
		r.Hits++
		if !r.unlimited {
			r.Count--
			if r.Count <= 0 {
				l.rules = append(l.rules[:i], l.rules[i+1:]...)
			}
		}
		c := *r
		return &c
	}
	return nil
}

func (l *lab) sessionValid(r *http.Request) (string, bool) {
	c, err := r.Cookie(soap.SessionCookieName)
	if err != nil || c.Value == "" {
		return "", false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return c.Value, l.sessions[c.Value]
}

// dropSessions terminates every session the simulator knows (as a vCenter
// restart would) and returns how many there were.
func (l *lab) dropSessions(ctx context.Context) (int, error) {
	// A login racing with this is either listed below (and terminated) or
	// sees the new epoch when it records its session (and terminates it
	// itself): the simulator and l.sessions never disagree about a session.
	l.mu.Lock()
	l.epoch++
	known := make([]string, 0, len(l.sessions))
	for k := range l.sessions {
		known = append(known, k)
	}
	l.mu.Unlock()

	smRef := *l.client.ServiceContent.SessionManager
	var sm mo.SessionManager
	if err := property.DefaultCollector(l.client).RetrieveOne(ctx, smRef, []string{"sessionList"}, &sm); err != nil {
		return 0, err
	}
	n := 0
	for _, s := range sm.SessionList {
		if l.terminate(ctx, s.Key) {
			n++
		}
		known = append(known, s.Key)
	}
	l.mu.Lock()
	for _, k := range known {
		delete(l.sessions, k)
	}
	l.mu.Unlock()
	return n + l.dropRESTSessions(), nil
}

func (l *lab) terminate(ctx context.Context, key string) bool {
	smRef := *l.client.ServiceContent.SessionManager
	_, err := methods.TerminateSession(ctx, l.client, &types.TerminateSession{This: smRef, SessionId: []string{key}})
	return err == nil
}

// dropRESTSessions clears the vAPI (REST, /rest) simulator's sessions. Its
// handler type is unexported; it is reached through the mux and its exported
// Session map, under its own mutex (the one its handlers hold).
func (l *lab) dropRESTSessions() (n int) {
	mux, ok := l.mux.(*http.ServeMux)
	if !ok {
		return 0
	}
	h, _ := mux.Handler(&http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/rest/com/vmware/cis/session"}})
	locker, ok := h.(sync.Locker)
	if !ok {
		return 0
	}
	v := reflect.ValueOf(h)
	if v.Kind() != reflect.Ptr || v.Elem().Kind() != reflect.Struct {
		return 0
	}
	f := v.Elem().FieldByName("Session")
	if !f.IsValid() || f.Kind() != reflect.Map || !f.CanSet() {
		return 0
	}
	locker.Lock()
	defer locker.Unlock()
	n = f.Len()
	f.Set(reflect.MakeMap(f.Type()))
	return n
}

// --- HTTP entry point ---------------------------------------------------------

func (l *lab) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPost && (r.URL.Path == vim25.Path || r.URL.Path == vim25.Path+"/vimService"):
		l.serveSOAP(w, r)
	case strings.HasPrefix(r.URL.Path, "/folder/") || r.URL.Path == "/folder":
		l.serveFolder(w, r)
	default:
		defer func() {
			if p := recover(); p != nil {
				log.Printf("lab: panic serving %s %s: %v\n%s", r.Method, r.URL.Path, p, debug.Stack())
				http.Error(w, fmt.Sprintf("vcsim panic: %v", p), http.StatusInternalServerError)
			}
		}()
		l.mux.ServeHTTP(w, r)
	}
}

// applyRule performs an injected action; it returns true when the request has
// been answered (or dropped) and must not be served.
func (l *lab) applyRule(w http.ResponseWriter, rule *faultRule, method string, body []byte, file bool) bool {
	switch rule.Action {
	case "delay":
		time.Sleep(time.Duration(rule.DelayMS) * time.Millisecond)
		return false
	case "drop":
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return true
			}
		}
		panic(http.ErrAbortHandler) // closes the connection without a response
	case "http503":
		http.Error(w, "Service Unavailable (injected by the lab)", http.StatusServiceUnavailable)
		return true
	case "fault":
		msg := fmt.Sprintf("%s (injected by the lab into %s)", rule.Fault, method)
		if file {
			status := map[string]int{
				"NotAuthenticated": http.StatusUnauthorized, "NotFound": http.StatusNotFound,
				"InvalidArgument": http.StatusBadRequest, "InvalidState": http.StatusConflict,
				"TaskInProgress": http.StatusConflict, "HostCommunication": http.StatusBadGateway,
			}[rule.Fault]
			if status == 0 {
				status = http.StatusInternalServerError
			}
			http.Error(w, msg, status)
			return true
		}
		writeSOAPFault(w, msg, injectableFaults[rule.Fault](msg, soapThis(body)))
		return true
	}
	return false
}

// --- SOAP ---------------------------------------------------------------------

// recorder buffers a response so that a panic half-way through can still be
// answered with a fault, and so that follow-up work (guest state after a power
// operation) is done before the client sees the answer.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}
func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.body.Write(b)
}

// unauthenticatedReads: the simulator lets these through without a session
// (answering empty property sets); vCenter answers NotAuthenticated unless
// only the SessionManager is read (pyVim's session check reads currentSession).
var unauthenticatedReads = map[string]bool{"RetrieveProperties": true, "RetrievePropertiesEx": true, "Fetch": true}

var powerMethods = map[string]bool{
	"PowerOnVM_Task": true, "PowerOffVM_Task": true, "SuspendVM_Task": true, "ResetVM_Task": true,
	"ReconfigVM_Task": true, "CustomizeVM_Task": true, "ShutdownGuest": true, "MarkAsVirtualMachine": true,
}

func (l *lab) serveSOAP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	method := soapMethodName(body)
	if method == "" {
		method = "(unparsed)"
	}
	l.count(method)

	rule := l.takeRule(method, body)
	if rule != nil && l.applyRule(w, rule, method, body, false) {
		return
	}
	// drop-reply: the call is served (the VM is made, the task runs), then the reply is
	// lost with the connection, as when a network drops after vCenter acted.
	dropReply := rule != nil && rule.Action == "drop-reply"

	cookie, authed := l.sessionValid(r)
	this := soapThis(body)

	if !authed && method == "Fetch" && this.Type == "SessionManager" && fetchProp(body) == "currentSession" {
		// vCenter: no session, no current session (pyVim's session check relies on it)
		writeSOAPResponse(w, &fetchBody{Res: &FetchResponse{}})
		return
	}
	if !authed && unauthenticatedReads[method] && !onlySessionManager(method, this, body) {
		writeSOAPFault(w, "The session is not authenticated.", &types.NotAuthenticated{
			NoPermission: types.NoPermission{Object: this, PrivilegeId: "System.View"},
		})
		return
	}

	if authed {
		switch method {
		case "ShutdownGuest", "RebootGuest":
			if l.guestOp(w, method, this) {
				return
			}
		case "QueryChangedDiskAreas":
			l.serveQueryChangedDiskAreas(w, body)
			return
		}
	}

	var preCustom string
	if method == "CustomizeVM_Task" {
		preCustom = pendingCustomization(this)
		// The simulator checks the spec's NIC count against guest.net, which the guest
		// simulation fills in shortly after CreateVM: fill it in now, so a CustomizeVM
		// right after CreateVM is judged as a vCenter would (by the VM's NICs).
		l.guest.evaluate(this)
	}

	l.mu.Lock()
	epoch := l.epoch
	l.mu.Unlock()

	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	rec := &recorder{header: make(http.Header)}
	diskDone := l.diskHook(method, this)
	p := l.serveRecovered(rec, r)
	diskDone(p == nil && (rec.status == 0 || rec.status == http.StatusOK), rec.body.Bytes())
	if p != nil {
		log.Printf("lab: panic in %s on %s: %v\n%s", method, this, p.value, p.stack)
		msg := fmt.Sprintf("vcsim panic in %s: %v", method, p.value)
		writeSOAPFault(w, msg, &types.SystemError{Reason: msg})
		return
	}

	// session bookkeeping
	for _, c := range (&http.Response{Header: rec.header}).Cookies() {
		if c.Name == soap.SessionCookieName && c.Value != "" {
			l.mu.Lock()
			current := l.epoch == epoch
			if current {
				l.sessions[c.Value] = true
			}
			l.mu.Unlock()
			if !current { // a DELETE /sessions ran meanwhile: this login did not survive it
				l.terminate(context.Background(), c.Value)
			}
		}
	}
	if rec.status == http.StatusOK {
		switch method {
		case "Logout":
			l.mu.Lock()
			delete(l.sessions, cookie)
			l.mu.Unlock()
		case "TerminateSession":
			if m, err := simulator.UnmarshalBody(types.TypeFunc(), body); err == nil {
				if req, ok := m.Body.(*types.TerminateSession); ok {
					l.mu.Lock()
					for _, id := range req.SessionId {
						delete(l.sessions, id)
					}
					l.mu.Unlock()
				}
			}
		case "CustomizeVM_Task":
			if post := pendingCustomization(this); post != "" && post != preCustom {
				if m, err := simulator.UnmarshalBody(types.TypeFunc(), body); err == nil {
					if req, ok := m.Body.(*types.CustomizeVM_Task); ok {
						l.guest.recordCustomization(this, post, &req.Spec)
					}
				}
			}
		}
	}
	if powerMethods[method] && this.Type == "VirtualMachine" {
		l.guest.evaluate(this)
	}

	if dropReply {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	w.WriteHeader(rec.status)
	_, _ = w.Write(rec.body.Bytes())
}

type recovered struct {
	value interface{}
	stack []byte
}

func (l *lab) serveRecovered(w http.ResponseWriter, r *http.Request) (p *recovered) {
	defer func() {
		if v := recover(); v != nil {
			p = &recovered{value: v, stack: debug.Stack()}
		}
	}()
	l.mux.ServeHTTP(w, r)
	return nil
}

func onlySessionManager(method string, this types.ManagedObjectReference, body []byte) bool {
	if method == "Fetch" {
		return this.Type == "SessionManager" || this.Type == "ServiceInstance"
	}
	m, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		return false
	}
	var specs []types.PropertyFilterSpec
	switch req := m.Body.(type) {
	case *types.RetrievePropertiesEx:
		specs = req.SpecSet
	case *types.RetrieveProperties:
		specs = req.SpecSet
	}
	if len(specs) == 0 {
		return false
	}
	for _, s := range specs {
		for _, o := range s.ObjectSet {
			if o.Obj.Type != "SessionManager" || len(o.SelectSet) != 0 {
				return false
			}
		}
	}
	return true
}

func fetchProp(body []byte) string {
	m, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		return ""
	}
	v := reflect.ValueOf(m.Body)
	if v.Kind() == reflect.Ptr {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return ""
	}
	if f := v.FieldByName("Prop"); f.IsValid() && f.Kind() == reflect.String {
		return f.String()
	}
	return ""
}

func pendingCustomization(ref types.ManagedObjectReference) string {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return ""
	}
	var key string
	simulator.Map.WithLock(vm, func() {
		if vm.Config != nil && vm.Config.Tools != nil {
			key = vm.Config.Tools.PendingCustomization
		}
	})
	return key
}

// guestOp implements ShutdownGuest and RebootGuest the way VMware Tools do:
// refused with ToolsUnavailable unless tools run; otherwise accepted at once
// and carried out shortly after. Returns false to let the simulator answer.
func (l *lab) guestOp(w http.ResponseWriter, method string, ref types.ManagedObjectReference) bool {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	var ps types.VirtualMachinePowerState
	var tools string
	simulator.Map.WithLock(vm, func() {
		ps = vm.Runtime.PowerState
		if vm.Guest != nil {
			tools = vm.Guest.ToolsRunningStatus
		}
	})
	if ps != types.VirtualMachinePowerStatePoweredOn {
		writeSOAPFault(w, fmt.Sprintf("The attempted operation cannot be performed in the current state (%s).", ps),
			&types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOn, ExistingState: ps})
		return true
	}
	if tools != toolsRunning {
		writeSOAPFault(w, "Cannot complete operation because VMware Tools is not running in this virtual machine.",
			&types.ToolsUnavailable{})
		return true
	}

	delay := l.shutdownDelay
	if method == "ShutdownGuest" {
		writeSOAPResponse(w, &methods.ShutdownGuestBody{Res: &types.ShutdownGuestResponse{}})
		go func() {
			time.Sleep(delay)
			ctx := context.Background()
			if _, err := methods.ShutdownGuest(ctx, l.client, &types.ShutdownGuest{This: ref}); err != nil {
				log.Printf("lab: ShutdownGuest %s: %v", ref, err)
			}
			l.guest.evaluate(ref)
		}()
		return true
	}

	writeSOAPResponse(w, &methods.RebootGuestBody{Res: &types.RebootGuestResponse{}})
	go func() {
		time.Sleep(delay)
		vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
		if !ok {
			return
		}
		simulator.Map.WithLock(vm, func() {
			if vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
				now := time.Now()
				simulator.Map.Update(vm, []types.PropertyChange{{Name: "summary.runtime.bootTime", Val: now}})
			}
		})
		l.guest.evaluate(ref)
	}()
	return true
}

// --- datastore files (/folder) -----------------------------------------------

func (l *lab) serveFolder(w http.ResponseWriter, r *http.Request) {
	method := "DatastoreFile." + r.Method
	l.count(method)
	if rule := l.takeRule(method, []byte(r.URL.RequestURI())); rule != nil && l.applyRule(w, rule, method, nil, true) {
		return
	}

	if _, ok := l.sessionValid(r); !ok {
		w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
		http.Error(w, "401 Unauthorized: a valid vmware_soap_session cookie is required", http.StatusUnauthorized)
		return
	}

	rel := strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, "/folder"), "/")
	for _, seg := range strings.Split(rel, "/") {
		if seg == ".." {
			http.Error(w, "invalid path", http.StatusBadRequest)
			return
		}
	}

	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			log.Printf("lab: panic serving %s %s: %v\n%s", r.Method, r.URL.Path, p, debug.Stack())
			http.Error(w, fmt.Sprintf("vcsim panic: %v", p), http.StatusInternalServerError)
		}
	}()

	if r.Method == http.MethodDelete {
		l.deleteDatastoreFile(w, r, rel)
		return
	}
	if r.Method == http.MethodPut {
		l.putDatastoreFile(w, r, rel)
		return
	}
	l.mux.ServeHTTP(countServed(w, r), r)
}

func (l *lab) datastoreDir(ctx context.Context, dcPath, dsName string) (string, error) {
	finder := find.NewFinder(l.client, false)
	dc, err := finder.DatacenterOrDefault(ctx, dcPath)
	if err != nil {
		return "", err
	}
	finder.SetDatacenter(dc)
	ds, err := finder.DatastoreOrDefault(ctx, dsName)
	if err != nil {
		return "", err
	}
	obj, ok := simulator.Map.Get(ds.Reference()).(*simulator.Datastore)
	if !ok {
		return "", fmt.Errorf("datastore %s not found", dsName)
	}
	return obj.Info.GetDatastoreInfo().Url, nil
}

// datastoreFile resolves a /folder request (dcPath, dsName, the path below the
// datastore) to a local file, answering the request itself when it cannot: 404
// for an unknown datacenter or datastore, 400 (with rootRefusal) for the
// datastore's root. ok is false when the request was answered.
func (l *lab) datastoreFile(w http.ResponseWriter, r *http.Request, rel, rootRefusal string) (p string, ok bool) {
	q := r.URL.Query()
	dir, err := l.datastoreDir(r.Context(), q.Get("dcPath"), q.Get("dsName"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return "", false
	}
	rel = path.Clean("/" + rel)
	if rel == "/" {
		http.Error(w, rootRefusal, http.StatusBadRequest)
		return "", false
	}
	return filepath.Join(dir, filepath.FromSlash(rel)), true
}

func (l *lab) deleteDatastoreFile(w http.ResponseWriter, r *http.Request, rel string) {
	p, ok := l.datastoreFile(w, r, rel, "refusing to delete the datastore root")
	if !ok {
		return
	}
	if _, err := os.Stat(p); err != nil {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	if err := os.Remove(p); err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// --- JSON helpers -------------------------------------------------------------

func writeJSON(w http.ResponseWriter, status int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
