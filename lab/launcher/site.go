package main

// The site switch (POST /site): take the whole site off the network and bring it
// back as it was. The inventory, the disks and the VMs' power states live in this
// process, so "down" only closes the vCenter listener (and every open connection to
// it): clients get "connection refused" on the same port, as from a site that is gone;
// "up" listens on the same address again. "hang" accepts TCP connections and never
// answers (not even the TLS handshake): a site behind a dead proxy, where a client's
// connect attempt has to time out. The control endpoint stays up throughout.

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
)

const (
	siteUp   = "up"
	siteDown = "down"
	siteHang = "hang"
)

type siteSwitch struct {
	mu    sync.Mutex
	srv   *simulator.Server
	addr  string
	state string
	since time.Time

	hang net.Listener // while "hang": the listener that accepts and never answers
	hung []net.Conn   // connections it holds
}

func newSiteSwitch(srv *simulator.Server) *siteSwitch {
	return &siteSwitch{srv: srv, addr: srv.URL.Host, state: siteUp, since: time.Now()}
}

func (s *siteSwitch) status() map[string]interface{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return map[string]interface{}{"state": s.state, "since": s.since.UTC().Format(time.RFC3339Nano), "host": s.addr}
}

// set moves the site to state; moving to the current state is a no-op.
func (s *siteSwitch) set(state string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if state == s.state {
		return nil
	}
	switch state {
	case siteUp, siteDown, siteHang:
	default:
		return fmt.Errorf("unknown state %q (up, down, hang)", state)
	}
	// Leave the current state: close what serves (or holds) the port.
	switch s.state {
	case siteUp:
		_ = s.srv.Listener.Close()
		// Kept-alive connections would go on working: a site that is gone answers none.
		s.srv.CloseClientConnections()
	case siteHang:
		s.stopHang()
	}
	switch state {
	case siteUp:
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			s.state = siteDown // nothing listens now
			s.since = time.Now()
			return fmt.Errorf("listen on %s again: %v", s.addr, err)
		}
		tl := tls.NewListener(ln, s.srv.TLS)
		s.srv.Listener = tl // what the final Close closes
		// The same http.Server (handler, TLS, connection tracking) serves the new
		// listener: Serve may be called again after its listener was closed.
		go func() { _ = s.srv.Config.Serve(tl) }()
	case siteHang:
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			s.state = siteDown
			s.since = time.Now()
			return fmt.Errorf("listen on %s again: %v", s.addr, err)
		}
		s.hang = ln
		go s.holdConnections(ln)
	}
	s.state = state
	s.since = time.Now()
	return nil
}

// holdConnections accepts and keeps every connection without reading or answering.
func (s *siteSwitch) holdConnections(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.hang != ln { // switched away meanwhile
			s.mu.Unlock()
			_ = c.Close()
			return
		}
		s.hung = append(s.hung, c)
		s.mu.Unlock()
	}
}

// stopHang closes the hanging listener and its connections; s.mu is held.
func (s *siteSwitch) stopHang() {
	if s.hang != nil {
		_ = s.hang.Close()
		s.hang = nil
	}
	for _, c := range s.hung {
		_ = c.Close()
	}
	s.hung = nil
}

func (s *siteSwitch) register(mux *http.ServeMux) {
	mux.HandleFunc("/site", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			writeJSON(w, http.StatusOK, s.status())
		case http.MethodPost, http.MethodPut:
			var in struct {
				State string `json:"state"`
			}
			dec := json.NewDecoder(r.Body)
			dec.DisallowUnknownFields()
			if err := dec.Decode(&in); err != nil || in.State == "" {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": `expected {"state": "up"|"down"|"hang"}`})
				return
			}
			if err := s.set(in.State); err != nil {
				code := http.StatusConflict
				if in.State != siteUp && in.State != siteDown && in.State != siteHang {
					code = http.StatusBadRequest
				}
				writeJSON(w, code, map[string]string{"error": err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, s.status())
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})
}
