{{/*
Helpers of the Blackhole chart. Labels follow the Kubernetes recommended
ones; app.kubernetes.io/name is always "blackhole", because the
NetworkPolicies the controller makes for plugins let in pods labelled
name=blackhole, component=controller.
*/}}

{{/* The name of the release's objects and of the leader Lease. */}}
{{- define "blackhole.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "blackhole.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: blackhole
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: blackhole
{{- end -}}

{{/* The controller pods' labels that Deployments, Services and the PodDisruptionBudget select. */}}
{{- define "blackhole.selectorLabels" -}}
app.kubernetes.io/name: blackhole
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* The gateway pods' labels that its Deployment and Services select. */}}
{{- define "blackhole.gatewaySelectorLabels" -}}
app.kubernetes.io/name: blackhole
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* The gateway pods' labels: podLabels, under the chart's own (which win). */}}
{{- define "blackhole.gatewayPodLabels" -}}
{{- $labels := include "blackhole.labels" . | fromYaml -}}
{{- $_ := set $labels "app.kubernetes.io/component" "gateway" -}}
{{- toYaml (merge $labels (deepCopy .Values.podLabels)) -}}
{{- end -}}

{{/* The Secret holding the control secret the controller proves to the gateways (key "secret"). */}}
{{- define "blackhole.controlSecretName" -}}
{{- default (printf "%s-gateway-control" (include "blackhole.fullname" .)) .Values.gateway.controlSecret.existingSecret -}}
{{- end -}}

{{/* The label the leader puts on its own pod (and takes off when it steps down). */}}
{{- define "blackhole.leaderLabel" -}}
blackhole.dev/leader: "true"
{{- end -}}

{{- define "blackhole.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "blackhole.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: give the ServiceAccount to use when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The controller image: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "blackhole.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding tokens.yaml; fails unless exactly one of existingSecret and items is given. */}}
{{- define "blackhole.tokensSecretName" -}}
{{- $tokens := .Values.gateway.tokens -}}
{{- if and $tokens.existingSecret $tokens.items -}}
{{- fail "gateway.tokens: give either existingSecret or items, not both" -}}
{{- else if $tokens.existingSecret -}}
{{- $tokens.existingSecret -}}
{{- else if $tokens.items -}}
{{- printf "%s-gateway-tokens" (include "blackhole.fullname" .) -}}
{{- else -}}
{{- fail "gateway.tokens: the gateway listens on the pod network, so it needs tokens: set gateway.tokens.existingSecret (a Secret with a key tokens.yaml) or gateway.tokens.items (each {name, sha256, plugins}; see the chart's values.yaml)" -}}
{{- end -}}
{{- end -}}

{{/* The tokens file the chart's Secret holds (controller/gateway/auth.py reads it). */}}
{{- define "blackhole.tokensFile" -}}
{{- $tokens := list -}}
{{- range .Values.gateway.tokens.items -}}
{{- $entry := dict "name" .name "plugins" .plugins -}}
{{- with .sha256 }}{{ $_ := set $entry "sha256" . }}{{ end -}}
{{- with .certificates }}{{ $_ := set $entry "certificates" . }}{{ end -}}
{{- $tokens = append $tokens $entry -}}
{{- end -}}
{{- toYaml (dict "tokens" $tokens) -}}
{{- end -}}

{{/* The RBAC rules, by scope: files/rbac-rules.yaml. */}}
{{- define "blackhole.rbacRules" -}}
{{- .Files.Get "files/rbac-rules.yaml" -}}
{{- end -}}

{{/* The security context of every container: non-root, nothing writable but its volumes, no capability. */}}
{{- define "blackhole.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The controller pods' labels: podLabels, under the chart's own (which win). */}}
{{- define "blackhole.podLabels" -}}
{{- $labels := include "blackhole.labels" . | fromYaml -}}
{{- $_ := set $labels "app.kubernetes.io/component" "controller" -}}
{{- toYaml (merge $labels (deepCopy .Values.podLabels)) -}}
{{- end -}}

{{/* The DNS pods' labels as --dns-selector takes them: key=value,... */}}
{{- define "blackhole.dnsSelector" -}}
{{- $terms := list -}}
{{- range $key, $value := .Values.plugins.dns.podLabels -}}
{{- $terms = append $terms (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $terms -}}
{{- end -}}
