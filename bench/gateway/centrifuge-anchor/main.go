// Command centrifuge-anchor is the benchmark anchor for the Fleetward gateway: Centrifugo's
// engine (the Go library github.com/centrifugal/centrifuge) fed from Kafka by a franz-go
// consumer, as Centrifugo's own Kafka consumer is. It does what the gateway does on its
// delivery path, through the library's documented API:
//
//   - a Node with the in-memory broker and the WebSocket handler (JSON protocol);
//   - OnConnecting checks the client's HS256 JWT like the gateway does (signature with the
//     shared secret, alg pinned to HS256, exp/aud/iss required with 5 s leeway, claims sub,
//     sid, role, agent required) and subscribes the connection server-side to the channel
//     named by `sid`: the analogue of the gateway's per-session routing;
//   - a consumer reading every partition of the events topic (no consumer group, from the
//     end, as each gateway replica does) that node.Publish-es each record's value to the
//     channel named by the record key (the session id).
//
// Differences from the gateway, all in the anchor's favour: the token comes in the connect
// command (Centrifuge's protocol) instead of an HTTP header; events are not parsed or
// validated (the gateway validates every envelope); no history is kept unless
// --history-size is set (the gateway keeps 256 events per session for resume).
//
// It listens on loopback only, serves GET /readyz (200 once the consumer is assigned), and
// stops on SIGTERM/SIGINT with node.Shutdown.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/golang-jwt/jwt/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// claims are those the gateway requires (docs/gateway-protocol.md, "The token").
type claims struct {
	Sid   string `json:"sid"`
	Role  string `json:"role"`
	Agent string `json:"agent"`
	jwt.RegisteredClaims
}

var (
	sessionID = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	agentRef  = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	roles     = map[string]bool{"user": true, "reviewer": true, "operator": true}
)

type verifier struct {
	parser *jwt.Parser
	secret []byte
}

func newVerifier(secret []byte, audience, issuer string) *verifier {
	return &verifier{
		parser: jwt.NewParser(
			jwt.WithValidMethods([]string{"HS256"}),
			jwt.WithAudience(audience),
			jwt.WithIssuer(issuer),
			jwt.WithExpirationRequired(),
			jwt.WithLeeway(5*time.Second),
		),
		secret: secret,
	}
}

func (v *verifier) verify(token string) (*claims, error) {
	if len(token) > 8192 {
		return nil, errors.New("oversized token")
	}
	c := &claims{}
	if _, err := v.parser.ParseWithClaims(token, c, func(*jwt.Token) (any, error) { return v.secret, nil }); err != nil {
		return nil, err
	}
	switch {
	case c.Subject == "":
		return nil, errors.New("missing claim sub")
	case !sessionID.MatchString(c.Sid):
		return nil, errors.New("bad claim sid")
	case !roles[c.Role]:
		return nil, errors.New("bad claim role")
	case !agentRef.MatchString(c.Agent):
		return nil, errors.New("bad claim agent")
	}
	return c, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8090", "loopback address to listen on")
	bootstrap := flag.String("kafka-bootstrap", "", "Kafka bootstrap servers (host:port)")
	topic := flag.String("events-topic", "fleetward.events", "events topic (key = session id)")
	audience := flag.String("jwt-audience", "", "required aud claim")
	issuer := flag.String("jwt-issuer", "", "required iss claim")
	historySize := flag.Int("history-size", 0, "publications kept per channel (0: none, the library's default)")
	historyTTL := flag.Duration("history-ttl", time.Hour, "history retention when --history-size > 0")
	flag.Parse()

	secret := os.Getenv("ANCHOR_JWT_HS256_SECRET")
	switch {
	case *bootstrap == "":
		log.Fatal("--kafka-bootstrap is required")
	case *audience == "" || *issuer == "":
		log.Fatal("--jwt-audience and --jwt-issuer are required")
	case len(secret) < 32:
		log.Fatal("ANCHOR_JWT_HS256_SECRET must hold an HS256 secret of at least 32 bytes")
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil || host != "127.0.0.1" {
		log.Fatalf("--listen=%q: must be 127.0.0.1:<port> (the benchmark stays on loopback)", *listen)
	}

	node, err := centrifuge.New(centrifuge.Config{
		Name:     "centrifuge-anchor",
		LogLevel: centrifuge.LogLevelError,
		LogHandler: func(e centrifuge.LogEntry) {
			log.Printf("centrifuge: %s %v", e.Message, e.Fields)
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	broker, err := centrifuge.NewMemoryBroker(node, centrifuge.MemoryBrokerConfig{})
	if err != nil {
		log.Fatal(err)
	}
	node.SetBroker(broker)

	auth := newVerifier([]byte(secret), *audience, *issuer)
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		c, err := auth.verify(e.Token)
		if err != nil {
			if errors.Is(err, jwt.ErrTokenExpired) {
				return centrifuge.ConnectReply{}, centrifuge.ErrorTokenExpired
			}
			return centrifuge.ConnectReply{}, centrifuge.DisconnectInvalidToken
		}
		return centrifuge.ConnectReply{
			Credentials:   &centrifuge.Credentials{UserID: c.Subject, ExpireAt: c.ExpiresAt.Unix()},
			Subscriptions: map[string]centrifuge.SubscribeOptions{c.Sid: {}},
		}, nil
	})
	// Clients only receive; OnConnect sets no handlers, so client-side subscribe/publish
	// requests are refused by the library (ErrorNotAvailable).
	node.OnConnect(func(*centrifuge.Client) {})
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	var ready atomic.Bool
	var published, failed atomic.Int64
	consumer, err := newConsumer(ctx, *bootstrap, *topic)
	if err != nil {
		log.Fatal(err)
	}
	var opts []centrifuge.PublishOption
	if *historySize > 0 {
		opts = append(opts, centrifuge.WithHistory(*historySize, *historyTTL))
	}
	go func() {
		ready.Store(true)
		for {
			fetches := consumer.PollFetches(ctx)
			if ctx.Err() != nil {
				return
			}
			fetches.EachError(func(t string, p int32, err error) {
				log.Printf("kafka fetch %s/%d: %v", t, p, err)
			})
			fetches.EachRecord(func(r *kgo.Record) {
				if _, err := node.Publish(string(r.Key), r.Value, opts...); err != nil {
					failed.Add(1)
					return
				}
				published.Add(1)
			})
		}
	}()

	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{
		// The library's example settings for many connections (_examples/jwt_token).
		ReadBufferSize:     1024,
		UseWriteBufferPool: true,
	}))
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"published": %d, "publish_errors": %d, "clients": %d}`+"\n",
			published.Load(), failed.Load(), node.Hub().NumClients())
	})
	server := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := server.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Fatal(err)
		}
	}()
	log.Printf("centrifuge-anchor listening on %s, topic %s", *listen, *topic)

	<-ctx.Done()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = server.Shutdown(shutdownCtx)
	_ = node.Shutdown(shutdownCtx)
	consumer.Close()
}

// newConsumer assigns every partition of the topic at its current end (what a gateway replica
// does: no consumer group, live events from now on).
func newConsumer(ctx context.Context, bootstrap, topic string) (*kgo.Client, error) {
	admin, err := kgo.NewClient(kgo.SeedBrokers(bootstrap))
	if err != nil {
		return nil, err
	}
	defer admin.Close()
	listCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(admin).ListEndOffsets(listCtx, topic)
	if err != nil {
		return nil, fmt.Errorf("list end offsets of %s: %w", topic, err)
	}
	if err := ends.Error(); err != nil {
		return nil, fmt.Errorf("list end offsets of %s: %w", topic, err)
	}
	start := map[int32]kgo.Offset{}
	ends.Each(func(o kadm.ListedOffset) { start[o.Partition] = kgo.NewOffset().At(o.Offset) })
	if len(start) == 0 {
		return nil, fmt.Errorf("topic %s has no partitions", topic)
	}
	return kgo.NewClient(
		kgo.SeedBrokers(bootstrap),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: start}),
	)
}
