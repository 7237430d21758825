"""identity links (MLflow user -> identity) and policy changes (four eyes on weakening ones)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 16:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_link",
        sa.Column("mlflow_user", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("identity", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("linked_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("linked_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("mlflow_user"),
    )
    with op.batch_alter_table("identity_link", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_identity_link_identity"), ["identity"], unique=False)

    op.create_table(
        "policy_change",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("base", sa.JSON(), nullable=False),
        sa.Column("weakens", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "applied",
                "pending",
                "rejected",
                name="policychangestatus",
                native_enum=False,
                create_constraint=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("pending_key", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("proposed_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("proposed_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("decided_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("decided_at", stagegate.db.UTCDateTime(), nullable=True),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pending_key"),
    )
    with op.batch_alter_table("policy_change", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_policy_change_model_name"), ["model_name"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_policy_change_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("policy_change", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_policy_change_status"))
        batch_op.drop_index(batch_op.f("ix_policy_change_model_name"))
    op.drop_table("policy_change")
    with op.batch_alter_table("identity_link", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_identity_link_identity"))
    op.drop_table("identity_link")
