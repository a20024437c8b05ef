"""Every table of the state database, and the one ``metadata`` that holds them.

Alembic's autogenerate compares the migrations (``serving/state/migrations``)
against this ``metadata``, and adopting a database made before migrations
creates from it: both need every table, so every table is here, in one module
that imports nothing of the gateway but the canary's states (its index is
about them). The stores that read and write them
(``tenants``, ``policies``, ``canaries``, ``ledger``) import them from here.
"""

from __future__ import annotations

import sqlalchemy as sa

from serving.canary.state import ACTIVE

metadata = sa.MetaData()

# At most one running or paused canary per alias: the partial unique index on ``canaries`` below.
ONE_ACTIVE = sa.text("state IN (" + ", ".join(f"'{s}'" for s in ACTIVE) + ")")

# Tenants, their API keys (hashed) and the aliases granted to them (``serving.state.tenants``).
tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), unique=True, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("default_alias", sa.String(64), nullable=True),
    sa.Column("requests_per_minute", sa.Integer, nullable=True),
    sa.Column("max_concurrent", sa.Integer, nullable=True),
    sa.Column("tokens_per_minute", sa.Integer, nullable=True),
    sa.Column("max_tokens", sa.Integer, nullable=True),
    sa.Column("running_jobs", sa.Integer, nullable=True),  # fine-tuning jobs running at once
    sa.Column("queued_jobs", sa.Integer, nullable=True),  # fine-tuning jobs waiting (validating, queued, paused)
)
keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("key_hash", sa.String(64), unique=True, nullable=False),
    sa.Column("key_id", sa.String(16), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)
grants_table = sa.Table(
    "grants",
    metadata,
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
)

# The JSON policy the admin set per alias (``serving.state.policies``).
policies_table = sa.Table(
    "alias_policies",
    metadata,
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("json_mode", sa.String(16), nullable=True),
    sa.Column("default_schema", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("rollout", sa.Text, nullable=True),  # the rollout policy: canary bounds and gate thresholds
)

# Canaries, their audit events, and each gateway's share of the samples of the step under way
# (``serving.state.canaries``).
canaries_table = sa.Table(
    "canaries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("alias", sa.String(64), nullable=False, index=True),
    sa.Column("candidate", sa.Integer, nullable=False),
    sa.Column("stable", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False),
    sa.Column("step_started_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_analysis", sa.Text, nullable=True),
    # One running or paused canary per alias, however many gateways start one at the same instant.
    sa.Index("uq_canaries_active_alias", "alias", unique=True, sqlite_where=ONE_ACTIVE, postgresql_where=ONE_ACTIVE),
)
canary_events_table = sa.Table(
    "canary_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("canary_id", sa.ForeignKey("canaries.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("numbers", sa.Text, nullable=True),
    sa.Column("actor", sa.String(64), nullable=False),
)
windows_table = sa.Table(
    "canary_windows",
    metadata,
    sa.Column("canary_id", sa.ForeignKey("canaries.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("window", sa.Float, primary_key=True),  # the step_started_at the samples belong to
    sa.Column("variant", sa.String(8), primary_key=True),
    sa.Column("replica", sa.String(96), primary_key=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# The adapter store's ledger on PostgreSQL (``serving.state.ledger``).
stable_table = sa.Table(
    "adapter_stable",
    metadata,
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("changed_at", sa.Float, nullable=False),
)
retired_table = sa.Table(
    "adapter_retired",
    metadata,
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
)
adapter_events_table = sa.Table(
    "adapter_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("alias", sa.String(64), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=True),
    sa.Column("to_version", sa.Integer, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False),
    sa.Column("gate_passed", sa.Boolean, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
)


# Files a tenant uploaded (OpenAI's files API: fine-tuning data); the bytes live in data_dir/files, named by id
# (``serving.state.files``).
files_table = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),
)


# Fine-tuning jobs (OpenAI's fine-tuning API), their events and checkpoints, and the workers that run them
# (``serving.state.jobs``). JSON values are stored as text, as elsewhere here.
jobs_table = sa.Table(
    "fine_tuning_jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),  # as the caller named it
    sa.Column("base_model", sa.String(512), nullable=False),  # the provisioned base it trains on
    sa.Column("parent", sa.String(64), nullable=True),  # the tenant's fine-tuned model it continues from
    sa.Column("training_file", sa.String(40), nullable=False),
    sa.Column("validation_file", sa.String(40), nullable=True),
    sa.Column("suffix", sa.String(64), nullable=True),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("hyperparameters", sa.Text, nullable=False),  # as asked ("auto" or a value), resolved when it runs
    sa.Column("options", sa.Text, nullable=False),  # the `lorafleet` object
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("finished_at", sa.BigInteger, nullable=True),
    sa.Column("estimated_finish", sa.BigInteger, nullable=True),
    sa.Column("fine_tuned_model", sa.String(64), nullable=True),
    sa.Column("trained_tokens", sa.BigInteger, nullable=True),
    sa.Column("result_files", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("progress", sa.Text, nullable=True),  # step, max_steps, losses, tokens/s: the latest
    sa.Column("desired", sa.String(16), nullable=True),  # "pause": asked of the worker running it
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),  # its worker lost mid-training
    sa.Column("executor", sa.String(16), nullable=True),
    sa.Column("executor_ref", sa.String(128), nullable=True),  # the Ray submission id
    sa.Column("queued_at", sa.Float, nullable=True),
    sa.Column("reported", sa.Boolean, nullable=False, default=False),  # its end counted in the metrics (once)
    # A job into an alias: its gate and canary (``serving.state.rollouts``); the state alone, to find open ones.
    sa.Column("rollout", sa.Text, nullable=True),
    sa.Column("rollout_state", sa.String(16), nullable=True),
    sa.Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    sa.Index("ix_jobs_status", "status", "created_at"),
    sa.Index("ix_jobs_rollout_state", "rollout_state"),
)
job_events_table = sa.Table(
    "fine_tuning_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=True),
    sa.Index("ix_job_events_job", "job_id", "id"),
)
job_checkpoints_table = sa.Table(
    "fine_tuning_checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.UniqueConstraint("job_id", "step", name="uq_job_checkpoint_step"),
)
workers_table = sa.Table(
    "fine_tuning_workers",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("executor", sa.String(16), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("jobs", sa.Text, nullable=True),  # the jobs it trains now, comma-separated
)
