package main

// Start-up corrections of the generated inventory.
//
// simulator.Model.Create passes one NIC object (&nic) to every VM of a host or
// resource pool, so those VMs share a single device struct: the same MAC
// address, and a change made to one VM's device in place would show on all
// of them. Each VM gets its own copy here, with a MAC address unique in the
// site (VMware's static range 00:50:56:00:00:00-00:50:56:3f:ff:ff, derived
// from the VM's moref number and the NIC's index).

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func shallowClone(v interface{}) interface{} {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Ptr || rv.IsNil() {
		return v
	}
	c := reflect.New(rv.Elem().Type())
	c.Elem().Set(rv.Elem())
	return c.Interface()
}

func labMAC(ref types.ManagedObjectReference, nic int) string {
	var n uint64
	if i := strings.LastIndexByte(ref.Value, '-'); i >= 0 {
		n, _ = strconv.ParseUint(ref.Value[i+1:], 10, 32)
	}
	return fmt.Sprintf("00:50:56:%02x:%02x:%02x", (n>>12)&0x3f, (n>>4)&0xff, ((n&0xf)<<4)|uint64(nic&0xf))
}

func dealiasNICs() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		simulator.Map.WithLock(vm, func() {
			if vm.Config == nil {
				return
			}
			nic := 0
			for i, d := range vm.Config.Hardware.Device {
				if _, ok := d.(types.BaseVirtualEthernetCard); !ok {
					continue
				}
				c := shallowClone(d).(types.BaseVirtualDevice)
				card := c.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
				if card.Connectable != nil {
					conn := *card.Connectable
					card.Connectable = &conn
				}
				if card.Backing != nil {
					card.Backing = shallowClone(card.Backing).(types.BaseVirtualDeviceBackingInfo)
				}
				card.MacAddress = labMAC(vm.Self, nic)
				card.AddressType = string(types.VirtualEthernetCardMacTypeAssigned)
				vm.Config.Hardware.Device[i] = c
				nic++
			}
		})
	}
}
