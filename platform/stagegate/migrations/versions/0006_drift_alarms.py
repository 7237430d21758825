"""drift alarms, and where each version's reference data comes from

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 08:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_alarm",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "acknowledged",
                name="alarmstatus",
                native_enum=False,
                create_constraint=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("last_evaluation_id", sa.Integer(), nullable=False),
        sa.Column("drifted_features", sa.JSON(), nullable=False),
        sa.Column("opened_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("alert_status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True),
        sa.Column("alert_attempts", sa.Integer(), nullable=False),
        sa.Column(
            "rollback_transition_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True
        ),
        sa.Column("event_emitted_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.Column("acknowledged_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("acknowledged_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluation.id"]),
        sa.ForeignKeyConstraint(["last_evaluation_id"], ["evaluation.id"]),
        sa.ForeignKeyConstraint(["model_name"], ["registered_model.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("drift_alarm", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drift_alarm_model_name"), ["model_name"])
        batch_op.create_index(batch_op.f("ix_drift_alarm_status"), ["status"])
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "reference_source", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("reference_source")
    with op.batch_alter_table("drift_alarm", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drift_alarm_status"))
        batch_op.drop_index(batch_op.f("ix_drift_alarm_model_name"))
    op.drop_table("drift_alarm")
