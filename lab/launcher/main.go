// Command vcsim-lab runs one vSphere site of the vmrep lab: the govmomi 0.24.2
// vCenter simulator behind a generated TLS certificate, with vAPI tagging, a
// guest (VMware Tools) simulation, session-checked datastore file access and a
// control endpoint for fault injection. See README.md in this folder.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // registers the vAPI (tagging) endpoints
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

type readyInfo struct {
	URL        string            `json:"url"`
	Host       string            `json:"host"`
	ControlURL string            `json:"control_url"`
	PID        int               `json:"pid"`
	CAFile     string            `json:"ca_file"`
	Thumbprint string            `json:"thumbprint"`
	Datastores map[string]string `json:"datastores"`
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "vcsim-lab: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address of the vCenter (SOAP/HTTPS) endpoint; port 0 picks a free port")
	controlListen := flag.String("control-listen", "127.0.0.1:0", "address of the plain-HTTP control endpoint")
	dc := flag.Int("dc", 1, "datacenters")
	cluster := flag.Int("cluster", 1, "clusters per datacenter")
	clusterHost := flag.Int("cluster-host", 2, "hosts per cluster")
	host := flag.Int("host", 1, "standalone hosts per datacenter")
	vm := flag.Int("vm", 2, "VMs per resource pool (cluster pool and each standalone host)")
	ds := flag.Int("ds", 2, "local datastores per datacenter (temp directories)")
	pg := flag.Int("pg", 1, "distributed port groups per datacenter")
	autostart := flag.Bool("autostart", true, "power on the model's VMs at start")
	bootDelay := flag.Duration("boot-delay", time.Second, "time from power-on until a VM's tools run and it reports its IP")
	shutdownDelay := flag.Duration("shutdown-delay", 500*time.Millisecond, "time from an accepted ShutdownGuest/RebootGuest until it happens")
	tlsDir := flag.String("tls-dir", "", "directory for ca.pem (required)")
	stateFile := flag.String("state-file", "", "also write the READY json to this file (removed on exit)")
	username := flag.String("username", "", "the only user that may log in (default: any non-empty user/password, as vcsim)")
	passwordFile := flag.String("password-file", "", "file holding the password of -username (so it is not on the command line)")
	cbtMaxAreas := flag.Int("cbt-max-areas", 64, "QueryChangedDiskAreas: at most this many areas per answer")
	logFile := flag.String("log", "", "simulator log file (default: stderr; \"off\" discards it)")
	flag.Parse()

	if *tlsDir == "" {
		fatalf("-tls-dir is required")
	}
	if flag.NArg() != 0 {
		fatalf("unexpected arguments: %v", flag.Args())
	}
	for name, v := range map[string]int{"dc": *dc, "cluster": *cluster, "cluster-host": *clusterHost, "host": *host, "vm": *vm, "ds": *ds, "pg": *pg} {
		if v < 0 {
			fatalf("-%s must be >= 0", name)
		}
	}
	if *dc < 1 || *ds < 1 {
		fatalf("-dc and -ds must be >= 1")
	}

	switch *logFile {
	case "":
	case "off":
		log.SetOutput(io.Discard)
	default:
		f, err := os.OpenFile(*logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			fatalf("log: %v", err)
		}
		log.SetOutput(f)
	}

	start := time.Now()

	// From here on SIGTERM/SIGINT are queued, and handled once ready, so that
	// the model's temp directories are removed even when stopped early.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)

	labCert, err := newLabTLS(*tlsDir)
	if err != nil {
		fatalf("tls: %v", err)
	}

	model := simulator.VPX()
	model.Datacenter = *dc
	model.Cluster = *cluster
	model.ClusterHost = *clusterHost
	model.Host = *host
	model.Machine = *vm
	model.Datastore = *ds
	model.Portgroup = *pg
	model.Autostart = *autostart
	if err := model.Create(); err != nil {
		model.Remove()
		fatalf("model: %v", err)
	}

	log.Printf("lab: model created in %s", time.Since(start).Round(time.Millisecond))

	installPropertyCollector()
	dealiasNICs()

	guest := newGuestSim(*bootDelay)
	simulator.Map.AddHandler(guest)
	guest.evaluateAll()

	model.Service.TLS = labCert.config
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		// With Listen.User set, the simulator's SessionManager accepts only these
		// credentials: wrong ones get InvalidLogin, as from a real vCenter.
		pw, err := os.ReadFile(*passwordFile)
		if err != nil {
			fatalf("-password-file: %v", err)
		}
		model.Service.Listen.User = url.UserPassword(*username, strings.TrimSpace(string(pw)))
	}
	model.Service.RegisterEndpoints = true
	srv := model.Service.NewServer()

	client, err := vim25.NewClient(context.Background(), model.Service)
	if err != nil {
		model.Remove()
		fatalf("in-process client: %v", err)
	}

	l := newLab(srv.Config.Handler, client, guest)
	l.shutdownDelay = *shutdownDelay
	if *cbtMaxAreas < 1 {
		fatalf("-cbt-max-areas must be >= 1")
	}
	l.disks.maxAreas = *cbtMaxAreas
	// Nobody knows the port yet, so no request can be in flight: swap the
	// simulator's mux for the lab's front handler.
	srv.Config.Handler = l

	ctl, err := net.Listen("tcp", *controlListen)
	if err != nil {
		model.Remove()
		fatalf("control listener: %v", err)
	}

	info := readyInfo{
		URL:        "https://" + srv.URL.Host + vim25.Path,
		Host:       srv.URL.Host,
		ControlURL: "http://" + ctl.Addr().String(),
		PID:        os.Getpid(),
		CAFile:     labCert.caFile,
		Thumbprint: labCert.thumbprint,
		Datastores: datastoreDirs(),
	}

	// The site switch (/site) beside the other controls: it must answer while the
	// vCenter endpoint is down.
	site := newSiteSwitch(srv)
	ctlMux := http.NewServeMux()
	site.register(ctlMux)
	ctlMux.Handle("/", l.controlHandler(func() interface{} { return info }))
	ctlSrv := &http.Server{Handler: ctlMux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = ctlSrv.Serve(ctl) }()

	stop := make(chan struct{})
	go guest.run(stop)

	js, _ := json.Marshal(info)
	if *stateFile != "" {
		if err := writeFileAtomic(*stateFile, append(js, '\n')); err != nil {
			model.Remove()
			fatalf("state file: %v", err)
		}
	}
	log.Printf("lab: ready in %s", time.Since(start).Round(time.Millisecond))
	fmt.Printf("VCSIM_READY %s\n", js)
	_ = os.Stdout.Sync()

	s := <-sig
	log.Printf("lab: %s, stopping", s)

	close(stop)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = ctlSrv.Shutdown(ctx)
	cancel()
	done := make(chan struct{})
	go func() {
		srv.CloseClientConnections()
		srv.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		log.Printf("lab: in-flight requests did not finish, exiting anyway")
	}
	model.Remove()
	if *stateFile != "" {
		_ = os.Remove(*stateFile)
	}
	os.Exit(0)
}

// datastoreDirs maps each datastore to its local directory. Keys are the
// datastore names; with several datacenters (where names repeat) they are
// "<datacenter>/<datastore>".
func datastoreDirs() map[string]string {
	type entry struct{ dc, name, dir string }
	var all []entry
	names := make(map[string]int)
	for _, e := range simulator.Map.All("Datastore") {
		d := e.(*simulator.Datastore)
		all = append(all, entry{dcName(d.Parent), d.Name, d.Info.GetDatastoreInfo().Url})
		names[d.Name]++
	}
	sort.Slice(all, func(i, j int) bool { return all[i].dc+"/"+all[i].name < all[j].dc+"/"+all[j].name })
	dup := false
	for _, n := range names {
		dup = dup || n > 1
	}
	out := make(map[string]string, len(all))
	for _, x := range all {
		key := x.name
		if dup {
			key = x.dc + "/" + x.name
		}
		out[key] = x.dir
	}
	return out
}

func dcName(parent *types.ManagedObjectReference) string {
	for parent != nil {
		obj := simulator.Map.Get(*parent)
		if dc, ok := obj.(*simulator.Datacenter); ok {
			return dc.Name
		}
		e, ok := obj.(mo.Entity)
		if !ok {
			break
		}
		parent = e.Entity().Parent
	}
	return ""
}

func writeFileAtomic(name string, data []byte) error {
	dir := filepath.Dir(name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".vcsim-lab-state-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), name)
}
