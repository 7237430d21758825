"""endpoints: each model's desired endpoint state, its route and generation

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 05:30:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "endpoint",
        sa.Column("model_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("route", sa.JSON(), nullable=True),
        sa.Column("route_generation", sa.Integer(), nullable=False),
        sa.Column("converged_generation", sa.Integer(), nullable=False),
        sa.Column("updated_at", stagegate.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["model_name"], ["registered_model.name"]),
        sa.PrimaryKeyConstraint("model_name"),
    )
    with op.batch_alter_table("transition", schema=None) as batch_op:
        batch_op.add_column(sa.Column("generation", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("announced_at", stagegate.db.UTCDateTime(), nullable=True))
    # Transitions applied before this revision were announced by the code of their day.
    op.execute("UPDATE transition SET announced_at = applied_at WHERE status = 'applied'")


def downgrade() -> None:
    with op.batch_alter_table("transition", schema=None) as batch_op:
        batch_op.drop_column("announced_at")
        batch_op.drop_column("generation")
    op.drop_table("endpoint")
