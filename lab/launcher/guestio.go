package main

// Guest I/O and change tracking controls on the control endpoint:
//
//	POST /guest/write?vm=NAME&disk=N&offset=BYTES   body -> {"written": n} once fsynced
//	GET  /guest/read?vm=NAME&disk=N&offset=BYTES&length=BYTES
//	GET  /guest/disks?vm=NAME                       the VM's disks in controller order
//	POST /cbt/reset?vm=NAME&disk=N                  forget the disk's change ids
//	GET|POST /cbt/max-areas  {"n": N}               areas per QueryChangedDiskAreas answer
//
// vm is a VM name (or a moref value such as vm-52); disk is 0-based in
// controller order (bus, controller, unit).

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const maxGuestIO = 256 << 20

type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func errorf(status int, format string, args ...interface{}) error {
	return &httpError{status, fmt.Sprintf(format, args...)}
}

// findVM: by moref value, else by name; of several VMs with the name, the one
// powered on.
func findVM(name string) (*simulator.VirtualMachine, error) {
	if name == "" {
		return nil, errorf(http.StatusBadRequest, "vm is required")
	}
	if vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: name}).(*simulator.VirtualMachine); ok {
		return vm, nil
	}
	var all, on []*simulator.VirtualMachine
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		var n string
		var ps types.VirtualMachinePowerState
		simulator.Map.WithLock(vm, func() { n, ps = vm.Name, vm.Runtime.PowerState })
		if n == name {
			all = append(all, vm)
			if ps == types.VirtualMachinePowerStatePoweredOn {
				on = append(on, vm)
			}
		}
	}
	switch {
	case len(all) == 1:
		return all[0], nil
	case len(on) == 1:
		return on[0], nil
	case len(all) == 0:
		return nil, errorf(http.StatusNotFound, "no VM named %q", name)
	}
	return nil, errorf(http.StatusConflict, "%d VMs are named %q: give vm as a moref (vm-N)", len(all), name)
}

func intParam(r *http.Request, name string, required bool) (int64, error) {
	s := r.URL.Query().Get(name)
	if s == "" {
		if required {
			return 0, errorf(http.StatusBadRequest, "%s is required", name)
		}
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, errorf(http.StatusBadRequest, "%s: not a non-negative integer: %q", name, s)
	}
	return n, nil
}

// withDisk runs fn with the VM's disk mutex held and the chosen disk's state.
func (l *lab) withDisk(r *http.Request, fn func(vm *simulator.VirtualMachine, power types.VirtualMachinePowerState, ds *diskState, idx int) error) error {
	vm, err := findVM(r.URL.Query().Get("vm"))
	if err != nil {
		return err
	}
	idx, err := intParam(r, "disk", true)
	if err != nil {
		return err
	}
	v := l.disks.vm(vm.Self)
	v.mu.Lock()
	defer v.mu.Unlock()
	descs, power, tracking, err := vmInfo(vm)
	if err != nil {
		return errorf(http.StatusInternalServerError, "%v", err)
	}
	v.refresh(descs, tracking)
	if int(idx) >= len(descs) {
		return errorf(http.StatusNotFound, "VM %s has %d disk(s); no disk %d", vm.Name, len(descs), idx)
	}
	return fn(vm, power, v.disks[descs[idx].key], int(idx))
}

func writeErr(w http.ResponseWriter, err error) {
	var he *httpError
	if errors.As(err, &he) {
		writeJSON(w, he.status, map[string]string{"error": he.msg})
		return
	}
	writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
}

func (l *lab) registerDiskControls(mux *http.ServeMux) {
	registerServed(mux)
	mux.HandleFunc("/guest/write", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost && r.Method != http.MethodPut {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		off, err := intParam(r, "offset", true)
		if err != nil {
			writeErr(w, err)
			return
		}
		// The body is read before the VM is locked: a slow client does not stall its snapshot.
		data, err := io.ReadAll(io.LimitReader(r.Body, maxGuestIO+1))
		if err != nil {
			writeErr(w, errorf(http.StatusBadRequest, "reading the body: %v", err))
			return
		}
		if len(data) > maxGuestIO {
			writeErr(w, errorf(http.StatusRequestEntityTooLarge, "at most %d bytes per write", maxGuestIO))
			return
		}
		err = l.withDisk(r, func(vm *simulator.VirtualMachine, power types.VirtualMachinePowerState, ds *diskState, idx int) error {
			if power != types.VirtualMachinePowerStatePoweredOn {
				return errorf(http.StatusConflict, "VM %s is %s: only a running guest writes", vm.Name, power)
			}
			if off+int64(len(data)) > ds.capacity {
				return errorf(http.StatusRequestedRangeNotSatisfiable, "write of %d bytes at %d ends past disk %d's capacity %d",
					len(data), off, idx, ds.capacity)
			}
			return ds.write(off, data)
		})
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]int{"written": len(data)})
	})

	mux.HandleFunc("/guest/read", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		off, err := intParam(r, "offset", true)
		if err == nil {
			var n int64
			if n, err = intParam(r, "length", true); err == nil {
				var data []byte
				err = l.withDisk(r, func(vm *simulator.VirtualMachine, _ types.VirtualMachinePowerState, ds *diskState, idx int) error {
					if n > maxGuestIO {
						return errorf(http.StatusRequestEntityTooLarge, "at most %d bytes per read", maxGuestIO)
					}
					if off+n > ds.capacity {
						return errorf(http.StatusRequestedRangeNotSatisfiable, "read of %d bytes at %d ends past disk %d's capacity %d",
							n, off, idx, ds.capacity)
					}
					var e error
					data, e = ds.readAt(ds.cur, off, int(n))
					return e
				})
				if err == nil {
					w.Header().Set("Content-Type", "application/octet-stream")
					w.Header().Set("Content-Length", strconv.Itoa(len(data)))
					w.WriteHeader(http.StatusOK)
					_, _ = w.Write(data)
					return
				}
			}
		}
		writeErr(w, err)
	})

	mux.HandleFunc("/guest/disks", func(w http.ResponseWriter, r *http.Request) {
		vm, err := findVM(r.URL.Query().Get("vm"))
		if err != nil {
			writeErr(w, err)
			return
		}
		descs, power, tracking, err := vmInfo(vm)
		if err != nil {
			writeErr(w, err)
			return
		}
		type disk struct {
			Index    int    `json:"index"`
			Key      int32  `json:"key"`
			Bus      int32  `json:"bus"`
			Unit     int32  `json:"unit"`
			Label    string `json:"label"`
			File     string `json:"file"`
			Capacity int64  `json:"capacity"`
		}
		out := struct {
			VM             string `json:"vm"`
			Moref          string `json:"moref"`
			PowerState     string `json:"power_state"`
			ChangeTracking bool   `json:"change_tracking"`
			Disks          []disk `json:"disks"`
		}{VM: r.URL.Query().Get("vm"), Moref: vm.Self.Value, PowerState: string(power), ChangeTracking: tracking}
		for i, d := range descs {
			out.Disks = append(out.Disks, disk{i, d.key, d.bus, d.unit, d.label, d.file, d.capacity})
		}
		writeJSON(w, http.StatusOK, out)
	})

	mux.HandleFunc("/cbt/reset", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		err := l.withDisk(r, func(vm *simulator.VirtualMachine, _ types.VirtualMachinePowerState, ds *diskState, idx int) error {
			if ds.cbt == nil {
				return errorf(http.StatusConflict, "change tracking is off for VM %s", vm.Name)
			}
			ds.cbt.reset()
			return nil
		})
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]bool{"reset": true})
	})

	mux.HandleFunc("/cbt/max-areas", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			writeJSON(w, http.StatusOK, map[string]int{"n": l.disks.areasPerCall()})
		case http.MethodPost, http.MethodPut:
			var in struct {
				N *int `json:"n"`
			}
			if err := json.NewDecoder(r.Body).Decode(&in); err != nil || in.N == nil || *in.N < 1 {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": `expected {"n": N} with N >= 1`})
				return
			}
			l.disks.mu.Lock()
			l.disks.maxAreas = *in.N
			l.disks.mu.Unlock()
			writeJSON(w, http.StatusOK, map[string]int{"n": *in.N})
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})
}
