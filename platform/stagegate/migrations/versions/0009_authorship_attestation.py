"""authorship attestation: the identity that attested a version, when, and which artifact

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import stagegate.db

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("attested_by", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.add_column(sa.Column("attested_at", stagegate.db.UTCDateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("attested_digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("attested_digest")
        batch_op.drop_column("attested_at")
        batch_op.drop_column("attested_by")
