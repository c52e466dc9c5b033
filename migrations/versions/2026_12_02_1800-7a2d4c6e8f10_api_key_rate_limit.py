"""api key rate limit: a key's own requests per second (NULL: the install's default, 0: no limit)

Revision ID: 7a2d4c6e8f10
Revises: 5c1e7a3b9d42
Create Date: 2026-12-02 18:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '7a2d4c6e8f10'
down_revision = '5c1e7a3b9d42'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('rate_limit_rps', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_column('rate_limit_rps')
