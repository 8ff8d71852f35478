package main

// SOAP encoding helpers: the launcher answers some requests itself (injected
// faults, recovered panics, ShutdownGuest), in the same envelope format as the
// simulator's ServeSDK so that pyvmomi decodes them into vim/vmodl faults.

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"net/http"
	"reflect"
	"strings"

	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	vxml "github.com/vmware/govmomi/vim25/xml"
)

type soapEnvelope struct {
	XMLName vxml.Name   `xml:"soapenv:Envelope"`
	Enc     string      `xml:"xmlns:soapenc,attr"`
	Env     string      `xml:"xmlns:soapenv,attr"`
	XSD     string      `xml:"xmlns:xsd,attr"`
	XSI     string      `xml:"xmlns:xsi,attr"`
	Body    interface{} `xml:"soapenv:Body"`
}

type faultDetail struct {
	Fault types.AnyType
}

type soapFault struct {
	XMLName vxml.Name `xml:"soapenv:Fault"`
	Code    string    `xml:"faultcode"`
	String  string    `xml:"faultstring"`
	Detail  struct {
		Fault *faultDetail
	} `xml:"detail"`
}

// MarshalXML renames the start element from "Fault" to "${Type}Fault", with
// xsi:type, as vCenter does (and as pyvmomi expects).
func (d *faultDetail) MarshalXML(e *vxml.Encoder, start vxml.StartElement) error {
	kind := reflect.TypeOf(d.Fault).Elem().Name()
	start.Name.Local = kind + "Fault"
	start.Attr = append(start.Attr,
		vxml.Attr{Name: vxml.Name{Local: "xmlns"}, Value: "urn:" + vim25.Namespace},
		vxml.Attr{Name: vxml.Name{Local: "xsi:type"}, Value: kind})
	return e.EncodeElement(d.Fault, start)
}

// soapResponse wraps a methods.*Body so that its Res is encoded in the urn:vim25 namespace.
type soapResponse struct {
	Body soap.HasFault
}

func (r *soapResponse) MarshalXML(e *vxml.Encoder, start vxml.StartElement) error {
	val := reflect.ValueOf(r.Body).Elem().FieldByName("Res")
	if !val.IsValid() || val.IsNil() {
		return fmt.Errorf("%T: invalid response", r.Body)
	}
	res := vxml.StartElement{Name: vxml.Name{Space: "urn:" + vim25.Namespace, Local: val.Elem().Type().Name()}}
	if err := e.EncodeToken(start); err != nil {
		return err
	}
	if err := e.EncodeElement(val.Interface(), res); err != nil {
		return err
	}
	return e.EncodeToken(start.End())
}

func encodeEnvelope(body interface{}) ([]byte, error) {
	var out bytes.Buffer
	out.WriteString(vxml.Header)
	e := vxml.NewEncoder(&out)
	err := e.Encode(&soapEnvelope{
		Enc:  "http://schemas.xmlsoap.org/soap/encoding/",
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: body,
	})
	if err == nil {
		err = e.Flush()
	}
	return out.Bytes(), err
}

// writeSOAPFault answers HTTP 500 with a soapenv:Fault whose detail is fault.
func writeSOAPFault(w http.ResponseWriter, msg string, fault types.BaseMethodFault) {
	f := &soapFault{Code: "ServerFaultCode", String: msg}
	f.Detail.Fault = &faultDetail{Fault: fault}
	out, err := encodeEnvelope(struct{ Fault *soapFault }{f})
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	_, _ = w.Write(out)
}

// writeSOAPResponse answers HTTP 200 with the Res of a methods.*Body.
func writeSOAPResponse(w http.ResponseWriter, body soap.HasFault) {
	out, err := encodeEnvelope(&soapResponse{Body: body})
	if err != nil {
		writeSOAPFault(w, err.Error(), &types.SystemError{Reason: err.Error()})
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(out)
}

// injectableFaults are the faults POST /faults accepts, by name.
var injectableFaults = map[string]func(msg string, this types.ManagedObjectReference) types.BaseMethodFault{
	"NotAuthenticated": func(_ string, this types.ManagedObjectReference) types.BaseMethodFault {
		return &types.NotAuthenticated{NoPermission: types.NoPermission{Object: this, PrivilegeId: "System.View"}}
	},
	"HostCommunication": func(string, types.ManagedObjectReference) types.BaseMethodFault {
		return &types.HostCommunication{}
	},
	"NotFound": func(string, types.ManagedObjectReference) types.BaseMethodFault {
		return &types.NotFound{}
	},
	"InvalidArgument": func(string, types.ManagedObjectReference) types.BaseMethodFault {
		return &types.InvalidArgument{InvalidProperty: "lab"}
	},
	"InvalidState": func(string, types.ManagedObjectReference) types.BaseMethodFault {
		return &types.InvalidState{}
	},
	"TaskInProgress": func(_ string, this types.ManagedObjectReference) types.BaseMethodFault {
		return &types.TaskInProgress{Task: types.ManagedObjectReference{Type: "Task", Value: "task-lab-injected"}}
	},
	"SystemError": func(msg string, _ types.ManagedObjectReference) types.BaseMethodFault {
		return &types.SystemError{Reason: msg}
	},
}

// soapMethodName returns the local name of the first element inside
// soapenv:Body, i.e. the SOAP method ("RetrievePropertiesEx"), or "".
func soapMethodName(body []byte) string {
	d := xml.NewDecoder(bytes.NewReader(body))
	inBody := false
	for {
		tok, err := d.RawToken()
		if err != nil {
			return ""
		}
		if se, ok := tok.(xml.StartElement); ok {
			if inBody {
				return se.Name.Local
			}
			if se.Name.Local == "Body" {
				inBody = true
			}
		}
	}
}

// soapThis extracts the text of the first <_this ...>...</_this> element.
func soapThis(body []byte) types.ManagedObjectReference {
	var ref types.ManagedObjectReference
	d := xml.NewDecoder(bytes.NewReader(body))
	for {
		tok, err := d.RawToken()
		if err != nil {
			return ref
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "_this" {
			for _, a := range se.Attr {
				if a.Name.Local == "type" {
					ref.Type = a.Value
				}
			}
			if tok, err = d.RawToken(); err == nil {
				if cd, ok := tok.(xml.CharData); ok {
					ref.Value = strings.TrimSpace(string(cd))
				}
			}
			return ref
		}
	}
}
