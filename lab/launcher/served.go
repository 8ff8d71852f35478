package main

// Bytes the datastore interface served (GET /served): what a replication
// cycle read from the site, so a test can tell a CBT read from a full scan.

import (
	"net/http"
	"sync/atomic"
)

type countingWriter struct {
	http.ResponseWriter
	n *int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	atomic.AddInt64(c.n, int64(n))
	return n, err
}

var folderBytesServed int64

// countServed wraps the writer of a /folder GET so that its body bytes are counted.
func countServed(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if r.Method != http.MethodGet {
		return w
	}
	return countingWriter{w, &folderBytesServed}
}

func registerServed(mux *http.ServeMux) {
	mux.HandleFunc("/served", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			writeJSON(w, http.StatusOK, map[string]int64{"DatastoreFile.GET": atomic.LoadInt64(&folderBytesServed)})
		case http.MethodDelete:
			atomic.StoreInt64(&folderBytesServed, 0)
			writeJSON(w, http.StatusOK, map[string]bool{"reset": true})
		default:
			w.WriteHeader(http.StatusMethodNotAllowed)
		}
	})
}
