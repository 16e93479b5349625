// Command loadgen is the load generator of the gateway benchmark (bench/gateway_bench.py):
// it opens N WebSocket connections, one session each, to either the Fleetward gateway
// (docs/gateway-protocol.md: token in the Authorization header, event frames
// {"position", "event"}) or the Centrifuge anchor (Centrifuge's JSON protocol spoken
// directly: a connect command carrying the token, server-side subscription to the session's
// channel, publications in push frames, "{}" pings answered with "{}"), produces session
// events to Kafka at a set rate (franz-go, key = session id, linger 0), and measures
// Kafka-produce-to-client latency = receive time - the event's `timestamp`, which the
// producer sets (nanosecond RFC 3339) just before handing the record to the client library.
// Producer and receivers share this process's clock.
//
// Events are valid Fleetward session events (`message` type) whose `data.text` holds exactly
// --text-bytes bytes (the envelope adds ~300 bytes), with a per-session `sequence` so missed,
// duplicated and out-of-order deliveries are counted exactly.
//
// The driver talks to it over pipes: commands are JSON lines on stdin, results JSON lines on
// stdout (logs on stderr). Every loop is bounded in count and time. Commands:
//
//	{"cmd":"load","rate":R,"warmup":S,"duration":S}  produce at R/s; prints window_start after
//	                                                 the warm-up, window_end, then load_result
//	{"cmd":"produce","rate":R} / {"cmd":"stop_produce"}  background production (resume test)
//	{"cmd":"wait_positions","timeout":S}             until every client holds a position
//	{"cmd":"wait_resumed","timeout":S}               until every client closed by the server
//	                                                 has reconnected (with ?since=)
//	{"cmd":"verify","timeout":S}                     until every acked event arrived; counts
//	{"cmd":"quit"}                                   close every connection and exit
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

type options struct {
	target        string
	url           string
	conns         int
	sessionPrefix string
	agent         string
	audience      string
	issuer        string
	secret        []byte
	bootstrap     string
	topic         string
	textBytes     int
	concurrency   int
	connectLimit  time.Duration
	reconnect     bool
	reconnectTime time.Duration
}

func parseOptions() options {
	var o options
	flag.StringVar(&o.target, "target", "", "fleetward | centrifuge")
	flag.StringVar(&o.url, "url", "", "ws://127.0.0.1:<port> (fleetward) or ws://127.0.0.1:<port>/connection/websocket (centrifuge)")
	flag.IntVar(&o.conns, "conns", 1000, "connections, one session each")
	flag.StringVar(&o.sessionPrefix, "session-prefix", "bench", "session ids are <prefix>-<index>")
	flag.StringVar(&o.agent, "agent", "bench/agent", "agent claim and event agent")
	flag.StringVar(&o.audience, "jwt-audience", "fleetward-gateway", "token aud")
	flag.StringVar(&o.issuer, "jwt-issuer", "https://idp.fleetward.test", "token iss")
	flag.StringVar(&o.bootstrap, "kafka-bootstrap", "", "Kafka bootstrap servers")
	flag.StringVar(&o.topic, "events-topic", "", "events topic")
	flag.IntVar(&o.textBytes, "text-bytes", 256, "bytes of data.text in each event (the envelope adds ~300)")
	flag.IntVar(&o.concurrency, "connect-concurrency", 200, "handshakes in flight while connecting")
	flag.DurationVar(&o.connectLimit, "connect-timeout", 180*time.Second, "time allowed to open every connection")
	flag.BoolVar(&o.reconnect, "reconnect", false, "reconnect with ?since=<last position> after a server close (fleetward)")
	flag.DurationVar(&o.reconnectTime, "reconnect-timeout", 90*time.Second, "give up reconnecting after this long")
	flag.Parse()
	o.secret = []byte(os.Getenv("LOADGEN_JWT_SECRET"))
	fail := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", a...)
		os.Exit(2)
	}
	if o.target != "fleetward" && o.target != "centrifuge" {
		fail("--target=%q: must be fleetward or centrifuge", o.target)
	}
	u, err := url.Parse(o.url)
	if err != nil || u.Scheme != "ws" || u.Hostname() != "127.0.0.1" {
		fail("--url=%q: must be a ws://127.0.0.1:<port> URL (the benchmark stays on loopback)", o.url)
	}
	if o.conns < 1 || o.conns > 50_000 {
		fail("--conns=%d: must be between 1 and 50000", o.conns)
	}
	if o.bootstrap == "" || o.topic == "" {
		fail("--kafka-bootstrap and --events-topic are required")
	}
	if host, _, err := net.SplitHostPort(strings.Split(o.bootstrap, ",")[0]); err != nil || host != "127.0.0.1" {
		fail("--kafka-bootstrap=%q: must be 127.0.0.1:<port>", o.bootstrap)
	}
	if len(o.secret) < 32 {
		fail("LOADGEN_JWT_SECRET must hold the HS256 secret (at least 32 bytes)")
	}
	if o.textBytes < 1 || o.textBytes > 100_000 {
		fail("--text-bytes=%d: must be between 1 and 100000 (the envelope's text limit)", o.textBytes)
	}
	return o
}

// out writes one JSON line per result to stdout.
var outMu sync.Mutex

func emit(v map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	b, err := json.Marshal(v)
	if err != nil {
		log.Fatalf("encode result: %v", err)
	}
	os.Stdout.Write(append(b, '\n'))
}

func (o options) token(session string) (string, error) {
	now := time.Now()
	return jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"sub":   "bench-user",
		"sid":   session,
		"role":  "user",
		"agent": o.agent,
		"aud":   o.audience,
		"iss":   o.issuer,
		"iat":   now.Unix(),
		"exp":   now.Add(2 * time.Hour).Unix(),
	}).SignedString(o.secret)
}

type command struct {
	Cmd      string  `json:"cmd"`
	Rate     float64 `json:"rate"`
	Warmup   float64 `json:"warmup"`
	Duration float64 `json:"duration"`
	Timeout  float64 `json:"timeout"`
}

func seconds(s float64, max time.Duration) time.Duration {
	d := time.Duration(s * float64(time.Second))
	if d <= 0 || d > max {
		return max
	}
	return d
}

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("loadgen: ")
	o := parseOptions()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	prod, err := newProducer(o)
	if err != nil {
		log.Fatalf("kafka producer: %v", err)
	}
	defer prod.close()
	fleet := newFleet(ctx, o, prod)
	fleet.connectAll()

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var c command
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			emit(map[string]any{"event": "error", "error": fmt.Sprintf("bad command %q: %v", in.Text(), err)})
			continue
		}
		switch c.Cmd {
		case "load":
			if c.Rate <= 0 || c.Rate > 1_000_000 {
				emit(map[string]any{"event": "error", "error": fmt.Sprintf("load: rate=%v must be in (0, 1e6]", c.Rate)})
				continue
			}
			fleet.load(c.Rate, seconds(c.Warmup, 5*time.Minute), seconds(c.Duration, 10*time.Minute))
		case "produce":
			if c.Rate <= 0 || c.Rate > 1_000_000 {
				emit(map[string]any{"event": "error", "error": fmt.Sprintf("produce: rate=%v must be in (0, 1e6]", c.Rate)})
				continue
			}
			prod.start(ctx, c.Rate)
			emit(map[string]any{"event": "producing", "rate": c.Rate})
		case "stop_produce":
			emit(map[string]any{"event": "stopped", "produced": prod.stop()})
		case "wait_positions":
			fleet.waitPositions(seconds(c.Timeout, 2*time.Minute))
		case "wait_resumed":
			fleet.waitResumed(seconds(c.Timeout, 3*time.Minute))
		case "verify":
			fleet.verify(seconds(c.Timeout, 2*time.Minute))
		case "quit":
			prod.stop()
			fleet.closeAll()
			emit(map[string]any{"event": "bye"})
			return
		default:
			emit(map[string]any{"event": "error", "error": fmt.Sprintf("unknown cmd %q", c.Cmd)})
		}
	}
	// stdin closed: the driver is gone; stop everything.
	prod.stop()
	fleet.closeAll()
}
