{{/* Names, labels and shared pod parts of the Reflow chart. */}}

{{- define "reflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "reflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: reflow.component (dict "root" . "component" "data-plane"). */}}
{{- define "reflow.component" -}}
{{- printf "%s-%s" (include "reflow.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: never change them (a Deployment's selector is immutable; tests/upgrade checks). */}}
{{- define "reflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reflow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "reflow.labels" -}}
{{ include "reflow.selectorLabels" . }}
app.kubernetes.io/part-of: reflow
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels on objects that belong to no one component. */}}
{{- define "reflow.commonLabels" -}}
app.kubernetes.io/name: {{ include "reflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: reflow
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "reflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "reflow.secretName" -}}
{{- default (printf "%s-secrets" (include "reflow.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The Secret holding one side's certificate: reflow.tlsSecret (dict "root" . "side" "control-plane"). */}}
{{- define "reflow.tlsSecret" -}}
{{- if .root.Values.mtls.existingSecretPrefix -}}
{{- printf "%s-%s" .root.Values.mtls.existingSecretPrefix .side -}}
{{- else -}}
{{- printf "%s-%s-tls" (include "reflow.fullname" .root) .side -}}
{{- end -}}
{{- end -}}

{{- define "reflow.instanceNamespace" -}}
{{- default .Release.Namespace .Values.operator.instanceNamespace -}}
{{- end -}}

{{- define "reflow.grpcService" -}}
{{- printf "%s-grpc" (include "reflow.component" (dict "root" . "component" "control-plane")) -}}
{{- end -}}

{{/* The control plane's snapshot address as data planes dial it. */}}
{{- define "reflow.controlPlaneAddress" -}}
{{- printf "%s://%s.%s.svc:%v" (ternary "https" "http" .Values.mtls.enabled) (include "reflow.grpcService" .) .Release.Namespace .Values.controlPlane.service.grpcPort -}}
{{- end -}}

{{/* A secretKeyRef env entry: reflow.secretEnv (list . "JWT_SECRET" "jwt-secret"). */}}
{{- define "reflow.secretEnv" -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ include "reflow.secretName" (index . 0) }}
      key: {{ index . 2 }}
{{- end -}}

{{- define "reflow.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "reflow.securityContext" -}}
{{- toYaml .Values.securityContext -}}
{{- end -}}

{{/* Required values, with messages that say what to set. */}}
{{- define "reflow.validate" -}}
{{- if not .Values.config.database.host -}}
{{- fail "config.database.host is required: the PostgreSQL server of the control plane (e.g. --set config.database.host=my-postgres.default.svc)" -}}
{{- end -}}
{{- if and (not .Values.secrets.existingSecret) (not .Values.secrets.dbPassword) -}}
{{- fail "secrets.dbPassword is required (the password of config.database.user), or name a Secret of your own in secrets.existingSecret" -}}
{{- end -}}
{{- if and .Values.secrets.jwtSecret (lt (len .Values.secrets.jwtSecret) 32) -}}
{{- fail "secrets.jwtSecret must be at least 32 bytes (e.g. $(openssl rand -hex 32))" -}}
{{- end -}}
{{- if and .Values.secrets.dataPlaneToken (lt (len .Values.secrets.dataPlaneToken) 16) -}}
{{- fail "secrets.dataPlaneToken must be at least 16 bytes" -}}
{{- end -}}
{{- if and .Values.mtls.certManager.enabled (not .Values.mtls.certManager.issuerRef.name) -}}
{{- fail "mtls.certManager.issuerRef.name is required when mtls.certManager.enabled is true" -}}
{{- end -}}
{{- if and .Values.mtls.certManager.enabled .Values.mtls.existingSecretPrefix -}}
{{- fail "set either mtls.certManager.enabled or mtls.existingSecretPrefix, not both" -}}
{{- end -}}
{{- if lt (int .Values.controlPlane.replicas) 1 -}}
{{- fail "controlPlane.replicas must be at least 1" -}}
{{- end -}}
{{- if and .Values.dataPlane.autoscaling.enabled (gt (int .Values.dataPlane.autoscaling.minReplicas) (int .Values.dataPlane.autoscaling.maxReplicas)) -}}
{{- fail "dataPlane.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}
