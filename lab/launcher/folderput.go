package main

// PUT on /folder: the whole file is written (Content-Range ignored, as in
// 0.24.2), but runs of zeros become holes, as on a thin-provisioned disk whose
// zero blocks were never allocated: a disk seeded by upload answers
// QueryChangedDiskAreas(changeId="*") with its data regions only. The file is
// fsynced before the answer.

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
)

const putChunk = 1 << 20

var zeroChunk = make([]byte, putChunk)

func (l *lab) putDatastoreFile(w http.ResponseWriter, r *http.Request, rel string) {
	p, ok := l.datastoreFile(w, r, rel, "a file name is required")
	if !ok {
		return
	}
	_ = os.MkdirAll(filepath.Dir(p), 0o700)
	f, err := os.Create(p)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	buf := make([]byte, putChunk)
	var off int64
	for {
		n, rerr := io.ReadFull(r.Body, buf)
		if n > 0 {
			if !bytes.Equal(buf[:n], zeroChunk[:n]) {
				if _, err := f.WriteAt(buf[:n], off); err != nil {
					http.Error(w, err.Error(), http.StatusInternalServerError)
					return
				}
			}
			off += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			http.Error(w, rerr.Error(), http.StatusBadRequest)
			return
		}
	}
	if err := f.Truncate(off); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if err := f.Sync(); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusOK)
}
