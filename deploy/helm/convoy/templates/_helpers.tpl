{{/*
Names and labels. Every object takes its labels from "convoy.labels" and every selector
from "convoy.selectorLabels", so a selector can never drift from the pods it selects.
*/}}

{{- define "convoy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Truncated to 52 so that "-headless" and "-metrics" suffixes stay within 63. */}}
{{- define "convoy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "convoy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "convoy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "convoy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "convoy.labels" -}}
helm.sh/chart: {{ include "convoy.chart" . }}
{{ include "convoy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: convoy
{{- end }}

{{- define "convoy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "convoy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "convoy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Seconds before SIGTERM: every client connection has aged out and re-resolved
(ceil(1.1 * age) + a 5 s DNS TTL), unless set. */}}
{{- define "convoy.preStopSeconds" -}}
{{- $set := .Values.lifecycle.preStopSleepSeconds }}
{{- $age := .Values.server.maxConnectionAgeMs | int64 }}
{{- if not (kindIs "invalid" $set) }}
{{- $set | int64 }}
{{- else if gt $age 0 }}
{{- add (div (add (mul $age 11) 9999) 10000) 5 }}
{{- else }}
{{- 10 }}
{{- end }}
{{- end }}

{{/* SIGKILL comes this long after the pod starts terminating: preStop + drain + margin. */}}
{{- define "convoy.terminationGracePeriodSeconds" -}}
{{- $grace := .Values.server.gracePeriodSeconds | float64 | ceil | int64 }}
{{- $preStop := include "convoy.preStopSeconds" . | int64 }}
{{- add $preStop $grace .Values.lifecycle.terminationMarginSeconds }}
{{- end }}

{{/* The PromQL series of one release's pods: the ServiceMonitor labels them by Service. */}}
{{- define "convoy.metricsSelector" -}}
namespace="{{ .Release.Namespace }}",service="{{ include "convoy.fullname" . }}-metrics"
{{- end }}

{{/* Mean in-flight requests of one pod over the window, all models summed. */}}
{{- define "convoy.inflightQuery" -}}
sum by (<<.GroupBy>>) (avg_over_time(<<.Series>>{<<.LabelMatchers>>}[{{ .Values.autoscaling.window }}]))
{{- end }}

{{/* `convoy serve` flags, all from values. */}}
{{- define "convoy.args" -}}
{{- /* No repository: `convoy serve` builds its examples into CONVOY_CACHE_DIR. */}}
{{- if ne .Values.modelRepository.source "examples" }}
- --model-repository
- {{ .Values.modelRepository.mountPath | quote }}
{{- end }}
- --grpc-port
- {{ .Values.server.grpcPort | quote }}
- --metrics-port
- {{ .Values.server.metricsPort | quote }}
- --grace-period
- {{ .Values.server.gracePeriodSeconds | quote }}
- --max-connection-age-ms
- {{ .Values.server.maxConnectionAgeMs | int64 | quote }}
- --max-queue-size
- {{ .Values.server.maxQueueSize | int64 | quote }}
- --max-message-mb
- {{ .Values.server.maxMessageMb | int64 | quote }}
- --log-level
- {{ .Values.server.logLevel | quote }}
- --frontends
- {{ .Values.server.frontends | int64 | quote }}
- --frontend-shm-mib
- {{ .Values.server.frontendShmMiB | int64 | quote }}
{{- /* The repository is read-only here: rollout state goes to the writable cache. */}}
- --rollout-state-dir
- {{ printf "%s/rollouts" .Values.cache.mountPath | quote }}
{{- if gt (.Values.server.repositoryPollSeconds | float64) 0.0 }}
- --repository-poll-secs
- {{ .Values.server.repositoryPollSeconds | quote }}
{{- end }}
{{- if not .Values.server.reflection }}
- --no-reflection
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/convoy/tls/tls.crt
- --tls-key
- /etc/convoy/tls/tls.key
{{- if .Values.tls.mutual }}
- --tls-ca
- /etc/convoy/tls/ca.crt
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- --auth-tokens
- {{ printf "/etc/convoy/auth/%s" .Values.auth.key | quote }}
{{- end }}
{{- if gt (.Values.auth.rateLimit | float64) 0.0 }}
- --rate-limit
- {{ .Values.auth.rateLimit | quote }}
{{- if gt (.Values.auth.rateBurst | float64) 0.0 }}
- --rate-burst
- {{ .Values.auth.rateBurst | quote }}
{{- end }}
{{- end }}
{{- if include "convoy.sloConfig" . }}
- --slo-config
- /etc/convoy/slo/slo.yaml
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
A probe's action. Kubernetes' gRPC probe speaks plaintext only, so with TLS the image's
Python grpc client checks grpc.health.v1 over TLS instead (with the server's own certificate
as client certificate when TLS is mutual).
*/}}
{{- define "convoy.probeAction" -}}
{{- if .Values.tls.enabled }}
{{- $name := default (printf "%s.%s.svc" (include "convoy.fullname" .) .Release.Namespace) .Values.probes.tlsServerName -}}
exec:
  command:
    - python3
    - -c
    - |
      import os, sys, grpc
      from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
      d = "/etc/convoy/tls/"
      r = lambda f: open(d + f, "rb").read()
      ca = r("ca.crt") if os.path.exists(d + "ca.crt") else r("tls.crt")
      {{- if and .Values.tls.mutual .Values.tls.probeClientSecretName }}
      p = lambda f: open("/etc/convoy/probe-client/" + f, "rb").read()
      creds = grpc.ssl_channel_credentials(ca, p("tls.key"), p("tls.crt"))
      {{- else if .Values.tls.mutual }}
      creds = grpc.ssl_channel_credentials(ca, r("tls.key"), r("tls.crt"))
      {{- else }}
      creds = grpc.ssl_channel_credentials(ca)
      {{- end }}
      opts = [("grpc.ssl_target_name_override", {{ $name | quote }})]
      c = grpc.secure_channel("127.0.0.1:{{ .Values.server.grpcPort }}", creds, opts)
      s = g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=4).status
      sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)
{{- else -}}
grpc:
  port: {{ .Values.server.grpcPort }}
  service: ""
{{- end }}
{{- end }}

{{/* Scale up at once, scale down slowly: a queue builds in seconds, a burst may return. */}}
{{- define "convoy.scalingBehavior" -}}
{{- $up := .Values.autoscaling.scaleUp }}
{{- $down := .Values.autoscaling.scaleDown -}}
scaleUp:
  stabilizationWindowSeconds: {{ $up.stabilizationWindowSeconds }}
  selectPolicy: Max
  policies:
    - type: Percent
      value: {{ $up.percent }}
      periodSeconds: {{ $up.periodSeconds }}
    - type: Pods
      value: {{ $up.pods }}
      periodSeconds: {{ $up.periodSeconds }}
scaleDown:
  stabilizationWindowSeconds: {{ $down.stabilizationWindowSeconds }}
  selectPolicy: Max
  policies:
    - type: Percent
      value: {{ $down.percent }}
      periodSeconds: {{ $down.periodSeconds }}
{{- end }}

{{- /* The objectives passed to `convoy serve --slo-config` (docs/slo.md): slo.config, else,
serving the built-in examples, the chart's files/slo.yaml; empty: none (a repository of
your own declares them in slo.yaml beside each model). */}}
{{- define "convoy.sloConfig" -}}
{{- if .Values.slo.enabled }}
{{- if .Values.slo.config }}
{{- .Values.slo.config }}
{{- else if eq .Values.modelRepository.source "examples" }}
{{- .Files.Get "files/slo.yaml" }}
{{- end }}
{{- end }}
{{- end }}

{{- /* The rules `convoy slo rules` generated for those objectives: slo.rules, else, serving
the built-in examples, the chart's files/slo-rules.yml (generated from files/slo.yaml). */}}
{{- define "convoy.sloRules" -}}
{{- if .Values.slo.enabled }}
{{- if .Values.slo.rules }}
{{- .Values.slo.rules }}
{{- else if eq .Values.modelRepository.source "examples" }}
{{- .Files.Get "files/slo-rules.yml" }}
{{- end }}
{{- end }}
{{- end }}
