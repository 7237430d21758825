// The API's answers, as docs/ui.md and the OpenAPI document describe them.

export type Role = "viewer" | "author" | "approver" | "admin" | "service";

export interface Me {
  name: string;
  role: Role;
  mlflow_users: string[];
  expires_at: string | null;
}

export interface Allowed {
  allowed: boolean;
  reason: string | null;
}

export interface Gate {
  gate: string;
  passed: boolean;
  reason: string;
}

export interface Approval {
  id: string;
  transition_id: string;
  approver: string;
  role: Role;
  decision: string;
  comment: string | null;
  digest: string | null;
  created_at: string;
}

export interface Transition {
  id: string;
  model: string;
  version: number;
  from_stage: string;
  to_stage: string;
  reason: string;
  status: string;
  status_reason: string | null;
  requested_by: string;
  created_at: string;
  decided_at: string | null;
  applied_at: string | null;
  gates: Gate[];
  approvals: Approval[];
  allowed_actions?: { approve: Allowed; reject: Allowed };
}

export interface Page<T> {
  data: T[];
  offset: number;
  limit: number;
}

export interface RoleHolder {
  version: number;
  since: string;
}

export interface FleetModel {
  name: string;
  versions: number;
  champion: RoleHolder | null;
  challenger: RoleHolder | null;
  shadow: RoleHolder | null;
  traffic: { challenger_weight: number; shadow_fraction: number };
  pending_approvals: number;
  drift: { status: "ok" | "drift" | "unchecked"; open_alarms: number; last_checked: string | null };
}

export interface Fleet {
  models: FleetModel[];
  pending_approvals: number;
  lead_time_s: { median: number | null; p90: number | null; samples: number };
  rejected: { share: number | null; versions: number; reasons: { reason: string; count: number }[] };
}

export interface ModelSummary {
  name: string;
  created_at: string;
  champion: number | null;
  versions: { version: number; stage: string; stage_changed_at: string }[];
}

export interface Deployment {
  role: "champion" | "challenger" | "shadow";
  started_at: string;
  ended_at: string | null;
  digest: string | null;
  transition_id: string | null;
}

export interface Evaluation {
  id: number;
  model: string;
  version: number;
  kind: string;
  passed: boolean;
  reason: string;
  sample_size: number;
  summary: Record<string, unknown>;
  window_start: string;
  created_at: string;
}

export interface Look {
  at: string;
  action: string;
  n_treatment: number;
  n_control: number;
  estimate: number | null;
  lower: number | null;
  upper: number | null;
  p_value: number | null;
}

export interface Experiment {
  model: string;
  version: number;
  started_at: string | null;
  champion_version: number | null;
  looks: Look[];
  decision: { action: string; passed: boolean; reason: string; decided_at: string } | null;
}

export interface ColumnScore {
  column: string;
  test: string | null;
  threshold: number | null;
  score: number | null;
  drifted: boolean;
}

export interface DriftCheck {
  id: number;
  verdict: string;
  reason: string;
  window_start: string;
  window_end: string | null;
  sample_size: number;
  drifted_features: string[];
  columns: ColumnScore[];
  report_url: string | null;
  created_at: string;
}

export interface DriftHistory {
  checks: DriftCheck[];
  alarms: { id: string; status: string; opened_at: string; drifted_features: string[] }[];
}

export interface Dataset {
  name: string;
  source: string;
  digest: string;
  context: string | null;
}

export interface VersionRef {
  model: string;
  version: number;
  stage?: string | null;
}

export interface Version {
  model: string;
  version: number;
  stage: string;
  run_id: string | null;
  source: string;
  creator: string | null;
  digest: string | null;
  registered_at: string;
  datasets: Dataset[];
  depends_on: VersionRef[];
}

export interface Lineage {
  version: Version;
  transitions: Transition[];
  deployments: { version: number; role: string; backend: string; transition_id: string; started_at: string; ended_at: string | null }[];
  consumers: VersionRef[];
  drift: { evaluation_id: number; verdict: string; window_start: string; window_end: string | null; drifted_features: string[]; report_url: string | null }[];
}

export interface Production {
  model: string;
  at: string;
  version: number | null;
  since: string | null;
  until: string | null;
  digest: string | null;
  transition: Transition | null;
  approved_by: Approval[];
}

export interface AuditEntry {
  seq: number;
  at: string;
  actor: string;
  action: string;
  entity_type: string;
  entity_id: string;
  data: Record<string, unknown>;
  hash: string;
}

export interface AuditVerify {
  ok: boolean;
  rows: number;
  first_bad_seq: number | null;
  reason: string | null;
  head_hash: string;
}
