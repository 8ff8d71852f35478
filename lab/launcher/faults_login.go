package main

// An injectable InvalidLogin, for a site that refuses the login (as vCenter does for a
// wrong, locked or disabled account) without changing the lab's password:
// POST /faults {"method": "Login", "fault": "InvalidLogin", "count": 0}.

import "github.com/vmware/govmomi/vim25/types"

func init() { registerInvalidLoginFault() }

func registerInvalidLoginFault() {
	injectableFaults["InvalidLogin"] = func(string, types.ManagedObjectReference) types.BaseMethodFault {
		return &types.InvalidLogin{}
	}
}
