{{/*
Names and labels, as `helm create` writes them.
*/}}
{{- define "streamproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamproxy.fullname" -}}
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

{{- define "streamproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamproxy.labels" -}}
helm.sh/chart: {{ include "streamproxy.chart" . }}
{{ include "streamproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "streamproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "streamproxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Seconds from a streamproxy duration (a number, or a string such as 500ms, 15s, 2m, 1h),
rounded up to a whole second. Mirrors config.parse_duration; the schema rejects the rest.
*/}}
{{- define "streamproxy.seconds" -}}
{{- $text := toString . | trim | lower }}
{{- $number := regexFind "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" $text }}
{{- if not $number }}
{{- fail (printf "cannot read %q as a duration: use seconds (15, 2.5) or a number with ms, s, m or h (500ms, 15s, 2m)" $text) }}
{{- end }}
{{- $unit := trimPrefix $number $text | trim }}
{{- $scale := get (dict "" 1.0 "s" 1.0 "ms" 0.001 "m" 60.0 "h" 3600.0) $unit }}
{{- if kindIs "invalid" $scale }}
{{- fail (printf "cannot read %q as a duration: unknown unit %q (use ms, s, m or h)" $text $unit) }}
{{- end }}
{{- mulf (float64 $number) $scale | ceil | int }}
{{- end }}

{{/*
shutdown.drain_timeout in whole seconds (30 when the key is absent, as in config.py).
*/}}
{{- define "streamproxy.drainSeconds" -}}
{{- $shutdown := .Values.config.shutdown | default dict }}
{{- include "streamproxy.seconds" (hasKey $shutdown "drain_timeout" | ternary $shutdown.drain_timeout 30) }}
{{- end }}

{{/*
The pod's grace period: above preStop + drain, so SIGKILL never cuts a draining stream.
*/}}
{{- define "streamproxy.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.preStopSleepSeconds) (int (include "streamproxy.drainSeconds" .)) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above preStopSleepSeconds + config.shutdown.drain_timeout (%d s), or streams are killed while draining; leave it empty for %d" (int .Values.terminationGracePeriodSeconds) $needed (add $needed 15)) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{- define "streamproxy.proxyPort" -}}
{{- dig "listen" "port" 8080 (.Values.config | default dict) | int }}
{{- end }}

{{- define "streamproxy.adminPort" -}}
{{- dig "admin" "port" 9090 (.Values.config | default dict) | int }}
{{- end }}

{{- define "streamproxy.workers" -}}
{{- dig "listen" "workers" 1 (.Values.config | default dict) | int }}
{{- end }}

{{/*
The rendered config.yaml (the ConfigMap's content).
*/}}
{{- define "streamproxy.configYaml" -}}
# Rendered by the streamproxy chart from the `config` values; see config.yaml in the
# streamproxy repository for every key. Check with: streamproxy check-config config.yaml
{{ toYaml .Values.config }}
{{- end }}

{{/*
The proxy container, shared by the Deployment and the sidecar. Called with a dict:
  ctx:       the chart context
  name:      container name
  portNames: {proxy: ..., admin: ...}
  native:    true for a native sidecar (restartPolicy: Always, no preStop sleep)
  sidecar:   true in a user's pod (bindLocalhost applies)
Rendered without a leading "- ", at indentation 0.
*/}}
{{- define "streamproxy.container" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
name: {{ .name }}
image: {{ include "streamproxy.image" $ctx | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if .native }}
# A native sidecar: starts before the app's containers and stops after them.
restartPolicy: Always
{{- end }}
env:
  - name: STREAMPROXY_CONFIG
    value: /etc/streamproxy/config.yaml
  - name: TMPDIR
    value: /tmp
  {{- if gt (int (include "streamproxy.workers" $ctx)) 1 }}
  # Worker processes share their metrics through files here (server.py wipes it on start).
  - name: PROMETHEUS_MULTIPROC_DIR
    value: /tmp/prometheus
  {{- end }}
  {{- if and .sidecar $v.sidecar.bindLocalhost }}
  # Only containers of this pod reach the proxy port.
  - name: STREAMPROXY_LISTEN__HOST
    value: 127.0.0.1
  {{- end }}
  {{- if and $v.existingSecret $v.existingSecretEnv }}
  {{- range $env, $key := $v.existingSecretEnv }}
  - name: {{ $env }}
    valueFrom:
      secretKeyRef:
        name: {{ $v.existingSecret }}
        key: {{ $key }}
  {{- end }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if and $v.existingSecret (not $v.existingSecretEnv) }}
envFrom:
  - secretRef:
      name: {{ $v.existingSecret }}
{{- end }}
ports:
  - name: {{ .portNames.proxy }}
    containerPort: {{ include "streamproxy.proxyPort" $ctx }}
    protocol: TCP
  - name: {{ .portNames.admin }}
    containerPort: {{ include "streamproxy.adminPort" $ctx }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /readyz
    port: {{ .portNames.admin }}
  {{- toYaml $v.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .portNames.admin }}
  {{- toYaml $v.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .portNames.admin }}
  {{- toYaml $v.probes.readiness | nindent 2 }}
{{- if and (not .native) (gt (int $v.preStopSleepSeconds) 0) }}
lifecycle:
  # Keep serving while the endpoint is removed everywhere; SIGTERM (drain) comes after.
  preStop:
    exec:
      command: ["sleep", "{{ int $v.preStopSleepSeconds }}"]
{{- end }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
volumeMounts:
  - name: streamproxy-config
    mountPath: /etc/streamproxy
    readOnly: true
  - name: streamproxy-tmp
    mountPath: /tmp
{{- end }}

{{/*
The proxy's volumes: the config and a writable /tmp. Items without indentation.
*/}}
{{- define "streamproxy.volumes" -}}
- name: streamproxy-config
  configMap:
    name: {{ include "streamproxy.fullname" . }}
- name: streamproxy-tmp
  emptyDir:
    {{- with .Values.tmpVolume.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.tmpVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{/*
PUBLIC: the proxy as a container list item for your own pod spec.
  native sidecar (sidecar.native: true, the default; Kubernetes 1.29+):
    initContainers:
      {{- include "streamproxy.sidecar" . | nindent 8 }}
  classic (sidecar.native: false):
    containers:
      {{- include "streamproxy.sidecar" . | nindent 8 }}
Also add {{ include "streamproxy.sidecar.volumes" . }} to the pod's volumes. From a chart
that depends on streamproxy, `.` is your chart's context; for an aliased dependency pass
its context: {{ include "streamproxy.sidecar" .Subcharts.myalias }}.
*/}}
{{- define "streamproxy.sidecar" -}}
{{- $ctx := . }}
{{- if and (ne .Chart.Name "streamproxy") (hasKey (.Subcharts | default dict) "streamproxy") }}
{{- $ctx = index .Subcharts "streamproxy" }}
{{- end }}
{{- $args := dict "ctx" $ctx "name" $ctx.Values.sidecar.containerName "portNames" $ctx.Values.sidecar.portNames "native" $ctx.Values.sidecar.native "sidecar" true -}}
- {{ include "streamproxy.container" $args | trim | indent 2 | trimPrefix "  " }}
{{- end }}

{{/*
PUBLIC: the sidecar's volumes (config ConfigMap and /tmp) as list items for your pod's
`volumes:`.
*/}}
{{- define "streamproxy.sidecar.volumes" -}}
{{- $ctx := . }}
{{- if and (ne .Chart.Name "streamproxy") (hasKey (.Subcharts | default dict) "streamproxy") }}
{{- $ctx = index .Subcharts "streamproxy" }}
{{- end }}
{{- include "streamproxy.volumes" $ctx }}
{{- end }}

{{/*
PUBLIC: the base URL your app uses to reach the sidecar (OPENAI_BASE_URL).
*/}}
{{- define "streamproxy.sidecar.baseURL" -}}
{{- $ctx := . }}
{{- if and (ne .Chart.Name "streamproxy") (hasKey (.Subcharts | default dict) "streamproxy") }}
{{- $ctx = index .Subcharts "streamproxy" }}
{{- end }}
{{- printf "http://localhost:%d/v1" (int (include "streamproxy.proxyPort" $ctx)) }}
{{- end }}

{{/*
Checks the schema cannot express; each fails the install with what to change.
Included once, from configmap.yaml (rendered in both modes).
*/}}
{{- define "streamproxy.validate" -}}
{{- $v := .Values }}
{{- $wildcard := list "0.0.0.0" "::" }}
{{- if and $v.serviceMonitor.enabled (eq $v.mode "sidecar") }}
{{- fail "serviceMonitor.enabled needs mode: deployment (a sidecar has no Service); in sidecar mode use podMonitor.enabled with podMonitor.selector" }}
{{- end }}
{{- if and $v.podMonitor.enabled (eq $v.mode "deployment") }}
{{- fail "podMonitor is for mode: sidecar; in deployment mode use serviceMonitor.enabled" }}
{{- end }}
{{- if and $v.autoscaling.enabled (eq $v.mode "sidecar") }}
{{- fail "autoscaling.enabled needs mode: deployment; a sidecar scales with the workload it is part of" }}
{{- end }}
{{- if and (eq $v.mode "sidecar") $v.sidecar.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.native needs Kubernetes 1.29 or later (this cluster: %s): older versions run it as a plain init container that never ends, so the pod never starts; set sidecar.native=false and put the sidecar under containers" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- if eq (include "streamproxy.proxyPort" .) (include "streamproxy.adminPort" .) }}
{{- fail (printf "config.admin.port (%s) must differ from config.listen.port" (include "streamproxy.adminPort" .)) }}
{{- end }}
{{- $adminHost := dig "admin" "host" "0.0.0.0" ($v.config | default dict) | toString }}
{{- if not (has $adminHost $wildcard) }}
{{- fail (printf "config.admin.host (%s) must be 0.0.0.0 or :: so the kubelet's probes and Prometheus reach the admin port" $adminHost) }}
{{- end }}
{{- $listenHost := dig "listen" "host" "0.0.0.0" ($v.config | default dict) | toString }}
{{- if and (eq $v.mode "deployment") (not (has $listenHost $wildcard)) }}
{{- fail (printf "config.listen.host (%s) must be 0.0.0.0 or :: in deployment mode, or the Service cannot reach the proxy" $listenHost) }}
{{- end }}
{{- range $v.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(key|token|secret|password|passwd|credential)" .name) }}
{{- fail (printf "extraEnv %s looks like a credential: put it in a Secret and use existingSecret/existingSecretEnv (or valueFrom.secretKeyRef), never a value in clear" .name) }}
{{- end }}
{{- end }}
{{- end }}
