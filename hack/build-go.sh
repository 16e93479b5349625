#!/usr/bin/env bash
# Build the Go components of the local cluster from their modules, cached by version:
#   kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#   etcd        etcd server (wrapper module around go.etcd.io/etcd/server/v3)
#   kwok        simulated nodes for scale tests
#   helm        the Helm CLI
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

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(etcd kubernetes kwok helm)
command -v go >/dev/null || die "Go is not installed (needed to build the local cluster)"
for c in "${components[@]}"; do
  case $c in
    kubernetes) build_kubernetes ;;
    etcd) build_simple etcd "$ETCD_VERSION" . etcd ;;
    kwok) build_simple kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok kwok; kwok_stages ;;
    helm) build_simple helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm helm ;;
    *) die "unknown component '$c' (known: kubernetes etcd kwok helm)" ;;
  esac
done
