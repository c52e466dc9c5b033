"""model aliases, rollouts, model events, version specs and rollout columns on audit records

Revision ID: 5b1e7c3a9d42
Revises: 0908d26b820f
Create Date: 2026-11-22 23:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '5b1e7c3a9d42'
down_revision = '0908d26b820f'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spec', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('status_changed_by', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('status_changed_at', sa.DateTime(timezone=True), nullable=True))

    op.create_table('model_aliases',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('model_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('model_version_id', sa.Uuid(), nullable=False),
    sa.Column('previous_version_id', sa.Uuid(), nullable=True),
    sa.Column('updated_by', sa.String(length=200), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_model_aliases_model_id_models')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_model_aliases_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['previous_version_id'], ['model_versions.id'], name=op.f('fk_model_aliases_previous_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_aliases')),
    sa.UniqueConstraint('model_id', 'name', name=op.f('uq_model_aliases_model_id_name'))
    )
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_aliases_model_id'), ['model_id'], unique=False)

    op.create_table('rollouts',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('model_id', sa.Uuid(), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('candidate_version_id', sa.Uuid(), nullable=False),
    sa.Column('percent', sa.Float(), nullable=False),
    sa.Column('started_by', sa.String(length=200), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['candidate_version_id'], ['model_versions.id'], name=op.f('fk_rollouts_candidate_version_id_model_versions')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_rollouts_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rollouts')),
    sa.UniqueConstraint('model_id', name=op.f('uq_rollouts_model_id'))
    )

    op.create_table('model_events',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('model_id', sa.Uuid(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=True),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_model_events_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_events'))
    )
    with op.batch_alter_table('model_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_events_model_id'), ['model_id'], unique=False)

    with op.batch_alter_table('audit_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rollout', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('shadow', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('shadow_of', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('output_label', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_audit_records_shadow_of'), ['shadow_of'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_records_shadow_of'))
        batch_op.drop_column('output_label')
        batch_op.drop_column('shadow_of')
        batch_op.drop_column('shadow')
        batch_op.drop_column('rollout')
    with op.batch_alter_table('model_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_events_model_id'))
    op.drop_table('model_events')
    op.drop_table('rollouts')
    with op.batch_alter_table('model_aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_aliases_model_id'))
    op.drop_table('model_aliases')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('status_changed_at')
        batch_op.drop_column('status_changed_by')
        batch_op.drop_column('spec')
