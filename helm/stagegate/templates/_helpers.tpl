{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "stagegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Leaves room for the longest component suffix ("-router-inference-log") within 63. */}}
{{- define "stagegate.fullname" -}}
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

{{- define "stagegate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stagegate.labels" -}}
helm.sh/chart: {{ include "stagegate.chart" . }}
app.kubernetes.io/name: {{ include "stagegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stagegate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include "stagegate.selectorLabels" (dict "ctx" . "component" "api") */}}
{{- define "stagegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stagegate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "stagegate.componentLabels" -}}
{{ include "stagegate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Secrets ---------------------------------------------------------------------------- */}}

{{- define "stagegate.authSecretName" -}}
{{- default (printf "%s-auth" (include "stagegate.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "stagegate.dbSecretName" -}}
{{- default (printf "%s-db" (include "stagegate.fullname" .)) .Values.externalDatabase.existingSecret -}}
{{- end -}}

{{- define "stagegate.dbSecretKey" -}}
{{- if .Values.externalDatabase.existingSecret -}}{{ .Values.externalDatabase.existingSecretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* Images ----------------------------------------------------------------------------- */}}

{{- define "stagegate.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s/%s@%s" $img.registry $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s/%s:%s" $img.registry $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "stagegate.modelServerImage" -}}
{{- $ms := .Values.modelServer.image -}}
{{- if or $ms.repository $ms.tag -}}
{{- printf "%s/%s:%s" .Values.image.registry (default .Values.image.repository $ms.repository) (default (default .Chart.AppVersion .Values.image.tag) $ms.tag) -}}
{{- else -}}
{{- include "stagegate.image" . -}}
{{- end -}}
{{- end -}}

{{/* URLs ------------------------------------------------------------------------------- */}}

{{- define "stagegate.apiUrl" -}}
{{- printf "http://%s-api.%s.svc:%d" (include "stagegate.fullname" .) .Release.Namespace (int .Values.api.port) -}}
{{- end -}}

{{- define "stagegate.routerUrl" -}}
{{- printf "http://%s-router.%s.svc:%d" (include "stagegate.fullname" .) .Release.Namespace (int .Values.router.port) -}}
{{- end -}}

{{- define "stagegate.mlflowUrl" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow.%s.svc:5000" (include "stagegate.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.config.mlflowTrackingUri -}}
{{- end -}}
{{- end -}}

{{- define "stagegate.prefectApiUrl" -}}
{{- if .Values.prefect.enabled -}}
{{- printf "http://%s-prefect.%s.svc:4200/api" (include "stagegate.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.config.prefectApiUrl -}}
{{- end -}}
{{- end -}}

{{- define "stagegate.apiPublicUrl" -}}
{{- default (include "stagegate.apiUrl" .) .Values.config.apiPublicUrl -}}
{{- end -}}

{{- define "stagegate.servingNamespace" -}}
{{- default .Release.Namespace .Values.serving.namespace -}}
{{- end -}}

{{/* Pod pieces ------------------------------------------------------------------------- */}}

{{- define "stagegate.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "stagegate.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* Writable places under a read-only root: HOME (Prefect and MLflow keep caches there) and /tmp. */}}
{{- define "stagegate.scratchMounts" -}}
- name: home
  mountPath: /var/lib/stagegate
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Where the inference log lives: the object-store URL, else the shared volume's path. */}}
{{- define "stagegate.logUrl" -}}
{{- default "/var/lib/stagegate/inference-log" .Values.inferenceLog.url -}}
{{- end -}}

{{/* The log's volume mount and volume: only when it is not on an object store. */}}
{{- define "stagegate.logMounts" -}}
{{- if not .Values.inferenceLog.url }}
- name: inference-log
  mountPath: /var/lib/stagegate/inference-log
{{- end }}
{{- end -}}

{{- define "stagegate.logVolumes" -}}
{{- if not .Values.inferenceLog.url }}
- name: inference-log
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-inference-log" (include "stagegate.fullname" .)) .Values.inferenceLog.existingClaim }}
{{- end }}
{{- end -}}

{{/* The object store's credentials (AWS_* variables), for the pods that read or write the log. */}}
{{- define "stagegate.logEnvFrom" -}}
{{- with .Values.inferenceLog.credentialsSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{- define "stagegate.scratchVolumes" -}}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* An init container that waits for the API's /api/health (files/wait_for.py). */}}
{{- define "stagegate.waitForApi" -}}
- name: wait-for-api
  image: {{ include "stagegate.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python, -c]
  args:
    - {{ .Files.Get "files/wait_for.py" | quote }}
    - {{ printf "%s/api/health" (include "stagegate.apiUrl" .) | quote }}
  securityContext:
    {{- include "stagegate.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {memory: 64Mi}
{{- end -}}

{{/* The database URL: a Secret's key, or (trial) built from the generated password. */}}
{{- define "stagegate.dbEnv" -}}
{{- if .Values.postgresql.enabled }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "stagegate.authSecretName" . }}
      key: postgres-password
- name: STAGEGATE_DB__URL
  value: {{ printf "postgresql+psycopg://stagegate:$(POSTGRES_PASSWORD)@%s-postgresql.%s.svc:5432/stagegate" (include "stagegate.fullname" .) .Release.Namespace | quote }}
{{- else }}
- name: STAGEGATE_DB__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "stagegate.dbSecretName" . }}
      key: {{ include "stagegate.dbSecretKey" . }}
{{- end }}
{{- end -}}

{{- define "stagegate.authEnv" -}}
- name: STAGEGATE_WEBHOOK__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "stagegate.authSecretName" . }}
      key: webhook-secret
- name: STAGEGATE_ALERTS__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "stagegate.authSecretName" . }}
      key: alert-secret
{{- end -}}

{{- define "stagegate.routerTokenEnv" -}}
- name: STAGEGATE_ROUTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "stagegate.authSecretName" . }}
      key: router-token
{{- end -}}

{{/* The worker's serving backend: the settings serving/backends/kubernetes reads
(STAGEGATE_SERVING__BACKEND and STAGEGATE_KUBERNETES__*; docs/kubernetes.md), plus the
serving spec for models whose policy names none (SERVING_DEFAULTS, one JSON object). */}}
{{- define "stagegate.servingEnv" -}}
- name: STAGEGATE_SERVING__BACKEND
  value: kubernetes
- name: STAGEGATE_SERVING__ROUTER_URL
  value: {{ include "stagegate.routerUrl" . | quote }}
- name: STAGEGATE_KUBERNETES__NAMESPACE
  value: {{ include "stagegate.servingNamespace" . | quote }}
- name: STAGEGATE_KUBERNETES__IMAGE
  value: {{ include "stagegate.modelServerImage" . | quote }}
- name: STAGEGATE_KUBERNETES__TRACKING_SECRET
  value: {{ include "stagegate.trackingSecretName" . | quote }}
- name: STAGEGATE_KUBERNETES__TRACKING_SECRET_KEY
  value: tracking-uri
- name: STAGEGATE_KUBERNETES__SERVICE_ACCOUNT
  value: {{ include "stagegate.modelServerServiceAccount" . | quote }}
- name: STAGEGATE_KUBERNETES__CLUSTER_DOMAIN
  value: {{ .Values.serving.clusterDomain | quote }}
- name: STAGEGATE_KUBERNETES__IMAGE_PULL_SECRETS
  value: {{ include "stagegate.pullSecretNames" . | quote }}
- name: STAGEGATE_KUBERNETES__SERVING_DEFAULTS
  value: {{ toJson .Values.modelServer.defaults | quote }}
{{- end -}}

{{- define "stagegate.trackingSecretName" -}}
{{- default (printf "%s-mlflow" (include "stagegate.fullname" .)) .Values.modelServer.existingTrackingSecret -}}
{{- end -}}

{{- define "stagegate.modelServerServiceAccount" -}}
{{- printf "%s-model-server" (include "stagegate.fullname" .) -}}
{{- end -}}

{{/* imagePullSecrets as the JSON list of names the backend's settings take. */}}
{{- define "stagegate.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets }}{{ $names = append $names .name }}{{ end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Checks across values, all at once (values.schema.json checks each value's shape) ----- */}}

{{- define "stagegate.validateValues" -}}
{{- $errors := list -}}
{{- $v := .Values -}}
{{- $trial := or $v.postgresql.enabled $v.mlflow.enabled $v.prefect.enabled -}}
{{- if and (not $v.postgresql.enabled) (not $v.externalDatabase.url) (not $v.externalDatabase.existingSecret) -}}
{{- $errors = append $errors "external database missing: set externalDatabase.existingSecret (a Secret with the SQLAlchemy URL) or externalDatabase.url, or postgresql.enabled=true for a trial" -}}
{{- end -}}
{{- if and $v.externalDatabase.url $v.externalDatabase.existingSecret -}}
{{- $errors = append $errors "externalDatabase.url and externalDatabase.existingSecret are both set: give one" -}}
{{- end -}}
{{- if and $v.postgresql.enabled (or $v.externalDatabase.url $v.externalDatabase.existingSecret) -}}
{{- $errors = append $errors "postgresql.enabled=true and an external database are both set: give one" -}}
{{- end -}}
{{- if and $v.externalDatabase.url (hasPrefix "sqlite" $v.externalDatabase.url) -}}
{{- $errors = append $errors "externalDatabase.url is SQLite: pods need a server database (PostgreSQL)" -}}
{{- end -}}
{{- if and (not $v.mlflow.enabled) (not $v.config.mlflowTrackingUri) -}}
{{- $errors = append $errors "MLflow missing: set config.mlflowTrackingUri, or mlflow.enabled=true for a trial" -}}
{{- end -}}
{{- if and (not $v.prefect.enabled) (not $v.config.prefectApiUrl) -}}
{{- $errors = append $errors "Prefect missing: set config.prefectApiUrl (ending in /api), or prefect.enabled=true for a trial" -}}
{{- end -}}
{{- if and $v.mlflow.enabled $v.config.mlflowTrackingUri -}}
{{- $errors = append $errors "mlflow.enabled=true and config.mlflowTrackingUri are both set: give one" -}}
{{- end -}}
{{- if and $v.prefect.enabled $v.config.prefectApiUrl -}}
{{- $errors = append $errors "prefect.enabled=true and config.prefectApiUrl are both set: give one" -}}
{{- end -}}
{{- if and $trial (eq $v.config.mode "prod") -}}
{{- $errors = append $errors "the trial instances (postgresql/mlflow/prefect.enabled) speak plain http and keep data in emptyDir: set config.mode=dev, or use external servers" -}}
{{- end -}}
{{- if eq $v.config.mode "prod" -}}
{{- range $name, $url := dict "config.mlflowTrackingUri" $v.config.mlflowTrackingUri "config.prefectApiUrl" $v.config.prefectApiUrl "config.apiPublicUrl" (include "stagegate.apiPublicUrl" $) -}}
{{- if and (hasPrefix "http://" $url) (not (regexMatch "^http://(127\\.0\\.0\\.1|localhost|\\[::1\\])([:/]|$)" $url)) -}}
{{- $errors = append $errors (printf "prod mode refuses plain http to another host: %s is %s (use https, or config.mode=dev)" $name $url) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $routerMin := ternary $v.router.autoscaling.minReplicas $v.router.replicaCount $v.router.autoscaling.enabled -}}
{{- if lt (int $routerMin) 2 -}}
{{- $errors = append $errors (printf "the router needs at least 2 replicas (got %d): one pod must keep serving while another restarts" (int $routerMin)) -}}
{{- end -}}
{{- if and $v.router.autoscaling.enabled (not (dig "requests" "cpu" "" $v.router.resources)) -}}
{{- $errors = append $errors "router.autoscaling needs router.resources.requests.cpu: the HPA scales on use relative to the request" -}}
{{- end -}}
{{- if and $v.router.autoscaling.enabled (lt (int $v.router.autoscaling.maxReplicas) (int $v.router.autoscaling.minReplicas)) -}}
{{- $errors = append $errors "router.autoscaling.maxReplicas is below minReplicas" -}}
{{- end -}}
{{- if ge (int $v.router.pdb.minAvailable) (int $routerMin) -}}
{{- $errors = append $errors (printf "router.pdb.minAvailable (%d) must be below the router's fewest replicas (%d), or no node could ever be drained" (int $v.router.pdb.minAvailable) (int $routerMin)) -}}
{{- end -}}
{{- if and (gt (int $v.api.replicaCount) 1) (ge (int $v.api.pdb.minAvailable) (int $v.api.replicaCount)) -}}
{{- $errors = append $errors "api.pdb.minAvailable must be below api.replicaCount, or no node could ever be drained" -}}
{{- end -}}
{{- if and (eq (include "stagegate.servingNamespace" .) .Release.Namespace) (not $v.serving.allowReleaseNamespace) -}}
{{- $errors = append $errors (printf "serving.namespace is the release namespace (%s): the worker could change the chart's own Deployments; choose another namespace or set serving.allowReleaseNamespace=true" .Release.Namespace) -}}
{{- end -}}
{{- if and $v.serving.createNamespace (eq (include "stagegate.servingNamespace" .) .Release.Namespace) -}}
{{- $errors = append $errors "serving.createNamespace=true would create the release namespace itself: name another serving.namespace, or create none" -}}
{{- end -}}
{{- range $name := list "STAGEGATE_DB__URL" "STAGEGATE_WEBHOOK__SECRET" "STAGEGATE_ALERTS__SECRET" "STAGEGATE_ROUTER_TOKEN" -}}
{{- if hasKey $v.config.extraEnv $name -}}
{{- $errors = append $errors (printf "config.extraEnv sets %s, a credential the ConfigMap would show in plain text: use externalDatabase / auth.existingSecret" $name) -}}
{{- end -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nVALUES VALIDATION:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
