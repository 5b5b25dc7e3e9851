{{/* Chart name, overridable with nameOverride. */}}
{{- define "lb-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the release's objects: fullnameOverride, or RELEASE-NAME; just
RELEASE when it already contains NAME, just NAME when it starts with "RELEASE-"
(`helm install lb charts/lb-agent` makes "lb-agent"). 63 characters at most.
*/}}
{{- define "lb-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name -}}
{{- $name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lb-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the agent's pods (never change them on upgrade). */}}
{{- define "lb-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lb-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lb-agent.labels" -}}
helm.sh/chart: {{ include "lb-agent.chart" . }}
{{ include "lb-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: lb
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The ServiceAccount the agent runs as. */}}
{{- define "lb-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lb-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lb-agent.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* HOST:PORT for a bind-address flag; IPv6 addresses get brackets. */}}
{{- define "lb-agent.hostPort" -}}
{{- $addr := toString .address -}}
{{- if contains ":" $addr -}}
{{- printf "[%s]:%d" $addr (int .port) -}}
{{- else -}}
{{- printf "%s:%d" $addr (int .port) -}}
{{- end -}}
{{- end -}}

{{/*
The host the kubelet probes: empty (the node's address) unless healthz is
bound to a loopback address, which is reachable only there (hostNetwork).
*/}}
{{- define "lb-agent.probeHost" -}}
{{- $addr := toString .Values.agent.healthz.bindAddress -}}
{{- if or (hasPrefix "127." $addr) (eq $addr "::1") (eq $addr "localhost") -}}
{{- $addr -}}
{{- end -}}
{{- end -}}

{{/* Refuses values that would deploy a broken agent. */}}
{{- define "lb-agent.validate" -}}
{{- $root := trimSuffix "/" .Values.hostPaths.bpffs -}}
{{- $bpffs := toString .Values.agent.bpffs -}}
{{- if not (hasPrefix (printf "%s/" $root) $bpffs) -}}
{{- fail (printf "agent.bpffs (%s) must be a directory below hostPaths.bpffs (%s): pins elsewhere would live in the container and be lost on restart" $bpffs $root) -}}
{{- end -}}
{{- with .Values.agent.cgroupPath -}}
{{- $cg := trimSuffix "/" $.Values.hostPaths.cgroup -}}
{{- if and $.Values.agent.socketLB (ne (trimSuffix "/" (toString .)) $cg) (not (hasPrefix (printf "%s/" $cg) (toString .))) -}}
{{- fail (printf "agent.cgroupPath (%s) must be hostPaths.cgroup (%s) or below it: only the host's cgroup hierarchy is mounted into the container" . $cg) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) .Values.rbac.create (not .Values.serviceAccount.name) -}}
{{- fail "rbac.create=true with serviceAccount.create=false needs serviceAccount.name: the chart will not grant its ClusterRole to the namespace's default service account" -}}
{{- end -}}
{{- range list .Values.agent.healthz.port .Values.agent.metrics.port -}}
{{- if or (lt (int .) 1) (gt (int .) 65535) -}}
{{- fail (printf "ports must be between 1 and 65535, got %v" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
