{{- define "kiln.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kiln.selector" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiln.secretName" -}}
{{ include "kiln.fullname" . }}-secrets
{{- end -}}

{{/* A value kept across upgrades: the given one, else the one in the existing Secret, else a new random one. */}}
{{- define "kiln.keep" -}}
{{- $given := index . 0 -}}{{- $existing := index . 1 -}}{{- $key := index . 2 -}}
{{- if $given -}}
{{- $given -}}
{{- else if and $existing (index $existing.data $key) -}}
{{- index $existing.data $key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}

{{- define "kiln.masterImage" -}}
{{ .Values.image.master.repository }}:{{ .Values.image.master.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kiln.workerImage" -}}
{{ .Values.image.worker.repository }}:{{ .Values.image.worker.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kiln.workerDeployment" -}}
{{ include "kiln.fullname" .root }}-worker-{{ .pool.name }}
{{- end -}}

{{/* The Secret a listener's TLS comes from: the one named, else the one the chart's cert-manager
Certificate fills, else none. Called with (dict "root" $ "tls" .Values.workerTLS "suffix" "worker-tls"). */}}
{{- define "kiln.tlsSecret" -}}
{{- if .tls.secretName -}}
{{- .tls.secretName -}}
{{- else if .tls.certManager.issuerRef -}}
{{- include "kiln.fullname" .root }}-{{ .suffix -}}
{{- end -}}
{{- end -}}

{{- define "kiln.workerTLSSecret" -}}
{{- include "kiln.tlsSecret" (dict "root" . "tls" .Values.workerTLS "suffix" "worker-tls") -}}
{{- end -}}

{{- define "kiln.apiTLSSecret" -}}
{{- include "kiln.tlsSecret" (dict "root" . "tls" .Values.apiTLS "suffix" "api-tls") -}}
{{- end -}}

{{/* Where the worker Deployments, their Secret and the master's Role over them live. */}}
{{- define "kiln.workerNamespace" -}}
{{- .Values.workerNamespace | default .Release.Namespace -}}
{{- end -}}

{{/* The master's Service as a worker dials it: the short name in the master's namespace, the
namespace-qualified one from a namespace of their own. */}}
{{- define "kiln.masterHost" -}}
{{- if .Values.workerNamespace -}}
{{ include "kiln.fullname" . }}-master.{{ .Release.Namespace }}.svc
{{- else -}}
{{ include "kiln.fullname" . }}-master
{{- end -}}
{{- end -}}

{{/* The Secret worker pods read their token from: the chart's own, or its copy in the workers'
namespace. */}}
{{- define "kiln.workerSecretName" -}}
{{- if .Values.workerNamespace -}}
{{ include "kiln.fullname" . }}-worker-token
{{- else -}}
{{ include "kiln.secretName" . }}
{{- end -}}
{{- end -}}
