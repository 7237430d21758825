"""evaluations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 07:15:23.278033
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("sample_size", sa.Integer(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("window_start", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("created_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["registered_model.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("evaluation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluation_model_name"), ["model_name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluation_model_name"))

    op.drop_table("evaluation")
