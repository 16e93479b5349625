// Command etcd is the upstream etcd server built from its Go module
// (go.etcd.io/etcd/server/v3); etcd publishes no installable main package for
// the server, so this wrapper calls the same entry point the release binary uses.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
