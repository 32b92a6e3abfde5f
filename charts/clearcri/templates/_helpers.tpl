{{/* Names and labels shared by every object of the chart. */}}

{{- define "clearcri.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clearcri.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "clearcri.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "clearcri.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "clearcri.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clearcri.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "clearcri.labels" -}}
{{ include "clearcri.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: clearcri
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "clearcri.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The node label the RuntimeClass selects on (set by deploy/node_label.py). */}}
{{- define "clearcri.nodeLabel" -}}clearcri.io/runtime{{- end -}}

{{/* The CRI socket on the node (daemon.socket of the rendered config). */}}
{{- define "clearcri.socket" -}}/run/clearcri/clearcri.sock{{- end -}}

{{/* /etc/clearcri/config.toml, from the values (keys: docs/config.md). */}}
{{- define "clearcri.configToml" -}}
# Rendered by the clearcri Helm chart; keys and defaults: docs/config.md.
[daemon]
socket = {{ include "clearcri.socket" . | toJson }}
state_dir = "/var/lib/clearcri"
run_dir = "/run/clearcri"
log_dir = "/var/log/clearcri"
log_level = {{ .Values.config.logLevel | toJson }}
sandbox_image = {{ .Values.config.sandboxImage | toJson }}
cgroup_driver = {{ .Values.config.cgroupDriver | toJson }}

[vm]
guest_dir = "/opt/clearcri/guest"
accel = {{ .Values.config.vm.accel | toJson }}
default_vcpus = {{ .Values.config.vm.defaultVcpus | int }}
default_memory_mib = {{ .Values.config.vm.defaultMemoryMiB | int }}
guest_overhead_mib = {{ .Values.config.vm.guestOverheadMiB | int }}
max_vcpus = {{ .Values.config.vm.maxVcpus | int }}
max_clone_memory_mib = {{ .Values.config.vm.maxCloneMemoryMiB | int }}
image_slots = {{ .Values.config.vm.imageSlots | int }}
standby = {{ .Values.config.vm.standby | int }}
standby_burst = {{ .Values.config.vm.standbyBurst | int }}
tcg_tb_size_mib = {{ .Values.config.vm.tcgTbSizeMiB | int }}
jit_flush_idle_s = {{ .Values.config.vm.jitFlushIdleSeconds | float64 }}
mem_merge = {{ .Values.ksm.mergeGuestMemory }}
host_ksm = {{ .Values.ksm.enableOnHost }}
ksm_pages_to_scan = {{ .Values.ksm.pagesToScan | int }}

[streaming]
address = {{ .Values.config.streaming.address | toJson }}
port = {{ .Values.config.streaming.port | int }}

[metrics]
enabled = {{ .Values.metrics.enabled }}
{{- if eq .Values.metrics.address "hostIP" }}
# the node's own IP, written in by the installer on each node
address = "@HOST_IP@"
{{- else }}
address = {{ .Values.metrics.address | toJson }}
{{- end }}
port = {{ .Values.metrics.port | int }}
{{- if or .Values.registry.mirrors .Values.registry.insecure }}

[registry]
insecure = {{ .Values.registry.insecure | default list | toJson }}
{{- range $registry, $endpoints := .Values.registry.mirrors }}

[registry.mirrors.{{ $registry | toJson }}]
endpoints = {{ $endpoints | toJson }}
{{- end }}
{{- end }}
{{- with .Values.config.extra }}

{{ . }}
{{- end }}
{{- end -}}

{{/* The labeler's way to the API server where the kubernetes Service does not answer:
env entries of the pods that talk to it, for use under `if .Values.apiServer.host`. */}}
{{- define "clearcri.apiServerEnv" -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.apiServer.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.apiServer.port | default 443 | toString | quote }}
{{- end -}}
