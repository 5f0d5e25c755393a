{{/* Names --------------------------------------------------------------------------------- */}}

{{- define "kvpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; component names append to it, so keep room for "-redis" etc. */}}
{{- define "kvpool.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvpool.store.name" -}}{{ include "kvpool.fullname" . }}-store{{- end -}}
{{- define "kvpool.redis.name" -}}{{ include "kvpool.fullname" . }}-redis{{- end -}}
{{- define "kvpool.gateway.name" -}}{{ include "kvpool.fullname" . }}-gateway{{- end -}}
{{/* The RayCluster; KubeRay names its head Service "<this>-head-svc". */}}
{{- define "kvpool.raycluster.name" -}}{{ include "kvpool.fullname" . }}-ray{{- end -}}
{{- define "kvpool.auth.secretName" -}}
{{- default (printf "%s-auth" (include "kvpool.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "kvpool.storeToken.secretName" -}}
{{- default (printf "%s-store-token" (include "kvpool.fullname" .)) .Values.store.auth.existingSecret -}}
{{- end -}}

{{/* Labels ---------------------------------------------------------------------------------- */}}

{{- define "kvpool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvpool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvpool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Usage: include "kvpool.componentLabels" (list . "store") */}}
{{- define "kvpool.componentLabels" -}}
{{ include "kvpool.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kvpool.componentSelector" -}}
{{ include "kvpool.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Image ----------------------------------------------------------------------------------- */}}

{{/* The CPU image is tagged "<version>-cpu" (see the Dockerfile); image.tag overrides both. */}}
{{- define "kvpool.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "" "-cpu" (eq .Values.accelerator "gpu"))) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "kvpool.gpu" -}}{{ eq .Values.accelerator "gpu" }}{{- end -}}

{{/* Worker actors the gateway starts: one per GPU, or one per CPU worker pod. */}}
{{- define "kvpool.workerActors" -}}
{{- if eq .Values.accelerator "gpu" -}}
{{- mul .Values.ray.workers.replicas .Values.ray.workers.gpusPerWorker -}}
{{- else -}}
{{- .Values.ray.workers.replicas -}}
{{- end -}}
{{- end -}}

{{/* Redis ----------------------------------------------------------------------------------- */}}

{{- define "kvpool.redis.secretName" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.existingSecret -}}
{{- else if eq .Values.redis.mode "cluster" -}}
{{- .Values.redis.cluster.existingSecret -}}
{{- else -}}
{{- default (include "kvpool.redis.name" .) .Values.redis.bundled.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "kvpool.redis.secretKey" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.existingSecretPasswordKey -}}
{{- else if eq .Values.redis.mode "cluster" -}}
{{- .Values.redis.cluster.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.redis.bundled.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* The store's --backend: a URL without the password, which comes from KVPOOL_REDIS_PASSWORD. */}}
{{- define "kvpool.redis.url" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- required "redis.external.url is required when redis.mode is external" .Values.redis.external.url -}}
{{- else if eq .Values.redis.mode "cluster" -}}
{{- $c := .Values.redis.cluster -}}
{{- if not $c.addresses -}}{{- fail "redis.cluster.addresses is required when redis.mode is cluster" -}}{{- end -}}
{{- printf "%s://%s%s" (ternary "rediss+cluster" "redis+cluster" $c.tls) (ternary "" (printf "%s@" $c.username) (empty $c.username)) (join "," $c.addresses) -}}
{{- with $c.params }}?{{ . }}{{- end -}}
{{- else -}}
{{- printf "redis://%s:%d/0" (include "kvpool.redis.name" .) (int .Values.redis.bundled.port) -}}
{{- end -}}
{{- end -}}

{{/*
Redis as a cache: bounded memory, evict any key least-recently-used, nothing on disk. The
password is not here: it comes from the Secret on the command line (--requirepass).
*/}}
{{- define "kvpool.redis.conf" -}}
port {{ .Values.redis.bundled.port }}
bind * -::*
maxmemory {{ .Values.redis.bundled.maxmemory }}
maxmemory-policy allkeys-lru
save ""
appendonly no
dir /data
lazyfree-lazy-eviction yes
lazyfree-lazy-expire yes
{{- end -}}

{{- define "kvpool.redis.hasPassword" -}}
{{- if eq .Values.redis.mode "external" -}}{{ ne .Values.redis.external.existingSecret "" }}{{- else if eq .Values.redis.mode "cluster" -}}{{ ne .Values.redis.cluster.existingSecret "" }}{{- else -}}true{{- end -}}
{{- end -}}

{{/* The gateway's client token (default tenant): the gateway and its clients (the test pod),
     never the store or the workers. -------------------------------------------------------- */}}
{{- define "kvpool.gatewayTokenEnv" -}}
{{- if .Values.auth.enabled }}
- name: KVPOOL_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "kvpool.auth.secretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- end }}
{{- end -}}

{{/* The store's internal service token: the store accepts it, the gateway presents it (and hands
     it to its workers). Always on, its own Secret, never a token the gateway accepts. ------- */}}
{{- define "kvpool.storeTokenEnv" -}}
- name: KVPOOL_STORE_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "kvpool.storeToken.secretName" . }}
      key: {{ .Values.store.auth.secretKey }}
{{- end -}}

{{/* The namespace secret that keys tenant salts: the gateway only (it hands it to its workers).
     Optional, so an existingSecret without the key keeps plain-name salts. ----------------- */}}
{{- define "kvpool.namespaceSecretKey" -}}
{{- if .Values.store.auth.existingSecret -}}
{{- $key := .Values.store.auth.namespaceSecretKey -}}
{{- if not $key -}}
{{- fail (printf "store.auth.existingSecret %q is set but store.auth.namespaceSecretKey is not: name the key of that Secret that holds the namespace secret (make one with: openssl rand -hex 32); without it tenant salts would not be secret" .Values.store.auth.existingSecret) -}}
{{- end -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace .Values.store.auth.existingSecret -}}
{{- if and $existing (not (hasKey ($existing.data | default dict) $key)) -}}
{{- fail (printf "Secret %q has no key %q (store.auth.namespaceSecretKey): add the namespace secret to it (openssl rand -hex 32)" .Values.store.auth.existingSecret $key) -}}
{{- end -}}
{{- $key -}}
{{- else -}}
namespace-secret
{{- end -}}
{{- end -}}

{{- /* Not optional: a pod without the namespace secret does not start, rather than salt block
     keys with tenants' names. */}}
{{- define "kvpool.namespaceSecretEnv" -}}
- name: KVPOOL_NAMESPACE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "kvpool.storeToken.secretName" . }}
      key: {{ include "kvpool.namespaceSecretKey" . }}
{{- end -}}

{{/* Environment shared by every kvpool process: TLS files, extra env. ---------------------- */}}

{{- define "kvpool.commonEnv" -}}
{{- if .Values.tls.enabled }}
- name: KVPOOL_TLS_CERT_FILE
  value: /etc/kvpool/tls/tls.crt
- name: KVPOOL_TLS_KEY_FILE
  value: /etc/kvpool/tls/tls.key
- name: KVPOOL_TLS_CA_FILE
  value: /etc/kvpool/tls/ca.crt
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvpool.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.existingSecret is required when tls.enabled" .Values.tls.existingSecret }}
{{- end }}
{{- end -}}

{{- define "kvpool.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/kvpool/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Health probe body for a gRPC server of ours on a port. Kubernetes' own grpc probe speaks
plaintext only, so with TLS the probe runs grpc_health.v1 over TLS from inside the container.
The certificate is checked against the Service name, as clients in the cluster see it.
Usage: include "kvpool.healthProbe" (list . 50051 "release-kvpool-gateway")
*/}}
{{- define "kvpool.healthProbe" -}}
{{- $root := index . 0 -}}
{{- $port := index . 1 -}}
{{- $serverName := index . 2 -}}
{{- if $root.Values.tls.enabled }}
exec:
  command:
    - python3
    - -c
    - >-
      import sys, grpc;
      from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;
      creds = grpc.ssl_channel_credentials(open('/etc/kvpool/tls/ca.crt', 'rb').read());
      ch = grpc.secure_channel('localhost:{{ $port }}', creds,
      options=[('grpc.ssl_target_name_override', '{{ $serverName }}')]);
      r = g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=4);
      sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)
{{- else }}
grpc:
  port: {{ $port }}
{{- end }}
{{- end -}}
