"""evidence binding: evaluations carry the digest, the champion compared with, a key

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 05:40:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluation", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("evidence_key", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=True)
        )
        batch_op.add_column(
            sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("champion_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("window_end", stagegate.db.UTCDateTime(), nullable=True))
        batch_op.create_unique_constraint("uq_evaluation_evidence_key", ["evidence_key"])


def downgrade() -> None:
    with op.batch_alter_table("evaluation", schema=None) as batch_op:
        batch_op.drop_constraint("uq_evaluation_evidence_key", type_="unique")
        batch_op.drop_column("window_end")
        batch_op.drop_column("champion_version")
        batch_op.drop_column("digest")
        batch_op.drop_column("evidence_key")
