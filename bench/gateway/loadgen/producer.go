package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Fixed-width timestamp (nanoseconds, UTC): every event of a run has the same size.
const timestampLayout = "2006-01-02T15:04:05.000000000Z"

// producer writes session events round-robin over the sessions at a set rate.
type producer struct {
	o        options
	client   *kgo.Client
	sessions []string
	// seq and rr belong to the producing goroutine; acked is read by the verifier.
	seq      []int64
	rr       int
	acked    []atomic.Int64
	produced atomic.Int64
	errors   atomic.Int64
	// inWindow counts events produced while the receivers record (see fleet.load).
	inWindow  atomic.Int64
	recording *atomic.Bool

	mu      sync.Mutex
	running context.CancelFunc
	done    chan struct{}
}

func newProducer(o options) (*producer, error) {
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(o.bootstrap, ",")...),
		kgo.DefaultProduceTopic(o.topic),
		// franz-go lingers 10 ms by default; the latency measured starts at the event's
		// timestamp, so hand each record to the broker at once, as an agent runtime would.
		kgo.ProducerLinger(0),
		kgo.ProduceRequestTimeout(10*time.Second),
		kgo.RecordDeliveryTimeout(30*time.Second),
	)
	if err != nil {
		return nil, err
	}
	p := &producer{
		o:         o,
		client:    client,
		sessions:  make([]string, o.conns),
		seq:       make([]int64, o.conns),
		acked:     make([]atomic.Int64, o.conns),
		recording: &atomic.Bool{},
	}
	for i := range p.sessions {
		p.sessions[i] = sessionName(o.sessionPrefix, i)
	}
	return p, nil
}

func sessionName(prefix string, i int) string {
	return fmt.Sprintf("%s-%05d", prefix, i)
}

func randomHex(n int) string {
	b := make([]byte, n/2)
	for i := range b {
		b[i] = byte(rand.UintN(256))
	}
	return hex.EncodeToString(b)
}

const filler = "Your refund of 12.00 EUR was approved and will reach your account in three to five business days. "

// event builds one valid `message` session event whose data.text is exactly o.textBytes bytes
// (ASCII, no escaping). The envelope around it (ids, timestamp, session, ...) adds ~300 bytes:
// a whole event of 256 bytes is not possible with a valid envelope.
func (p *producer) event(session string, seq int64, ts time.Time) []byte {
	id := randomHex(32)
	head := `{"schema":"fleetward.event.v1","id":"` + id[0:8] + "-" + id[8:12] + "-4" + id[13:16] + "-a" + id[17:20] + "-" + id[20:32] +
		`","type":"message","sessionId":"` + session + `","agent":"` + p.o.agent + `","runId":"run-1","traceId":"` + randomHex(32) +
		`","timestamp":"` + ts.UTC().Format(timestampLayout) + `","sequence":` + strconv.FormatInt(seq, 10) +
		`,"data":{"role":"assistant","text":"`
	const tail = `"}}`
	var b strings.Builder
	b.Grow(len(head) + p.o.textBytes + len(tail))
	b.WriteString(head)
	for pad := p.o.textBytes; pad > 0; {
		n := min(pad, len(filler))
		b.WriteString(filler[:n])
		pad -= n
	}
	b.WriteString(tail)
	return []byte(b.String())
}

// produceOne hands one event to the client. Its context is Background: a cancelled one would
// fail the records still buffered, and stop() flushes them instead (bounded by the delivery
// timeout).
func (p *producer) produceOne() {
	i := p.rr
	p.rr = (p.rr + 1) % len(p.sessions)
	seq := p.seq[i]
	p.seq[i]++
	rec := &kgo.Record{Key: []byte(p.sessions[i]), Value: p.event(p.sessions[i], seq, time.Now())}
	if p.recording.Load() {
		p.inWindow.Add(1)
	}
	p.produced.Add(1)
	p.client.Produce(context.Background(), rec, func(_ *kgo.Record, err error) {
		if err != nil {
			p.errors.Add(1)
			return
		}
		p.acked[i].Add(1)
	})
}

// start produces at `rate` events/s until stop (or ctx ends). Each 1 ms tick sends what is
// due since the start, so a late tick catches up instead of lowering the rate.
func (p *producer) start(ctx context.Context, rate float64) {
	p.stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	runCtx, cancel := context.WithCancel(ctx)
	p.running = cancel
	p.done = make(chan struct{})
	go func(done chan struct{}) {
		defer close(done)
		ticker := time.NewTicker(time.Millisecond)
		defer ticker.Stop()
		begin := time.Now()
		var sent int64
		for {
			select {
			case <-runCtx.Done():
				return
			case now := <-ticker.C:
				due := int64(now.Sub(begin).Seconds() * rate)
				for sent < due && runCtx.Err() == nil {
					p.produceOne()
					sent++
				}
			}
		}
	}(p.done)
}

// stop ends production and waits (at most 15 s) for the outstanding records' acks;
// returns the number of events produced so far.
func (p *producer) stop() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running != nil {
		p.running()
		<-p.done
		p.running = nil
		flushCtx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		_ = p.client.Flush(flushCtx)
		cancel()
	}
	return p.produced.Load()
}

func (p *producer) close() {
	p.stop()
	p.client.Close()
}

func (p *producer) ackedTotal() int64 {
	var n int64
	for i := range p.acked {
		n += p.acked[i].Load()
	}
	return n
}
