{{/* Names and labels shared by every object. */}}

{{- define "lorafleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lorafleet.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lorafleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "lorafleet.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-keys" (include "lorafleet.fullname" .)) -}}
{{- end -}}

{{/* An engine group's object name and its headless Service (the gateways resolve it to one engine per pod). */}}
{{- define "lorafleet.engineName" -}}
{{- printf "%s-engine-%s" (include "lorafleet.fullname" .root) .engine.name -}}
{{- end -}}

{{- define "lorafleet.modelsClaim" -}}
{{- .Values.storage.models.existingClaim | default (printf "%s-models" (include "lorafleet.fullname" .)) -}}
{{- end -}}

{{- define "lorafleet.adaptersClaim" -}}
{{- .Values.storage.adapters.existingClaim | default (printf "%s-adapters" (include "lorafleet.fullname" .)) -}}
{{- end -}}

{{/* Where both volumes are mounted, in every pod: engines load adapters at the paths the gateways name. */}}
{{- define "lorafleet.volumeMounts" -}}
{{ include "lorafleet.scratchMounts" . }}
- name: models
  mountPath: /app/var/models
  readOnly: {{ .readOnlyModels }}
- name: adapters
  mountPath: /app/var/adapters
  readOnly: {{ .readOnlyAdapters }}
{{- end -}}

{{- define "lorafleet.volumes" -}}
{{ include "lorafleet.scratchVolumes" . }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "lorafleet.modelsClaim" . }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ include "lorafleet.adaptersClaim" . }}
{{- end -}}

{{/* An init container that waits until the model-pull job (or an operator) has put a base model in place. */}}
{{- define "lorafleet.waitForModel" -}}
- name: wait-for-model
  image: {{ include "lorafleet.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - >-
      until [ -f /app/var/models/{{ .model }}/config.json ]; do
      echo "waiting for the base model {{ .model }} in the models volume (the model-pull job writes it)"; sleep 5;
      done
  volumeMounts:
    - name: models
      mountPath: /app/var/models
      readOnly: true
  securityContext:
    {{- include "lorafleet.containerSecurity" . | nindent 4 }}
{{- end -}}

{{- define "lorafleet.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lorafleet.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true  # what a container writes goes to its own emptyDirs (lorafleet.scratch)
capabilities:
  drop: [ALL]
{{- end -}}

{{/* A container's writable places, the root filesystem being read-only: data_dir (/app/var, the volumes mounted
     inside it) and /tmp, which HOME points into (caches: vLLM's, torch's, Hugging Face's). */}}
{{- define "lorafleet.scratchMounts" -}}
- name: var
  mountPath: /app/var
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "lorafleet.scratchVolumes" -}}
- name: var
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "lorafleet.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: USER  # an image with no passwd entry for uid 1000 (torch asks getpass.getuser())
  value: lorafleet
- name: LOGNAME
  value: lorafleet
{{- end -}}

{{/* Fail early, with the fix, on values the service cannot run with. */}}
{{- define "lorafleet.check" -}}
{{- if and (not .Values.database.url) (not .Values.secrets.existingSecret) -}}
{{- fail "database.url is empty: the gateways keep tenants, keys, canaries and audit events in PostgreSQL; set database.url (postgresql+psycopg://USER:PASSWORD@HOST:5432/DB) or put database-url in secrets.existingSecret" -}}
{{- end -}}
{{- if and .Values.database.url (not (hasPrefix "postgresql" .Values.database.url)) -}}
{{- fail (printf "database.url %q is not a PostgreSQL URL: several gateway replicas cannot share SQLite; use postgresql+psycopg://USER:PASSWORD@HOST:5432/DB" (regexReplaceAll "://[^@]*@" .Values.database.url "://***@")) -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.engines -}}
{{- if hasKey $names .name -}}
{{- fail (printf "engines: the name %q is used twice; each engine group needs its own" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- $served := false -}}
{{- range .Values.engines -}}
{{- if eq .baseModel $.Values.baseModel -}}{{- $served = true -}}{{- end -}}
{{- end -}}
{{- if hasKey .Values "jsonCompact" -}}
{{- fail "jsonCompact was replaced by jsonWhitespace: set jsonWhitespace compact (with jsonBackend guidance or xgrammar), spaced (the default) or any, and remove jsonCompact" -}}
{{- end -}}
{{- if and (eq .Values.jsonWhitespace "spaced") (ne .Values.jsonBackend "guidance") -}}
{{- fail (printf "jsonWhitespace spaced needs jsonBackend guidance (only llguidance takes separators from the schema), not %s: set jsonBackend guidance, or jsonWhitespace compact (guidance or xgrammar) or any" .Values.jsonBackend) -}}
{{- end -}}
{{- if and (eq .Values.jsonWhitespace "compact") (eq .Values.jsonBackend "auto") -}}
{{- fail "jsonWhitespace compact needs jsonBackend guidance or xgrammar (vLLM applies disable_any_whitespace only with a named backend): set one, or jsonWhitespace any" -}}
{{- end -}}
{{- if not $served -}}
{{- fail (printf "no engine serves the gateways' base model %q (baseModel): add an engines entry with baseModel: %s" .Values.baseModel .Values.baseModel) -}}
{{- end -}}
{{- end -}}
