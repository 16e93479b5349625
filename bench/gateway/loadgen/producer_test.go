package main

import (
	"encoding/json"
	"regexp"
	"testing"
	"time"
)

// The events the benchmark produces must be valid session events (the gateway drops invalid
// ones) whose text is exactly --text-bytes long, whatever the session name and sequence.
func TestEventIsAValidMessageWithTheRequestedText(t *testing.T) {
	uuid := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}$`)
	traceID := regexp.MustCompile(`^[0-9a-f]{32}$`)
	for _, size := range []int{256, 1024} {
		p := &producer{o: options{agent: "bench/agent", textBytes: size}}
		for _, tc := range []struct {
			session string
			seq     int64
		}{{"s-00000", 0}, {"sabcdef-09999", 123456789}, {"r1-00001", 7}} {
			ts := time.Date(2026, 12, 6, 1, 2, 3, 40_000, time.UTC)
			raw := p.event(tc.session, tc.seq, ts)
			var ev struct {
				Schema    string `json:"schema"`
				ID        string `json:"id"`
				Type      string `json:"type"`
				SessionID string `json:"sessionId"`
				Agent     string `json:"agent"`
				RunID     string `json:"runId"`
				TraceID   string `json:"traceId"`
				Timestamp string `json:"timestamp"`
				Sequence  int64  `json:"sequence"`
				Data      struct {
					Role string `json:"role"`
					Text string `json:"text"`
				} `json:"data"`
			}
			if err := json.Unmarshal(raw, &ev); err != nil {
				t.Fatalf("not JSON: %v: %s", err, raw)
			}
			got, err := time.Parse(time.RFC3339Nano, ev.Timestamp)
			switch {
			case ev.Schema != "fleetward.event.v1" || ev.Type != "message" || ev.Data.Role != "assistant":
				t.Fatalf("wrong schema/type/role: %s", raw)
			case !uuid.MatchString(ev.ID) || !traceID.MatchString(ev.TraceID):
				t.Fatalf("bad id %q or traceId %q", ev.ID, ev.TraceID)
			case ev.SessionID != tc.session || ev.Sequence != tc.seq || ev.Agent != "bench/agent" || ev.RunID != "run-1":
				t.Fatalf("fields not carried: %s", raw)
			case err != nil || !got.Equal(ts) || ev.Timestamp != "2026-12-06T01:02:03.000040000Z":
				t.Fatalf("timestamp %q (parsed %v, %v)", ev.Timestamp, got, err)
			case len(ev.Data.Text) != size:
				t.Fatalf("text is %d bytes, want %d", len(ev.Data.Text), size)
			case len(raw) < size+280 || len(raw) > size+320:
				t.Fatalf("event is %d bytes for a %d-byte text", len(raw), size)
			}
		}
	}
}
