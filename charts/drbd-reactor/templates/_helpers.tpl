{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "drbd-reactor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name (drbd-reactor). */}}
{{- define "drbd-reactor.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "drbd-reactor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "drbd-reactor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "drbd-reactor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "drbd-reactor.labels" -}}
helm.sh/chart: {{ include "drbd-reactor.chart" . }}
{{ include "drbd-reactor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: drbd-reactor
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "drbd-reactor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "drbd-reactor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "drbd-reactor.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the metrics Service; Prometheus' `job` label when scraped through the ServiceMonitor. */}}
{{- define "drbd-reactor.metricsService" -}}
{{- printf "%s-metrics" (include "drbd-reactor.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Whether the pod must be privileged: the promoter (the host's systemd) or `where: host` UMH rules.
*/}}
{{- define "drbd-reactor.privileged" -}}
{{- if or .Values.promoter.enabled .Values.umh.hostCommands }}true{{ end }}
{{- end }}
