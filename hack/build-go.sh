#!/usr/bin/env bash
# Build the Go components of the local cluster from their modules, cached by version:
#   kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#   etcd        etcd server (wrapper module around go.etcd.io/etcd/server/v3)
#   kwok        simulated nodes for scale tests
#   helm        the Helm CLI
#   argocd-health  runs the Argo CD health checks in argocd/ as Argo CD does (their tests)
# Usage: hack/build-go.sh [component...]   (default: all)
source "$(dirname "$0")/lib.sh"

build_kubernetes() {
  local out=$CACHE/kubernetes-v$KUBERNETES_VERSION
  [[ -x $out/kubectl && -x $out/kube-apiserver && -f $out/.complete ]] && { note "kubernetes v$KUBERNETES_VERSION cached"; return; }
  local major=${KUBERNETES_VERSION%%.*} minor
  minor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")
  local v=v$KUBERNETES_VERSION ldflags="-s -w"
  # The version ldflags make `kubectl version` and /version report the real release.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$out"
  (cd "$REPO/hack/go/kubernetes" && run_step "build kubernetes $v (apiserver, controller-manager, scheduler, kubectl; ~8 min cold)" \
    "$CACHE/logs/build-kubernetes.log" \
    go build -trimpath -ldflags "$ldflags" -o "$out/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  touch "$out/.complete"
}

build_simple() {  # build_simple NAME VERSION PACKAGE BINARY
  local name=$1 version=$2 pkg=$3 bin=$4
  local out=$CACHE/$name-v$version
  [[ -x $out/$bin && -f $out/.complete ]] && { note "$name v$version cached"; return; }
  mkdir -p "$out"
  (cd "$REPO/hack/go/$name" && run_step "build $name v$version" "$CACHE/logs/build-$name.log" \
    go build -trimpath -ldflags "-s -w" -o "$out/$bin" "$pkg")
  touch "$out/.complete"
}

# Helm as its release Makefile builds it: without these ldflags the binary reports itself as
# "v3.22" and assumes Kubernetes v1.20 when no cluster is asked (`helm template`, `helm lint`),
# which the chart's kubeVersion (>=1.33) refuses. The default version follows client-go's, as
# in Helm's Makefile. The marker in .complete says which recipe built a cached binary.
build_helm() {
  local out=$CACHE/helm-v$HELM_VERSION recipe="ldflags: version, kube defaults from client-go"
  [[ -x $out/helm && $(cat "$out/.complete" 2>/dev/null) == "$recipe" ]] && { note "helm v$HELM_VERSION cached"; return; }
  local client_go major minor ldflags="-s -w"
  client_go=$(cd "$REPO/hack/go/helm" && go list -m -f '{{.Version}}' k8s.io/client-go) || die "cannot read helm's client-go version"
  client_go=${client_go#v}
  major=$(( ${client_go%%.*} + 1 ))
  minor=$(cut -d. -f2 <<<"$client_go")
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done
  mkdir -p "$out"
  (cd "$REPO/hack/go/helm" && run_step "build helm v$HELM_VERSION (default Kubernetes v$major.$minor)" \
    "$CACHE/logs/build-helm.log" go build -trimpath -ldflags "$ldflags" -o "$out/helm" helm.sh/helm/v3/cmd/helm)
  echo "$recipe" >"$out/.complete"
}

# kwok simulates nodes and pods through "stages"; it ships its standard "fast" set
# (ready at once, heartbeat through leases) in its module, the same set `kwokctl` uses.
kwok_stages() {
  local out=$CACHE/kwok-v$KWOK_VERSION/stages
  [[ -f $out/.complete ]] && return
  local dir
  dir=$(cd "$REPO/hack/go/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok) || die "cannot locate the kwok module"
  mkdir -p "$out"
  cp "$dir/kustomize/stage/node/fast/node-initialize.yaml" \
     "$dir/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
     "$dir"/kustomize/stage/pod/fast/pod-{ready,complete,delete}.yaml "$out/"
  chmod u+w "$out"/*.yaml
  touch "$out/.complete"
  note "kwok stages copied to $out"
}

# The health-check harness has no release version: its cache key is a hash of its module
# files, so editing main.go or bumping gopher-lua rebuilds it. tests/support/argocd.py
# computes the same key to find the binary.
argocd_health_key() {
  cat "$REPO"/hack/go/argocd-health/{go.mod,go.sum,main.go} | sha256sum | cut -c1-12
}

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(etcd kubernetes kwok helm argocd-health)
command -v go >/dev/null || die "Go is not installed (needed to build the local cluster)"
for c in "${components[@]}"; do
  case $c in
    kubernetes) build_kubernetes ;;
    etcd) build_simple etcd "$ETCD_VERSION" . etcd ;;
    kwok) build_simple kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok kwok; kwok_stages ;;
    helm) build_helm ;;
    argocd-health) build_simple argocd-health "$(argocd_health_key)" . argocd-health ;;
    *) die "unknown component '$c' (known: kubernetes etcd kwok helm argocd-health)" ;;
  esac
done
