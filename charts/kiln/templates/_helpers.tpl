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
