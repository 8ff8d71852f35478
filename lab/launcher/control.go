package main

// The control endpoint: plain HTTP on loopback, JSON in and out. See README.md.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"
)

func (l *lab) controlHandler(ready func() interface{}) http.Handler {
	mux := http.NewServeMux()

	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such endpoint: " + r.URL.Path})
			return
		}
		writeJSON(w, http.StatusOK, ready())
	})

	mux.HandleFunc("/faults", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			l.mu.Lock()
			rules := make([]faultRule, 0, len(l.rules))
			for _, x := range l.rules {
				rules = append(rules, *x)
			}
			l.mu.Unlock()
			writeJSON(w, http.StatusOK, rules)
		case http.MethodDelete:
			l.mu.Lock()
			n := len(l.rules)
			l.rules = nil
			l.mu.Unlock()
			writeJSON(w, http.StatusOK, map[string]int{"cleared": n})
		case http.MethodPost:
			var in struct {
				Method  string `json:"method"`
				Action  string `json:"action"`
				Fault   string `json:"fault"`
				DelayMS int    `json:"delay_ms"`
				Count   *int   `json:"count"`
				Match   string `json:"match"`
			}
			dec := json.NewDecoder(r.Body)
			dec.DisallowUnknownFields()
			if err := dec.Decode(&in); err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad JSON: " + err.Error()})
				return
			}
			if in.Method == "" {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "method is required"})
				return
			}
			switch in.Action {
			case "fault":
				if in.Fault == "http503" {
					in.Action = "http503"
				} else if _, ok := injectableFaults[in.Fault]; !ok {
					writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("unknown fault %q (known: %s, http503)", in.Fault, knownFaults())})
					return
				}
			case "drop", "drop-reply", "delay", "http503":
			default:
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("unknown action %q (fault, drop, drop-reply, delay, http503)", in.Action)})
				return
			}
			if in.DelayMS < 0 {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "delay_ms must be >= 0"})
				return
			}
			count := 1
			if in.Count != nil {
				count = *in.Count
			}
			if count < 0 {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "count must be >= 0"})
				return
			}
			l.mu.Lock()
			l.nextID++
			rule := &faultRule{ID: l.nextID, Method: in.Method, Action: in.Action, Fault: in.Fault,
				DelayMS: in.DelayMS, Count: count, Match: in.Match, unlimited: count == 0}
			l.rules = append(l.rules, rule)
			out := *rule
			l.mu.Unlock()
			writeJSON(w, http.StatusCreated, out)
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})

	mux.HandleFunc("/calls", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			l.mu.Lock()
			out := make(map[string]int, len(l.calls))
			for k, v := range l.calls {
				out[k] = v
			}
			l.mu.Unlock()
			writeJSON(w, http.StatusOK, out)
		case http.MethodDelete:
			l.mu.Lock()
			l.calls = make(map[string]int)
			l.mu.Unlock()
			writeJSON(w, http.StatusOK, map[string]bool{"reset": true})
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})

	mux.HandleFunc("/collector", func(w http.ResponseWriter, r *http.Request) {
		collectorStats.Lock()
		defer collectorStats.Unlock()
		switch r.Method {
		case http.MethodGet:
		case http.MethodDelete:
			collectorStats.ObjectsRead, collectorStats.Scopes = 0, 0
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		writeJSON(w, http.StatusOK, map[string]int{"objects_read": collectorStats.ObjectsRead, "scopes": collectorStats.Scopes})
	})

	mux.HandleFunc("/sessions", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			l.mu.Lock()
			n := len(l.sessions)
			l.mu.Unlock()
			writeJSON(w, http.StatusOK, map[string]int{"sessions": n})
		case http.MethodDelete:
			ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
			defer cancel()
			n, err := l.dropSessions(ctx)
			if err != nil {
				writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, map[string]int{"terminated": n})
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})

	mux.HandleFunc("/vms/never-boot", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			names := l.guest.neverBootNames()
			sort.Strings(names)
			writeJSON(w, http.StatusOK, map[string][]string{"names": names})
		case http.MethodPost:
			var in struct {
				Name  string `json:"name"`
				Never *bool  `json:"never"`
			}
			if err := json.NewDecoder(r.Body).Decode(&in); err != nil || in.Name == "" {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": `expected {"name": "VM", "never": true|false}`})
				return
			}
			never := true
			if in.Never != nil {
				never = *in.Never
			}
			n := l.guest.setNeverBoot(in.Name, never)
			writeJSON(w, http.StatusOK, map[string]interface{}{"name": in.Name, "never": never, "matching_vms": n})
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})

	mux.HandleFunc("/guest-boot-delay", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			writeJSON(w, http.StatusOK, map[string]int64{"ms": l.guest.getBootDelay().Milliseconds()})
		case http.MethodPost, http.MethodPut:
			var in struct {
				MS *int64 `json:"ms"`
			}
			if err := json.NewDecoder(r.Body).Decode(&in); err != nil || in.MS == nil || *in.MS < 0 {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": `expected {"ms": N} with N >= 0`})
				return
			}
			l.guest.setBootDelay(time.Duration(*in.MS) * time.Millisecond)
			writeJSON(w, http.StatusOK, map[string]int64{"ms": *in.MS})
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})

	l.registerDiskControls(mux)
	return mux
}

func knownFaults() string {
	names := make([]string, 0, len(injectableFaults))
	for k := range injectableFaults {
		names = append(names, k)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}
