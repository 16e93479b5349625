// The Argo CD health-check harness (hack/build-go.sh argocd-health). gopher-lua is the
// Lua VM Argo CD embeds; sigs.k8s.io/yaml reads objects and tests as Argo CD does.
module fleetward.dev/hack/argocd-health

go 1.26.0

require (
	github.com/yuin/gopher-lua v1.1.2
	sigs.k8s.io/yaml v1.6.0
)

require go.yaml.in/yaml/v2 v2.4.2 // indirect
