import pytest


@pytest.fixture(autouse=True)
def _restore_end_of_training_hooks():
    """`kohonen-vae train` registers the report hook globally; keep one test's registration out of the next."""
    from kohonen_vae.training import END_OF_TRAINING_HOOKS

    saved = list(END_OF_TRAINING_HOOKS)
    yield
    END_OF_TRAINING_HOOKS[:] = saved
