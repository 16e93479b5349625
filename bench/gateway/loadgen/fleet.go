package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// benchEvent is what a receiver reads of each event.
type benchEvent struct {
	SessionID string `json:"sessionId"`
	Sequence  int64  `json:"sequence"`
	Timestamp string `json:"timestamp"`
}

// fleetwardFrame is a gateway frame: an event frame or a control frame.
type fleetwardFrame struct {
	Position string      `json:"position"`
	Event    *benchEvent `json:"event"`
	Control  string      `json:"control"`
}

// centrifugeReply is one reply of Centrifuge's JSON protocol (a frame may hold several,
// one per line).
type centrifugeReply struct {
	ID    uint32 `json:"id"`
	Error *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Connect *struct {
		Subs map[string]json.RawMessage `json:"subs"`
		Pong bool                       `json:"pong"`
	} `json:"connect"`
	Push *struct {
		Channel string `json:"channel"`
		Pub     *struct {
			Data benchEvent `json:"data"`
		} `json:"pub"`
		Disconnect *struct {
			Code   int    `json:"code"`
			Reason string `json:"reason"`
		} `json:"disconnect"`
	} `json:"push"`
}

type client struct {
	idx     int
	session string
	ws      atomic.Pointer[websocket.Conn]
	// position and seen belong to the client's goroutine.
	position string
	seen     []bool
	maxSeen  int64

	hasPosition atomic.Bool
	distinct    atomic.Int64
	duplicates  atomic.Int64
	outOfOrder  atomic.Int64
	// Resume bookkeeping (unix ns; 0 = not happened).
	closedAt  atomic.Int64
	resumedAt atomic.Int64
	closeCode atomic.Int64
}

type fleet struct {
	ctx     context.Context
	o       options
	prod    *producer
	dialer  *websocket.Dialer
	clients []*client
	wg      sync.WaitGroup

	closing   atomic.Bool
	open      atomic.Int64
	received  atomic.Int64
	controls  atomic.Int64
	badFrames atomic.Int64

	// Filled while prod.recording is set.
	latMu     sync.Mutex
	latencies []int64 // microseconds
	delivered atomic.Int64
}

func newFleet(ctx context.Context, o options, prod *producer) *fleet {
	f := &fleet{
		ctx:  ctx,
		o:    o,
		prod: prod,
		dialer: &websocket.Dialer{
			HandshakeTimeout: 30 * time.Second,
			// Small buffers: frames are ~0.3 KB and this process holds up to 10,000 sockets.
			ReadBufferSize:  2048,
			WriteBufferSize: 512,
		},
		clients: make([]*client, o.conns),
	}
	for i := range f.clients {
		f.clients[i] = &client{idx: i, session: prod.sessions[i], maxSeen: -1}
	}
	return f
}

// dial opens one connection and, for Centrifuge, completes the connect command.
func (f *fleet) dial(c *client) (*websocket.Conn, error) {
	tok, err := f.o.token(c.session)
	if err != nil {
		return nil, err
	}
	if f.o.target == "fleetward" {
		u := f.o.url + "/v1/sessions/" + c.session + "/ws"
		if c.position != "" {
			u += "?since=" + c.position
		}
		ws, resp, err := f.dialer.DialContext(f.ctx, u, http.Header{"Authorization": {"Bearer " + tok}})
		if err != nil {
			if resp != nil {
				return nil, fmt.Errorf("handshake: HTTP %d", resp.StatusCode)
			}
			return nil, err
		}
		return ws, nil
	}
	ws, _, err := f.dialer.DialContext(f.ctx, f.o.url, nil)
	if err != nil {
		return nil, err
	}
	cmd, _ := json.Marshal(map[string]any{"id": 1, "connect": map[string]any{"token": tok, "name": "loadgen"}})
	_ = ws.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, cmd); err != nil {
		ws.Close()
		return nil, err
	}
	_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		_, msg, err := ws.ReadMessage()
		if err != nil {
			ws.Close()
			return nil, fmt.Errorf("connect reply: %w", err)
		}
		for line := range bytes.SplitSeq(msg, []byte("\n")) {
			var r centrifugeReply
			if len(line) == 0 || json.Unmarshal(line, &r) != nil || r.ID != 1 {
				continue
			}
			_ = ws.SetReadDeadline(time.Time{})
			_ = ws.SetWriteDeadline(time.Time{})
			switch {
			case r.Error != nil:
				ws.Close()
				return nil, fmt.Errorf("connect refused: %d %s", r.Error.Code, r.Error.Message)
			case r.Connect == nil || r.Connect.Subs[c.session] == nil:
				ws.Close()
				return nil, errors.New("connect reply without the session's subscription")
			}
			return ws, nil
		}
	}
}

// connectAll opens every connection (bounded concurrency and total time), then starts the
// readers. Prints `connected`.
func (f *fleet) connectAll() {
	begin := time.Now()
	ctx, cancel := context.WithTimeout(f.ctx, f.o.connectLimit)
	defer cancel()
	sem := make(chan struct{}, f.o.concurrency)
	var failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for _, c := range f.clients {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			failed.Add(1)
			continue
		}
		wg.Add(1)
		go func(c *client) {
			defer wg.Done()
			defer func() { <-sem }()
			ws, err := f.dial(c)
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			c.ws.Store(ws)
			f.open.Add(1)
			f.wg.Add(1)
			go f.run(c)
		}(c)
	}
	wg.Wait()
	res := map[string]any{
		"event": "connected", "ok": f.open.Load(), "failed": failed.Load(),
		"seconds": time.Since(begin).Seconds(),
		// Size of this run's events (sequence 0 and 100; the sequence's digits vary it).
		"event_bytes": []int{len(f.prod.event(f.prod.sessions[0], 0, time.Now())), len(f.prod.event(f.prod.sessions[0], 100, time.Now()))},
	}
	if e := firstErr.Load(); e != nil {
		res["first_error"] = e
	}
	emit(res)
}

// run reads one client's connection; with --reconnect it resumes after a server close.
func (f *fleet) run(c *client) {
	defer f.wg.Done()
	for {
		code := f.read(c)
		f.open.Add(-1)
		if f.closing.Load() || f.ctx.Err() != nil || !f.o.reconnect || f.o.target != "fleetward" {
			return
		}
		c.closeCode.Store(int64(code))
		c.closedAt.Store(time.Now().UnixNano())
		ws := f.redial(c)
		if ws == nil {
			return
		}
		c.ws.Store(ws)
		c.resumedAt.Store(time.Now().UnixNano())
		f.open.Add(1)
	}
}

// redial retries with exponential backoff and full jitter (50 ms doubling to 1 s) until it
// connects or --reconnect-timeout passes.
func (f *fleet) redial(c *client) *websocket.Conn {
	deadline := time.Now().Add(f.o.reconnectTime)
	backoff := 50 * time.Millisecond
	for time.Now().Before(deadline) && f.ctx.Err() == nil && !f.closing.Load() {
		time.Sleep(time.Duration(rand.Int64N(int64(backoff))) + time.Millisecond)
		ws, err := f.dial(c)
		if err == nil {
			return ws
		}
		backoff = min(2*backoff, time.Second)
	}
	log.Printf("%s: gave up reconnecting", c.session)
	return nil
}

// read handles frames until the connection ends; returns the close code (1006 if none).
func (f *fleet) read(c *client) int {
	ws := c.ws.Load()
	defer ws.Close()
	for {
		_, msg, err := ws.ReadMessage()
		now := time.Now()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				return ce.Code
			}
			return websocket.CloseAbnormalClosure
		}
		if f.o.target == "fleetward" {
			var fr fleetwardFrame
			if err := json.Unmarshal(msg, &fr); err != nil {
				f.badFrames.Add(1)
				continue
			}
			if fr.Event == nil {
				f.controls.Add(1)
				log.Printf("%s: control frame %s", c.session, msg)
				continue
			}
			c.position = fr.Position
			f.deliver(c, fr.Event, now)
			continue
		}
		for line := range bytes.SplitSeq(msg, []byte("\n")) {
			if len(line) == 0 {
				continue
			}
			if bytes.Equal(line, []byte("{}")) { // server ping: answer with a pong
				_ = ws.WriteMessage(websocket.TextMessage, []byte("{}"))
				continue
			}
			var r centrifugeReply
			if err := json.Unmarshal(line, &r); err != nil || r.Push == nil {
				f.badFrames.Add(1)
				continue
			}
			if r.Push.Pub == nil {
				f.controls.Add(1)
				continue
			}
			f.deliver(c, &r.Push.Pub.Data, now)
		}
	}
}

func (f *fleet) deliver(c *client, ev *benchEvent, now time.Time) {
	f.received.Add(1)
	if ev.SessionID != c.session {
		f.badFrames.Add(1)
		return
	}
	seq := ev.Sequence
	if seq < 0 || seq > 10_000_000 {
		f.badFrames.Add(1)
		return
	}
	if int(seq) >= len(c.seen) {
		c.seen = slices.Grow(c.seen, int(seq)+1-len(c.seen))[:int(seq)+1]
	}
	switch {
	case c.seen[seq]:
		c.duplicates.Add(1)
	case seq < c.maxSeen:
		c.outOfOrder.Add(1)
		c.seen[seq] = true
		c.distinct.Add(1)
	default:
		c.seen[seq] = true
		c.maxSeen = seq
		c.distinct.Add(1)
	}
	c.hasPosition.Store(true)
	if !f.prod.recording.Load() {
		return
	}
	ts, err := time.Parse(time.RFC3339Nano, ev.Timestamp)
	if err != nil {
		f.badFrames.Add(1)
		return
	}
	f.delivered.Add(1)
	lat := now.Sub(ts).Microseconds()
	f.latMu.Lock()
	f.latencies = append(f.latencies, lat)
	f.latMu.Unlock()
}

func percentile(sorted []int64, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(q*float64(len(sorted))))]
}

// load produces at `rate` for warmup+duration and measures deliveries and latency in the
// last `duration`. window_start/window_end are printed the moment the window opens/closes
// (the driver samples the server's CPU time on them).
func (f *fleet) load(rate float64, warmup, duration time.Duration) {
	f.prod.start(f.ctx, rate)
	time.Sleep(warmup)
	f.latMu.Lock()
	f.latencies = make([]int64, 0, int(rate*duration.Seconds()*1.2)+16)
	f.latMu.Unlock()
	f.delivered.Store(0)
	f.prod.inWindow.Store(0)
	producedBefore, receivedBefore := f.prod.produced.Load(), f.received.Load()
	begin := time.Now()
	f.prod.recording.Store(true)
	emit(map[string]any{"event": "window_start"})
	time.Sleep(duration)
	f.prod.recording.Store(false)
	elapsed := time.Since(begin)
	emit(map[string]any{"event": "window_end"})
	produced := f.prod.stop()
	f.latMu.Lock()
	lat := f.latencies
	f.latencies = nil
	f.latMu.Unlock()
	slices.Sort(lat)
	delivered := f.delivered.Load()
	// Drain: how far behind the receivers were when production stopped (bounded wait).
	drainStart := time.Now()
	for f.received.Load() < f.prod.ackedTotal() && time.Since(drainStart) < 10*time.Second {
		time.Sleep(20 * time.Millisecond)
	}
	emit(map[string]any{
		"event":                  "load_result",
		"rate":                   rate,
		"window_seconds":         elapsed.Seconds(),
		"produced_in_window":     f.prod.inWindow.Load(),
		"delivered_in_window":    delivered,
		"delivered_per_second":   float64(delivered) / elapsed.Seconds(),
		"latency_samples":        len(lat),
		"latency_us":             map[string]int64{"p50": percentile(lat, 0.50), "p90": percentile(lat, 0.90), "p99": percentile(lat, 0.99), "p999": percentile(lat, 0.999), "max": percentile(lat, 1)},
		"produced_total":         produced,
		"acked_total":            f.prod.ackedTotal(),
		"produce_errors":         f.prod.errors.Load(),
		"received_total":         f.received.Load(),
		"behind_at_window_end":   (producedBefore + f.prod.inWindow.Load()) - (receivedBefore + delivered),
		"drain_seconds":          time.Since(drainStart).Seconds(),
		"open_connections":       f.open.Load(),
		"control_frames":         f.controls.Load(),
		"bad_frames":             f.badFrames.Load(),
		"duplicates":             f.sum(func(c *client) int64 { return c.duplicates.Load() }),
		"out_of_order":           f.sum(func(c *client) int64 { return c.outOfOrder.Load() }),
		"events_per_session_sec": rate / float64(len(f.clients)),
	})
}

func (f *fleet) sum(get func(*client) int64) int64 {
	var n int64
	for _, c := range f.clients {
		n += get(c)
	}
	return n
}

func (f *fleet) waitPositions(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	have := 0
	for {
		have = 0
		for _, c := range f.clients {
			if c.hasPosition.Load() {
				have++
			}
		}
		if have == len(f.clients) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	emit(map[string]any{"event": "positions", "have": have, "of": len(f.clients)})
}

// waitResumed waits until every client was closed by the server and reconnected.
func (f *fleet) waitResumed(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	var closed, resumed int
	for {
		closed, resumed = 0, 0
		for _, c := range f.clients {
			if c.closedAt.Load() != 0 {
				closed++
			}
			if c.resumedAt.Load() != 0 {
				resumed++
			}
		}
		if resumed == len(f.clients) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	var firstClose, lastClose, lastResume int64
	var gaps []int64 // per client: close -> resumed, ms
	codes := map[string]int{}
	for _, c := range f.clients {
		cl, rs := c.closedAt.Load(), c.resumedAt.Load()
		if cl != 0 {
			codes[fmt.Sprint(c.closeCode.Load())]++
			if firstClose == 0 || cl < firstClose {
				firstClose = cl
			}
			lastClose = max(lastClose, cl)
		}
		if rs != 0 {
			lastResume = max(lastResume, rs)
			gaps = append(gaps, (rs-cl)/1_000_000)
		}
	}
	slices.Sort(gaps)
	// Caught up: every client holds every event acked by the time all had reconnected (the
	// missed ones come from the resume, the rest live).
	var caughtUp int64
	if resumed == len(f.clients) {
		target := make([]int64, len(f.clients))
		for i := range f.clients {
			target[i] = f.prod.acked[i].Load()
		}
		for caughtUp == 0 && time.Now().Before(deadline.Add(30*time.Second)) {
			behind := false
			for i, c := range f.clients {
				if c.distinct.Load() < target[i] {
					behind = true
					break
				}
			}
			if !behind {
				caughtUp = time.Now().UnixNano()
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	emit(map[string]any{
		"event": "resumed", "closed": closed, "resumed": resumed, "of": len(f.clients), "caught_up_ns": caughtUp,
		"close_codes": codes, "first_close_ns": firstClose, "last_close_ns": lastClose, "last_resume_ns": lastResume,
		"client_gap_ms": map[string]int64{"p50": percentile(gaps, 0.5), "p99": percentile(gaps, 0.99), "max": percentile(gaps, 1)},
	})
}

// verify waits until every acked event has arrived (or the timeout), then counts.
func (f *fleet) verify(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if f.sum(func(c *client) int64 { return c.distinct.Load() }) >= f.prod.ackedTotal() {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var missed, sessionsMissing int64
	for i, c := range f.clients {
		if m := f.prod.acked[i].Load() - c.distinct.Load(); m > 0 {
			missed += m
			sessionsMissing++
		}
	}
	emit(map[string]any{
		"event": "verify", "produced": f.prod.produced.Load(), "acked": f.prod.ackedTotal(),
		"produce_errors":    f.prod.errors.Load(),
		"received_distinct": f.sum(func(c *client) int64 { return c.distinct.Load() }),
		"missed":            missed, "sessions_missing": sessionsMissing,
		"duplicates":       f.sum(func(c *client) int64 { return c.duplicates.Load() }),
		"out_of_order":     f.sum(func(c *client) int64 { return c.outOfOrder.Load() }),
		"open_connections": f.open.Load(), "control_frames": f.controls.Load(), "bad_frames": f.badFrames.Load(),
	})
}

// closeAll sends a normal close to every open connection (bounded) and stops the readers.
func (f *fleet) closeAll() {
	f.closing.Store(true)
	deadline := time.Now().Add(5 * time.Second)
	for _, c := range f.clients {
		if ws := c.ws.Load(); ws != nil {
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), deadline)
		}
	}
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		for _, c := range f.clients {
			if ws := c.ws.Load(); ws != nil {
				ws.Close()
			}
		}
	}
}
