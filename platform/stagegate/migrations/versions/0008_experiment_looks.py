"""the looks of canary A/B experiments

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 16:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiment_look",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("champion_version", sa.Integer(), nullable=True),
        sa.Column("window_start", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("at", stagegate.db.UTCDateTime(), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("n_treatment", sa.Integer(), nullable=False),
        sa.Column("n_control", sa.Integer(), nullable=False),
        sa.Column("estimate", sa.Float(), nullable=True),
        sa.Column("lower", sa.Float(), nullable=True),
        sa.Column("upper", sa.Float(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["model_name"], ["registered_model.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("experiment_look", schema=None) as batch_op:
        batch_op.create_index(
            "ix_experiment_look_version", ["model_name", "version", "window_start"]
        )


def downgrade() -> None:
    with op.batch_alter_table("experiment_look", schema=None) as batch_op:
        batch_op.drop_index("ix_experiment_look_version")
    op.drop_table("experiment_look")
