package main

// A PropertyCollector whose Fetch answers an unset property with an empty
// result, as vCenter does, instead of panicking (0.24.2 indexes MissingSet[0]
// of an empty list). pyvmomi's lazy attribute access (vm.snapshot, ...) uses
// Fetch, so without this every read of an unset property dropped the
// connection.
//
// The simulator creates the per-session instance of the root collector by
// reflection on the registered type (Session.Get), so registering this type
// under the root collector's reference is enough for every session to use it.

import (
	"log"
	"reflect"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type labPropertyCollector struct {
	simulator.PropertyCollector
	u updates // WaitForUpdatesEx's own state (pc_updates.go)
}

// FetchResponse has the element name the SOAP encoder derives from the type name.
type FetchResponse struct {
	Returnval types.AnyType `xml:"returnval,omitempty,typeattr"`
}

type fetchBody struct {
	Res    *FetchResponse `xml:"FetchResponse,omitempty"`
	Fault_ *soap.Fault    `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *fetchBody) Fault() *soap.Fault { return b.Fault_ }

// Fetch takes the request as interface{}: its type lives in the simulator's
// internal package. reflect.Value.Call accepts it as long as it is assignable.
func (pc *labPropertyCollector) Fetch(ctx *simulator.Context, req interface{}) (res soap.HasFault) {
	defer func() {
		if r := recover(); r != nil {
			// The one known cause: the property exists but is unset, so the
			// collector returned neither a value nor a MissingSet entry.
			log.Printf("lab: Fetch %v: %v (answered as unset)", req, r)
			res = &fetchBody{Res: &FetchResponse{}}
		}
	}()
	m := reflect.ValueOf(&pc.PropertyCollector).MethodByName("Fetch")
	out := m.Call([]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(req)})
	return out[0].Interface().(soap.HasFault)
}

func installPropertyCollector() {
	si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	pc := &labPropertyCollector{}
	pc.Self = si.Content.PropertyCollector
	simulator.Map.Put(pc)
}
