{{/* Chart name, overridable. */}}
{{- define "medserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name: release-chart, or the release alone when it contains the chart name. */}}
{{- define "medserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "medserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "medserve.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The RayService's name (short: KubeRay appends suffixes for its clusters and services). */}}
{{- define "medserve.rayServiceName" -}}
{{- include "medserve.fullname" . | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "medserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "medserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "medserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medserve
{{- end -}}

{{/* The medserve image; global.imageRegistry (an air-gapped mirror) wins over image.registry. */}}
{{- define "medserve.image" -}}
{{- $registry := .Values.global.imageRegistry | default .Values.image.registry -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "medserve.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "medserve.fullname" .)) -}}
{{- end -}}

{{/* Serve config for serveConfigV2: an explicit override, else the catalog render shipped with the chart. */}}
{{- define "medserve.serveConfig" -}}
{{- if .Values.serveConfig.override -}}
{{- .Values.serveConfig.override -}}
{{- else -}}
{{- .Files.Get "files/serve-config.yaml" -}}
{{- end -}}
{{- end -}}

{{- define "medserve.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* Environment every medserve process needs: database, pseudonym key, no usage reporting. */}}
{{- define "medserve.env" -}}
- name: MEDSERVE_HOME
  value: /tmp/medserve
- name: MEDSERVE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "medserve.secretName" . }}
      key: database-url
- name: MEDSERVE_PSEUDONYM_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "medserve.secretName" . }}
      key: pseudonym-key
- name: MEDSERVE_GATEWAY_HOST
  value: "0.0.0.0"
- name: MEDSERVE_GATEWAY_PORT
  value: {{ .Values.gateway.port | quote }}
- name: MEDSERVE_GATEWAY_LISTEN_PORT
  value: {{ .Values.gateway.listenPort | quote }}
# No external calls: Ray would otherwise report usage statistics.
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
# Replicas at the same priority as Ray's daemons by default (Ray's own niceness for workers is 15): the
# model engines are the work (measured with benchmarks/llm_throughput.py). Values: rayCluster.workerNiceness.
- name: RAY_worker_niceness
  value: {{ .Values.rayCluster.workerNiceness | quote }}
{{- if .Values.gateway.throughputOptimized }}
# Direct ingress and gRPC between deployments (measured with `medserve bench`).
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
{{- end }}
{{- end -}}

{{/* One Ray pod template (head or worker group). Args: dict root, group, component, containerName, ports, gpus. */}}
{{- define "medserve.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- $auditSpoolDir := "/var/lib/medserve/audit-spool" -}}
metadata:
  labels:
    {{- include "medserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $group.acceleratorType }}
    # Ray detects the accelerator on the node; this label tells the reconciler's
    # planner beforehand (specs asking for accelerator_type need it).
    medserve.io/accelerator-type: {{ . | quote }}
    {{- end }}
spec:
  {{- with include "medserve.imagePullSecrets" $root }}{{ . | nindent 2 }}{{ end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  automountServiceAccountToken: false
  containers:
    - name: {{ .containerName }}
      image: {{ include "medserve.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "medserve.env" $root | nindent 8 }}
        # The audit chain's HMAC key, the same in every Ray pod: gateway replicas sign with it wherever
        # they run, and the compliance monitor's `audit verify` checks every chain with it. Without it
        # each pod generated a key of its own into its ephemeral MEDSERVE_HOME, so chains written in one
        # pod failed verification in another and became unverifiable once the pod was gone. Only Ray
        # pods hold it: the reconciler and the migration Job write no audit records.
        - name: MEDSERVE_AUDIT_SIGNING_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "medserve.secretName" $root }}
              key: audit-signing-key
        {{- if $root.Values.auditSpool.existingClaim }}
        - name: MEDSERVE_AUDIT_SPOOL_DIR
          value: {{ $auditSpoolDir }}
        {{- end }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      resources:
        {{- $resources := deepCopy $group.resources }}
        {{- if .gpus }}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" .gpus) ($resources.limits | default dict)) }}
        {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" .gpus) ($resources.requests | default dict)) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
        # The image writes only to /tmp and /dev/shm (tests/image checks it, as uid 1000).
        readOnlyRootFilesystem: true
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- if $root.Values.auditSpool.existingClaim }}
        - name: audit-spool
          mountPath: {{ $auditSpoolDir }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    {{- with $root.Values.auditSpool.existingClaim }}
    # Spooled audit records outlive the pod that wrote them (values: auditSpool).
    - name: audit-spool
      persistentVolumeClaim:
        claimName: {{ . }}
    {{- end }}
    # Ray's object store lives in shared memory.
    - name: shm
      emptyDir:
        medium: Memory
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* rayStartParams of a group: its own params (as strings) plus custom Ray resources as KubeRay's quoted JSON. */}}
{{- define "medserve.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := .rayStartParams -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- if .rayResources -}}
{{- $_ := set $params "resources" (printf "\"%s\"" (toJson .rayResources | replace "\"" "\\\"")) -}}
{{- end -}}
{{- if $params -}}
{{- toYaml $params -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}
