{{- define "fleetward.labels" -}}
app.kubernetes.io/name: fleetward
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fleetward
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "fleetward.operatorName" -}}
{{ .Release.Name }}-operator
{{- end }}

{{- define "fleetward.postgresqlName" -}}
{{ .Release.Name }}-postgresql
{{- end }}

{{- /* Rules on namespaced objects the operator manages: granted cluster-wide or per watched namespace. */ -}}
{{- define "fleetward.namespacedRules" -}}
- apiGroups: [fleetward.dev]
  resources: [agents, sops, guardrails]
  verbs: [get, list, watch, patch, update]
- apiGroups: [fleetward.dev]
  resources: [agents/status, sops/status, guardrails/status]
  verbs: [get, patch, update]
# Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: [fleetward.dev]
  resources: [agents/finalizers]
  verbs: [update]
# Secrets by name only: the agent's credentials and model copy, and the Secrets Agents name.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps, serviceaccounts, services]
  verbs: [get, create, update, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, update, patch, delete]
# The runtimes' state claims (runtime.stateVolume); get: an existing claim's spec is kept.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, patch, delete]
# The kill switch lists runtime pods to wait for their drain and deletes those that never ack.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{- define "fleetward.settings" -}}
installationId: {{ .Values.installationId | quote }}
namespace: {{ .Release.Namespace | quote }}
watchNamespaces: {{ .Values.watchNamespaces | toJson }}
excludeNamespaces: {{ .Values.excludeNamespaces | toJson }}
trustBundleName: {{ .Values.trustBundle.name | quote }}
resyncSeconds: {{ .Values.operator.resyncSeconds }}
maxConcurrentReconciles: {{ .Values.operator.maxConcurrentReconciles }}
apiConnections: {{ .Values.operator.apiConnections }}
peering: {{ if .Values.operator.peering }}{{ .Release.Name | quote }}{{ else }}null{{ end }}
# In the settings (and so in the operator's checksum annotation): a price change restarts it.
modelPrices: {{ .Values.modelPrices | default dict | toJson }}
telemetry:
  otlpEndpoint: {{ .Values.telemetry.otlpEndpoint | default nil | toJson }}
webhook:
  enabled: {{ .Values.webhook.enabled }}
  listenAddress: {{ .Values.webhook.listenAddress | quote }}
  port: {{ .Values.webhook.port }}
kafka:
  bootstrapServers: {{ .Values.kafka.bootstrapServers | quote }}
  securityProtocol: {{ .Values.kafka.securityProtocol | quote }}
  saslMechanism: {{ .Values.kafka.saslMechanism | toJson }}
  adminUsername: {{ .Values.kafka.adminUsername | toJson }}
  managePrincipals: {{ .Values.kafka.managePrincipals | toJson }}
  requestTopicPartitions: {{ .Values.kafka.requestTopicPartitions }}
  sharedTopicPartitions: {{ .Values.kafka.sharedTopicPartitions }}
  replicationFactor: {{ .Values.kafka.replicationFactor }}
  deleteTopicsWithAgent: {{ .Values.kafka.deleteTopicsWithAgent }}
  auditTopicRetentionMs: {{ .Values.kafka.auditTopicRetentionMs | int64 }}
topics: {{ .Values.topics | toJson }}
runtime:
  image: {{ .Values.runtime.image | quote }}
  imagePullPolicy: {{ .Values.runtime.imagePullPolicy | quote }}
  command: {{ .Values.runtime.command | toJson }}
  port: {{ .Values.runtime.port }}
  runAsUser: {{ .Values.runtime.runAsUser }}
  resources: {{ .Values.runtime.resources | toJson }}
  databaseSecret: {{ .Values.runtime.databaseSecret | default nil | toJson }}
  {{- if and .Values.postgresql.enabled (not .Values.runtime.databaseSecret) }}
  databaseSource: {name: {{ include "fleetward.postgresqlName" . | quote }}, key: dsn}
  {{- end }}
  piiHashKeySource: {name: {{ include "fleetward.piiHashKeySecret" . | quote }}, key: hash-key}
  stateVolume:
    enabled: {{ .Values.runtime.stateVolume.enabled }}
    size: {{ .Values.runtime.stateVolume.size | quote }}
    storageClassName: {{ .Values.runtime.stateVolume.storageClassName | default nil | toJson }}
gateway:
  enabled: {{ .Values.gateway.enabled }}
  name: {{ printf "%s-gateway" .Release.Name | quote }}
  image: {{ .Values.gateway.image | quote }}
  imagePullPolicy: {{ .Values.gateway.imagePullPolicy | quote }}
  command: {{ .Values.gateway.command | toJson }}
  port: {{ .Values.gateway.port }}
  replicas: {{ .Values.gateway.replicas }}
  autoscaling: {{ .Values.gateway.autoscaling | toJson }}
  resources: {{ .Values.gateway.resources | toJson }}
  maxConnections: {{ .Values.gateway.maxConnections }}
  auth:
    audience: {{ .Values.gateway.auth.audience | quote }}
    issuer: {{ .Values.gateway.auth.issuer | quote }}
    leewaySeconds: {{ .Values.gateway.auth.leewaySeconds }}
    allowQueryToken: {{ .Values.gateway.auth.allowQueryToken }}
    jwksUrl: {{ .Values.gateway.auth.jwksUrl | default nil | toJson }}
    trustBundle: {{ .Values.gateway.auth.trustBundle }}
    hs256Secret: {"name": {{ include "fleetward.gatewaySecret" . | quote }}, "key": "hs256"}
{{- end }}

{{- define "fleetward.piiHashKeySecret" -}}
{{ .Values.runtime.piiHashKeySecretName | default (printf "%s-pii-hash-key" .Release.Name) }}
{{- end }}

{{- define "fleetward.gatewaySecret" -}}
{{ .Values.gateway.auth.hs256SecretName | default (printf "%s-gateway-auth" .Release.Name) }}
{{- end }}

{{- /* clientConfig of a webhook: a URL (local cluster, no Service networking) or the operator Service. */ -}}
{{- define "fleetward.webhookClient" -}}
{{- $name := include "fleetward.operatorName" .root }}
{{- if .root.Values.webhook.url }}
url: {{ printf "%s/%s" (trimSuffix "/" .root.Values.webhook.url) .path }}
{{- else }}
service: {name: {{ $name }}, namespace: {{ .root.Release.Namespace }}, path: /{{ .path }}, port: 443}
{{- end }}
caBundle: {{ .ca }}
{{- end }}

{{/*
Whether a monitoring.coreos.com object is rendered: `enabled: true`/`false` as set, `auto`
when the cluster serves its kind (prometheus-operator's CRDs are installed).
Call: include "fleetward.monitoringOn" (list .Values.monitoring.rules.enabled "PrometheusRule" $)
*/}}
{{- define "fleetward.monitoringOn" -}}
{{- $setting := toString (index . 0) -}}
{{- $root := index . 2 -}}
{{- if eq $setting "auto" -}}
{{- $root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" (index . 1)) -}}
{{- else -}}
{{- eq $setting "true" -}}
{{- end -}}
{{- end }}
