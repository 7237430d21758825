"""initial governance schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 05:53:24.763807
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_token",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "viewer",
                "author",
                "approver",
                "admin",
                "service",
                name="role",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("token_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_token_name"), ["name"], unique=False)

    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=60), nullable=False),
        sa.Column("entity_type", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("entity_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("hash"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_entity_id"), ["entity_id"], unique=False)

    op.create_table(
        "dataset",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "digest"),
    )
    op.create_table(
        "policy",
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("updated_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("updated_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.PrimaryKeyConstraint("model_name"),
    )
    op.create_table(
        "registered_model",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("created_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "webhook_delivery",
        sa.Column("delivery_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("entity", sqlmodel.sql.sqltypes.AutoString(length=60), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=60), nullable=False),
        sa.Column("received_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("delivery_id"),
    )
    op.create_table(
        "model_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "stage",
            sa.Enum(
                "candidate",
                "shadow",
                "canary",
                "production",
                "retired",
                "rejected",
                "rolled_back",
                name="stage",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("creator", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("code_commit", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("registered_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("recorded_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("stage_changed_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["registered_model.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_name", "version"),
    )
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_version_model_name"), ["model_name"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_model_version_stage"), ["stage"], unique=False)

    op.create_table(
        "transition",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "from_stage",
            sa.Enum(
                "candidate",
                "shadow",
                "canary",
                "production",
                "retired",
                "rejected",
                "rolled_back",
                name="stage",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column(
            "to_stage",
            sa.Enum(
                "candidate",
                "shadow",
                "canary",
                "production",
                "retired",
                "rejected",
                "rolled_back",
                name="stage",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "approved",
                "applied",
                "rejected",
                "failed",
                "cancelled",
                name="transitionstatus",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("requested_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("idempotency_key", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("gate_results", sa.JSON(), nullable=False),
        sa.Column("status_reason", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.Column("created_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("decided_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.Column("applied_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["registered_model.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("transition", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_transition_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_transition_status"), ["status"], unique=False)

    op.create_table(
        "approval",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("transition_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("approver", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "viewer",
                "author",
                "approver",
                "admin",
                "service",
                name="role",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("decision", sqlmodel.sql.sqltypes.AutoString(length=10), nullable=False),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("created_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["transition_id"],
            ["transition.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("transition_id", "approver"),
    )
    with op.batch_alter_table("approval", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_approval_transition_id"), ["transition_id"], unique=False
        )

    op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "champion",
                "challenger",
                "shadow",
                name="deploymentrole",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("backend", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("transition_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("started_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("ended_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.Column("ended_by_transition_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.ForeignKeyConstraint(
            ["ended_by_transition_id"],
            ["transition.id"],
        ),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["registered_model.name"],
        ),
        sa.ForeignKeyConstraint(
            ["transition_id"],
            ["transition.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deployment_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_deployment_started_at"), ["started_at"], unique=False)

    op.create_table(
        "version_dataset",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("context", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["dataset.id"],
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_version.id"],
        ),
        sa.PrimaryKeyConstraint("version_id", "dataset_id"),
    )
    op.create_table(
        "version_dependency",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("upstream_model", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("upstream_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_version.id"],
        ),
        sa.PrimaryKeyConstraint("version_id", "upstream_model", "upstream_version"),
    )

    # The audit chain's head row exists from the start, so appenders only ever update it.
    op.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '" + "0" * 64 + "')")


def downgrade() -> None:
    op.drop_table("version_dependency")
    op.drop_table("version_dataset")
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployment_started_at"))
        batch_op.drop_index(batch_op.f("ix_deployment_model_name"))

    op.drop_table("deployment")
    with op.batch_alter_table("approval", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approval_transition_id"))

    op.drop_table("approval")
    with op.batch_alter_table("transition", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transition_status"))
        batch_op.drop_index(batch_op.f("ix_transition_model_name"))

    op.drop_table("transition")
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_version_stage"))
        batch_op.drop_index(batch_op.f("ix_model_version_model_name"))

    op.drop_table("model_version")
    op.drop_table("webhook_delivery")
    op.drop_table("registered_model")
    op.drop_table("policy")
    op.drop_table("dataset")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_entity_id"))
        batch_op.drop_index(batch_op.f("ix_audit_log_action"))

    op.drop_table("audit_log")
    op.drop_table("audit_head")
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_token_name"))

    op.drop_table("api_token")
