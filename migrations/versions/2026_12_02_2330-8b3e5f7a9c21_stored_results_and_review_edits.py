"""stored results (pending LLM answers, pipeline reports) and review edits kept beside the original

Revision ID: 8b3e5f7a9c21
Revises: 7a2d4c6e8f10
Create Date: 2026-12-02 23:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '8b3e5f7a9c21'
down_revision = '7a2d4c6e8f10'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('stored_results',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('operation', sa.String(length=32), nullable=False),
    sa.Column('model_name', sa.String(length=100), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('department', sa.String(length=100), nullable=True),
    sa.Column('review_required', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=True),
    sa.Column('output_text', sa.Text(), nullable=True),
    sa.Column('input_text', sa.Text(), nullable=True),
    sa.Column('document', sa.JSON(), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stored_results'))
    )
    with op.batch_alter_table('stored_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stored_results_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_stored_results_department'), ['department'], unique=False)
        batch_op.create_index(batch_op.f('ix_stored_results_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_stored_results_model_name'), ['model_name'], unique=False)
    with op.batch_alter_table('reviews') as batch:
        batch.add_column(sa.Column('edited_text', sa.Text(), nullable=True))
        batch.add_column(sa.Column('original_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('reviews') as batch:
        batch.drop_column('original_sha256')
        batch.drop_column('edited_text')
    with op.batch_alter_table('stored_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stored_results_model_name'))
        batch_op.drop_index(batch_op.f('ix_stored_results_expires_at'))
        batch_op.drop_index(batch_op.f('ix_stored_results_department'))
        batch_op.drop_index(batch_op.f('ix_stored_results_created_at'))
    op.drop_table('stored_results')
