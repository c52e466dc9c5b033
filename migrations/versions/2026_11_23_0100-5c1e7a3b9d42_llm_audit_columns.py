"""llm audit columns: reasoning digest, time to first token, finish reason

Revision ID: 5c1e7a3b9d42
Revises: 3c1f7a9e5b20
Create Date: 2026-11-23 01:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '5c1e7a3b9d42'
down_revision = '3c1f7a9e5b20'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_records') as batch:
        batch.add_column(sa.Column('reasoning_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('time_to_first_token_ms', sa.Float(), nullable=True))
        batch.add_column(sa.Column('finish_reason', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('audit_records') as batch:
        batch.drop_column('finish_reason')
        batch.drop_column('time_to_first_token_ms')
        batch.drop_column('reasoning_sha256')
