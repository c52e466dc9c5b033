"""review console: sign-in sessions (hash of the secret only) and where a review was made

Revision ID: 9c4f6a8b0d32
Revises: 8b3e5f7a9c21
Create Date: 2026-12-03 05:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '9c4f6a8b0d32'
down_revision = '8b3e5f7a9c21'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('console_sessions',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('key_id', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('department', sa.String(length=100), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_console_sessions')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_console_sessions_token_sha256'))
    )
    with op.batch_alter_table('console_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_console_sessions_expires_at'), ['expires_at'], unique=False)
    with op.batch_alter_table('reviews') as batch:
        batch.add_column(sa.Column('via', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('session_id', sa.Uuid(), nullable=True))
        batch.add_column(sa.Column('audit_id', sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('reviews') as batch:
        batch.drop_column('audit_id')
        batch.drop_column('session_id')
        batch.drop_column('via')
    with op.batch_alter_table('console_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_console_sessions_expires_at'))
    op.drop_table('console_sessions')
